"""The injection wing: adding the sidecar to agent pods.

- `pod`: pure functions, a pod (template) in, the injected pod out;
- `webhook`: the mutating admission webhook (aiohttp);
- `cli`: `mandate inject` and `mandate webhook`."""
