#!/usr/bin/env bash
# The whole test suite with the wall clock moved, to show that no test depends on today's
# date (main broke on 2026-12-01 when a fixed date in an example passed).
#
#   tests/timeshift.sh +3y [pytest args]     three years ahead
#   tests/timeshift.sh -3y [pytest args]     three years back
#
# libfaketime (Debian's `faketime` package: apt-get install faketime) moves time(),
# gettimeofday() and clock_gettime(CLOCK_REALTIME) of every process the tests start: pytest,
# mandate's supervisor and workers, the upstreams, the Kubernetes emulation. Monotonic clocks
# are left alone (timeouts and backoff stay real). Two exceptions, both reading the real clock:
# Envoy, which hangs at start under libfaketime, runs through a wrapper that drops it
# (MANDATE_ENVOY, see devstack.local.envoy_binary), and kubectl, a static Go binary that
# LD_PRELOAD does not reach. Neither decides anything from the date.
set -euo pipefail
cd "$(dirname "$0")/.."
offset="${1:?usage: tests/timeshift.sh OFFSET (+3y, -3y, +400d) [pytest args]}"
shift
lib=""
for candidate in /usr/lib/*/faketime/libfaketimeMT.so.1 /usr/lib/faketime/libfaketimeMT.so.1; do
  if [ -e "$candidate" ]; then lib="$candidate"; break; fi
done
if [ -z "$lib" ]; then
  echo "libfaketime not found: apt-get install faketime" >&2
  exit 2
fi
wrapper_dir="$(mktemp -d)"
trap 'rm -rf "$wrapper_dir"' EXIT
real_envoy="$(.venv/bin/python -c 'from devstack.local import envoy_binary; print(envoy_binary())')"
cat > "$wrapper_dir/envoy" <<WRAPPER
#!/bin/sh
exec env -u LD_PRELOAD -u FAKETIME "$real_envoy" "\$@"
WRAPPER
chmod +x "$wrapper_dir/envoy"
# libfaketime 0.9.10 with FAKETIME_DONT_FAKE_MONOTONIC fails an absolute clock_nanosleep on
# the monotonic clock (EINVAL), which is how Python's time.sleep waits; faking the monotonic
# clock instead hangs threading's timed waits. So keep monotonic real, and give every Python
# process of the run a time.sleep that waits with select(2), which libfaketime leaves alone.
cat > "$wrapper_dir/sitecustomize.py" <<'PY'
import select
import time


def _sleep(seconds: float) -> None:
    if seconds < 0:
        raise ValueError("sleep length must be non-negative")
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        select.select([], [], [], left)


time.sleep = _sleep
PY
export PYTHONPATH="$wrapper_dir${PYTHONPATH:+:$PYTHONPATH}"
export MANDATE_ENVOY="$wrapper_dir/envoy"
export FAKETIME="$offset" FAKETIME_DONT_FAKE_MONOTONIC=1 LD_PRELOAD="$lib"
echo "clock moved to: $(date -u +%Y-%m-%dT%H:%M:%SZ) (real: $(env -u LD_PRELOAD date -u +%Y-%m-%dT%H:%M:%SZ))"
exec .venv/bin/pytest -p no:cacheprovider "$@"
