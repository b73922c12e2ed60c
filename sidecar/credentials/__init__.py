"""The credentials wing: what mandate adds to an allowed call so that the agent holds none.

- `secrets`: a value read from a file (a Kubernetes Secret mounted only into mandate's
  container), re-read when the kubelet swaps the file;
- `oauth`: OAuth 2.0 client credentials and RFC 8693 token exchange, cached until expiry
  minus a skew, refreshed before, dropped at once when the agent is revoked;
- `txntoken`: Transaction Tokens (`Txn-Token`, `typ: txntoken+jwt`) minted and signed by
  mandate, and the JWKS upstreams verify them with;
- `broker`: per agent and credential, the headers an allowed call gets.

Imports the pure core and errors only; never a transport, the state stores or Kubernetes.
No secret or token value ever reaches a log line, an exception message or a metric label."""
