"""mandate: runtime identity and purpose-bound authorization for AI agents (Envoy ext_authz)."""

__version__ = "0.1.0"

# gRPC Check threads per worker. The GIL runs one at a time; more threads only overlap
# grpcio's C-core work, and each adds hand-offs. Measured through real Envoy (wrk -c16, 1
# worker, 2 CPUs, unpinned; `bench/telemetry_cost.py --cases off --threads N`, two rounds):
# 2 threads 4,167 / 3,790 req/s at 264 / 286 µs per Check; 3: 3,598 / 3,494; 4 (the old
# default): 3,557 / 3,370 at 306 / 319 µs; 8: 3,034 / 2,937; 1: 2,694 / 2,564.
DEFAULT_THREADS = 2
