#!/usr/bin/env bash
# The injection webhook's TLS without cert-manager: a private CA, kept in the Secret
# mandate-webhook-ca, signs a serving certificate for mandate-webhook.<namespace>.svc, kept in
# the Secret mandate-webhook-tls; the CA goes into the caBundle of the webhook configuration.
# The webhook re-reads its certificate by itself (within about two minutes of the Secret's
# update: the kubelet's sync, then its 30 s check), so nothing is restarted.
#
#   deploy/webhook-cert.sh            # install; run it again any time: makes what is missing
#   deploy/webhook-cert.sh --renew    # a new serving certificate, same CA (caBundle unchanged)
#   deploy/webhook-cert.sh --check    # print the expiry dates; exit 1 if a renewal is due
#   deploy/webhook-cert.sh --out DIR  # no cluster: ca.crt, ca.key, tls.crt, tls.key in DIR
#
# Options: --namespace NS (mandate-system), --days N (serving certificate, 365), --ca-days N
# (CA, 3650). Without --renew, a serving certificate is kept while it is signed by the CA,
# names the Service and has more than a third of --days (at most 30 days) left. Nothing renews
# it by itself: run --check from a monthly job, and --renew when it says so (or just re-run
# the script, which renews a certificate that is due).
# Not with deploy/components/cert-manager: that one's CA injector owns the caBundle.
set -euo pipefail

namespace=mandate-system
days=365
ca_days=3650
out=""
action=ensure
while [ $# -gt 0 ]; do
  case "$1" in
    --namespace) namespace="${2:?--namespace needs a value}"; shift 2 ;;
    --days) days="${2:?--days needs a value}"; shift 2 ;;
    --ca-days) ca_days="${2:?--ca-days needs a value}"; shift 2 ;;
    --out) out="${2:?--out needs a directory}"; shift 2 ;;
    --renew) action=renew; shift ;;
    --check) action=check; shift ;;
    -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
    *) echo "webhook-cert.sh: unknown option $1" >&2; exit 2 ;;
  esac
done
for n in "$days" "$ca_days"; do
  case "$n" in
    ''|*[!0-9]*|0) echo "webhook-cert.sh: --days, --ca-days: a number of days, not '$n'" >&2; exit 2 ;;
  esac
done
if [ "$ca_days" -lt "$days" ]; then
  echo "webhook-cert.sh: --ca-days must be at least --days" >&2
  exit 2
fi

service="mandate-webhook.${namespace}.svc"
config=mutatingwebhookconfiguration/mandate-injector
ca_where=${out:+$out/ca.crt}
ca_where=${ca_where:-Secret $namespace/mandate-webhook-ca}
renew_before=$((days / 3))
[ "$renew_before" -le 30 ] || renew_before=30

die() { echo "webhook-cert.sh: $*" >&2; exit 1; }
quiet() {  # run a command, showing its output only if it fails
  local log
  log=$("$@" 2>&1) || { printf '%s\n' "$log" >&2; return 1; }
}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
umask 077

# -- where the CA and the serving certificate live: the cluster's Secrets, or --out DIR ----------

# Errors are handled explicitly (`|| die`): these run inside conditions, where `set -e` does
# not apply, and an unreadable Secret must never be taken for a missing one (a new CA).
get_secret() {  # get_secret NAME FILE: the Secret's tls.crt/.key to $work/FILE.crt/.key; 1 if absent
  local crt key
  crt=$(kubectl -n "$namespace" get secret "$1" --ignore-not-found -o 'jsonpath={.data.tls\.crt}') ||
    die "cannot read Secret $namespace/$1 (kubectl's message above)"
  [ -n "$crt" ] || return 1
  key=$(kubectl -n "$namespace" get secret "$1" -o 'jsonpath={.data.tls\.key}') ||
    die "cannot read Secret $namespace/$1 (kubectl's message above)"
  [ -n "$key" ] || die "Secret $namespace/$1 has a tls.crt but no tls.key"
  printf '%s' "$crt" | openssl base64 -d -A > "$work/$2.crt"
  printf '%s' "$key" | openssl base64 -d -A > "$work/$2.key"
}

load() {  # load FILE (ca or tls): 1 if there is none yet
  if [ -n "$out" ]; then
    [ -s "$out/$1.crt" ] && [ -s "$out/$1.key" ] || return 1
    cp "$out/$1.crt" "$out/$1.key" "$work/"
  elif [ "$1" = ca ]; then
    get_secret mandate-webhook-ca ca
  else
    get_secret mandate-webhook-tls tls
  fi
}

# -- certificates ---------------------------------------------------------------------------------

new_ca() {
  printf '%s\n' '[req]' 'distinguished_name = dn' 'prompt = no' '[dn]' 'CN = mandate-webhook-ca' \
    '[ca]' 'basicConstraints = critical,CA:TRUE,pathlen:0' \
    'keyUsage = critical,keyCertSign,cRLSign' 'subjectKeyIdentifier = hash' > "$work/ca.cnf"
  quiet openssl req -x509 -config "$work/ca.cnf" -extensions ca -newkey ec \
    -pkeyopt ec_paramgen_curve:P-256 -nodes -days "$ca_days" \
    -keyout "$work/ca.key" -out "$work/ca.crt"
}

new_leaf() {
  quiet openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
    -subj "/CN=${service}" -keyout "$work/tls.key" -out "$work/tls.csr"
  printf '%s\n' 'basicConstraints = critical,CA:FALSE' 'keyUsage = critical,digitalSignature' \
    'extendedKeyUsage = serverAuth' "subjectAltName = DNS:${service},DNS:${service}.cluster.local" \
    'subjectKeyIdentifier = hash' 'authorityKeyIdentifier = keyid' > "$work/tls.cnf"
  quiet openssl x509 -req -in "$work/tls.csr" -CA "$work/ca.crt" -CAkey "$work/ca.key" \
    -set_serial "0x$(openssl rand -hex 16)" -days "$days" -extfile "$work/tls.cnf" \
    -out "$work/tls.crt"
}

pubkey() { openssl "$@" -pubout -outform DER 2>/dev/null | openssl dgst -sha256; }

leaf_ok() {  # the serving certificate: signed by the CA, its key, names the Service, not due
  [ -s "$work/tls.crt" ] || return 1
  openssl verify -CAfile "$work/ca.crt" "$work/tls.crt" >/dev/null 2>&1 || return 1
  [ "$(openssl x509 -in "$work/tls.crt" -noout -pubkey | pubkey pkey -pubin)" = \
    "$(pubkey pkey -in "$work/tls.key")" ] || return 1
  openssl x509 -in "$work/tls.crt" -noout -text | grep -qF "DNS:${service}," || return 1
  openssl x509 -in "$work/tls.crt" -noout -checkend $((renew_before * 86400)) >/dev/null
}

expiry() { openssl x509 -in "$1" -noout -enddate | sed 's/^notAfter=//'; }

# -- the caBundle -----------------------------------------------------------------------------------

fingerprint() { openssl x509 -in "$1" -noout -fingerprint -sha256; }

split_pem() {  # split_pem FILE PREFIX: each certificate of FILE to PREFIX.N.pem
  awk -v p="$2" '/-----BEGIN CERTIFICATE-----/ { n++; f = p "." n ".pem" } f { print > f }
    /-----END CERTIFICATE-----/ { f = "" }' "$1"
}

# The caBundle to write, in $work/bundle.pem; bundle_changed=1 if it differs. Left as it is
# when every webhook trusts the CA already. Else the CA, plus, when the CA is new (the first
# run after an older version of this script, or a replaced CA), the certificates the webhooks
# trusted before that are still valid: the webhook serves its old certificate until it
# reloads the new one, and the API server must trust both meanwhile (they expire by themselves).
has_ca() {  # has_ca PEM-FILE: the file holds our CA
  local f found=1
  split_pem "$1" "$work/has"
  for f in "$work"/has.*.pem; do
    [ -e "$f" ] && [ "$(fingerprint "$f")" = "$ca_fingerprint" ] && found=0
  done
  rm -f "$work"/has.*.pem
  return "$found"
}

build_bundle() {
  local line f seen trusted=1
  ca_fingerprint=$(fingerprint "$work/ca.crt")
  kubectl get "$config" -o 'jsonpath={range .webhooks[*]}{.clientConfig.caBundle}{"\n"}{end}' \
    > "$work/bundles.b64"
  : > "$work/old.pem"
  while IFS= read -r line; do
    printf '%s' "$line" | openssl base64 -d -A > "$work/one.pem"
    has_ca "$work/one.pem" || trusted=0
    cat "$work/one.pem" >> "$work/old.pem"
  done < "$work/bundles.b64"
  bundle_changed=0
  [ "$ca_changed" = 0 ] && [ "$trusted" = 1 ] && return 0
  bundle_changed=1
  cp "$work/ca.crt" "$work/bundle.pem"
  [ "$ca_changed" = 1 ] || return 0
  seen=$ca_fingerprint
  split_pem "$work/old.pem" "$work/old"
  for f in "$work"/old.*.pem; do
    [ -e "$f" ] || continue
    openssl x509 -in "$f" -noout -checkend 0 >/dev/null 2>&1 || continue
    case "$seen" in *"$(fingerprint "$f")"*) continue ;; esac
    seen="$seen $(fingerprint "$f")"
    cat "$f" >> "$work/bundle.pem"
  done
}

# -- check -------------------------------------------------------------------------------------------

if [ "$action" = check ]; then
  load ca || die "no CA yet ($ca_where): run deploy/webhook-cert.sh"
  load tls || die "no serving certificate yet: run deploy/webhook-cert.sh"
  due=0
  echo "CA:                  expires $(expiry "$work/ca.crt")"
  echo "serving certificate: expires $(expiry "$work/tls.crt")"
  if ! openssl x509 -in "$work/ca.crt" -noout -checkend $((90 * 86400)) >/dev/null; then
    echo "the CA expires within 90 days: replace it (deploy/README.md, webhook certificates)"
    due=1
  fi
  if ! leaf_ok; then
    echo "the serving certificate is due (it expires within $renew_before days, or does not" \
      "match the CA, its key or the Service): run deploy/webhook-cert.sh --renew"
    due=1
  fi
  exit "$due"
fi

# -- install / renew -------------------------------------------------------------------------------

if [ -z "$out" ]; then
  # Before writing anything: the webhook configuration is there, and not cert-manager's.
  webhooks=$(kubectl get "$config" --ignore-not-found -o 'jsonpath={.webhooks[*].name}')
  [ -n "$webhooks" ] ||
    die "no $config: apply the manifests first (kubectl apply -k deploy/overlays/dev)"
  read -r -a names <<< "$webhooks"
  webhooks=${#names[@]}
  injector=$(kubectl get "$config" \
    -o 'jsonpath={.metadata.annotations.cert-manager\.io/inject-ca-from}')
  [ -z "$injector" ] || die "$config is annotated cert-manager.io/inject-ca-from: $injector:" \
    "cert-manager's CA injector owns its caBundle (deploy/components/cert-manager);" \
    "do not use this script too"
else
  mkdir -p "$out"
fi

ca_changed=0
if ! load ca; then
  [ "$action" != renew ] ||
    die "--renew keeps the CA, and there is none ($ca_where): run without --renew first"
  new_ca
  ca_changed=1
fi
openssl x509 -in "$work/ca.crt" -noout -checkend 0 >/dev/null ||
  die "the CA has expired: delete $ca_where and run again (deploy/README.md)"
leaf_changed=0
if [ "$action" = renew ] || ! { load tls && leaf_ok; }; then
  new_leaf
  leaf_changed=1
fi

if [ -n "$out" ]; then
  cp "$work/ca.crt" "$work/ca.key" "$work/tls.crt" "$work/tls.key" "$out/"
  echo "$out: ca.crt ca.key tls.crt tls.key for $service"
else
  # The CA first, then the serving certificate, then the caBundle: a run that stops half way
  # is finished by the next one.
  if [ "$ca_changed" = 1 ]; then
    kubectl -n "$namespace" create secret tls mandate-webhook-ca \
      --cert "$work/ca.crt" --key "$work/ca.key" --dry-run=client -o yaml | kubectl apply -f -
  fi
  if [ "$leaf_changed" = 1 ]; then
    kubectl -n "$namespace" create secret tls mandate-webhook-tls \
      --cert "$work/tls.crt" --key "$work/tls.key" --dry-run=client -o yaml | kubectl apply -f -
  fi
  build_bundle
  if [ "$bundle_changed" = 1 ]; then
    ca=$(openssl base64 -A < "$work/bundle.pem")
    patch=""
    for ((i = 0; i < webhooks; i++)); do
      patch="$patch${patch:+,}{\"op\": \"add\", \"value\": \"$ca\","
      patch="$patch \"path\": \"/webhooks/$i/clientConfig/caBundle\"}"
    done
    kubectl patch "$config" --type json -p "[$patch]"
  fi
fi

state() { if [ "$1" = 1 ]; then echo "$2"; else echo "$3"; fi; }
echo "CA:                  $(state "$ca_changed" created kept); expires $(expiry "$work/ca.crt")"
echo "serving certificate: $(state "$leaf_changed" issued kept); expires $(expiry "$work/tls.crt")"
[ -n "$out" ] || echo "caBundle:            $(state "$bundle_changed" set unchanged) ($config)"
echo "Renew the serving certificate before it expires: deploy/webhook-cert.sh --renew" \
  "(--check says when)."
