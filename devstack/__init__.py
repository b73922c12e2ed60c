"""Development helpers outside the product package: local Envoy and mandate processes for
the demo, the tests and the benchmarks (`local`), and the demo itself (`demo`: `make run`).
Not installed with mandate; nothing in `sidecar` imports it."""
