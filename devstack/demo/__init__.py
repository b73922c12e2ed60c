"""The local demo (`make run`): real Envoy, mandate, a demo upstream and a demo agent."""
