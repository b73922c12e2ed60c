"""The state wing: what the supervisor writes and the Check workers read.

- `shm`: the shared tables (memfds, seqlock generations) and the run directory;
- `publisher`: the one "publish a generation, persist it" mechanism of both writers (the
  generation, the durable write of the state file, its health and its retry);
- `revocations`: the revocation store, single writer of the revocation table;
- `agentstate`: the agent-state store (tasks, elevation requests, grants, risk), single
  writer of the context table, split by concept;
- `statefile`: durable JSON state files (atomic rename, fsync).

No transport, no Kubernetes: sources of revocations and approvals call in from above."""
