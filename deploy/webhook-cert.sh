#!/usr/bin/env bash
# The injection webhook's TLS certificate without cert-manager: a private CA and a serving
# certificate for mandate-webhook.<namespace>.svc, written to the Secret mandate-webhook-tls;
# the CA goes into both webhooks' caBundle, and the webhook is restarted to pick it up.
#
#   deploy/webhook-cert.sh                  # with kubectl's current context
#   deploy/webhook-cert.sh --out DIR        # only write ca.crt, tls.crt, tls.key to DIR
#
# Options: --namespace NS (mandate-system), --days N (365). Run it again to renew.
set -euo pipefail

namespace=mandate-system
days=365
out=""
while [ $# -gt 0 ]; do
  case "$1" in
    --namespace) namespace="$2"; shift 2 ;;
    --days) days="$2"; shift 2 ;;
    --out) out="$2"; shift 2 ;;
    -h|--help) sed -n '2,10p' "$0"; exit 0 ;;
    *) echo "webhook-cert.sh: unknown option $1" >&2; exit 2 ;;
  esac
done

service="mandate-webhook.${namespace}.svc"
dir="${out:-$(mktemp -d)}"
mkdir -p "$dir"
[ -n "$out" ] || trap 'rm -rf "$dir"' EXIT
umask 077

openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days "$days" \
  -subj "/CN=mandate-webhook-ca" -keyout "$dir/ca.key" -out "$dir/ca.crt" 2>/dev/null
openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
  -subj "/CN=${service}" -keyout "$dir/tls.key" -out "$dir/tls.csr" 2>/dev/null
printf 'subjectAltName=DNS:%s,DNS:%s.cluster.local\nextendedKeyUsage=serverAuth\n' \
  "$service" "$service" > "$dir/ext.cnf"
openssl x509 -req -in "$dir/tls.csr" -CA "$dir/ca.crt" -CAkey "$dir/ca.key" -CAcreateserial \
  -days "$days" -extfile "$dir/ext.cnf" -out "$dir/tls.crt" 2>/dev/null
rm -f "$dir/tls.csr" "$dir/ext.cnf" "$dir/ca.srl"

if [ -n "$out" ]; then
  echo "wrote $dir/ca.crt $dir/tls.crt $dir/tls.key for $service"
  exit 0
fi

kubectl -n "$namespace" create secret tls mandate-webhook-tls \
  --cert "$dir/tls.crt" --key "$dir/tls.key" --dry-run=client -o yaml | kubectl apply -f -
ca=$(base64 < "$dir/ca.crt" | tr -d '\n')
kubectl patch mutatingwebhookconfiguration mandate-injector --type json -p "[
  {\"op\": \"add\", \"path\": \"/webhooks/0/clientConfig/caBundle\", \"value\": \"$ca\"},
  {\"op\": \"add\", \"path\": \"/webhooks/1/clientConfig/caBundle\", \"value\": \"$ca\"}]"
kubectl -n "$namespace" rollout restart deployment/mandate-webhook
echo "mandate-webhook-tls and the caBundle are set for $service"
