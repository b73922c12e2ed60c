"""The agent API wing: what an agent may ask of mandate over its local socket.

- `server`: the gRPC `mandate.agent.v1.AgentContext` service (one listener per agent);
- `backend`: what each call does, over the supervisor's stores;
- `client`: the small asyncio client for agent authors (light: no server imports)."""
