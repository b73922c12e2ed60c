"""The run wing: the processes of `mandate run`.

- `supervisor`: the supervisor process (stores, watchers, agent API, behaviour) and its
  Check workers;
- `services`: the supervisor's services (a name, start and stop), started in order and
  stopped in reverse;
- `worker`: one Check worker (`mandate worker`), or the single-process sidecar;
- `admin`: the admin HTTP server (probes, metrics, revocation and elevation API)."""
