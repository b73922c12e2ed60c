# Two commands do all the set-up on a fresh machine (see README.md):
#   make run   - the local demo: real Envoy, mandate, a demo upstream and a demo agent
#   make test  - the whole test suite, end-to-end tests with real Envoy included
# Both create .venv and install the pinned dependencies first. Only Python 3.11+ and make
# are assumed.

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: run test test-timeshift lint bench soak venv clean netns-tools

# setup.py compiles protos/ into sidecar/_proto during the (editable) install: a changed
# .proto reinstalls, which regenerates the modules.
$(STAMP): pyproject.toml setup.py $(wildcard protos/mandate/*/*/*.proto)
	$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || { echo "Python 3.11+ needed"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check --upgrade pip
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[dev]'
	# xds-protos ships its own, older copy of opentelemetry-proto's modules into the same
	# files; reinstall opentelemetry-proto last so the OTLP exporter finds what it imports.
	$(BIN)/pip install --quiet --disable-pip-version-check --force-reinstall --no-deps \
		"$$(grep -o 'opentelemetry-proto==[0-9.]*' pyproject.toml)"
	touch $(STAMP)

venv: $(STAMP)

run: $(STAMP)
	$(BIN)/python -m devstack.demo

# The egress-capture test (tests/netns) runs iptables in network namespaces of its own: as
# root, install iptables and iproute2 when missing. Never fails; without them (or without
# root) that test skips and says what is missing.
netns-tools:
	@if [ "$$(id -u)" = 0 ] && ! { PATH="$$PATH:/usr/sbin:/sbin"; command -v iptables && command -v ip6tables && command -v ip; } >/dev/null 2>&1; then \
	  echo "installing iptables and iproute2 (apt-get) for tests/netns"; \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq iptables iproute2; } >/dev/null 2>&1 \
	    || echo "could not install iptables/iproute2: tests/netns will skip"; \
	fi

test: $(STAMP) netns-tools
	$(BIN)/ruff check sidecar devstack tests bench
	$(BIN)/ruff format --check sidecar devstack tests bench
	$(BIN)/mypy
	$(BIN)/lint-imports
	$(BIN)/pytest

# The whole suite with the wall clock moved (tests/timeshift.sh, libfaketime): no test may
# depend on today's date. By hand, like bench: OFFSET=-3y for years back.
OFFSET ?= +3y
test-timeshift: $(STAMP)
	@if [ "$$(id -u)" = 0 ] && ! ls /usr/lib/*/faketime/libfaketimeMT.so.1 >/dev/null 2>&1; then \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq faketime; } >/dev/null 2>&1 \
	    || echo "could not install faketime"; \
	fi
	tests/timeshift.sh $(OFFSET) -q

lint: $(STAMP)
	$(BIN)/ruff check sidecar devstack tests bench
	$(BIN)/ruff format --check sidecar devstack tests bench
	$(BIN)/mypy
	$(BIN)/lint-imports

# The benchmark matrix (bench/README.md): real Envoy alone, with RBAC, with mandate, under
# fixed concurrency and fixed rates; about 10 minutes; writes bench/results/matrix.{md,json,png}.
# By hand only, never part of test. BENCH_ARGS="--full" for the whole cross product (~22 min),
# "--pin" to pin Envoy / mandate / the load generator, "--dry-run" to list the cases.
bench: $(STAMP)
	$(BIN)/python -m bench matrix $(BENCH_ARGS)

# 10 minutes of mixed traffic with revocations, reloads and elevations (bench/README.md);
# by hand only, like bench. SOAK_ARGS="--minutes 1 --transport http" to change it.
soak: $(STAMP)
	$(BIN)/python -m bench soak $(SOAK_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
