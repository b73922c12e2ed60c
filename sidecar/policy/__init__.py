"""The policy wing: tools that work on profiles with the audit trail, off the Check path.

- `simulate`: replay recorded decisions against candidate profiles and report which past
  calls would change (pure);
- `cli`: `mandate simulate` (reads the trail and the profiles, prints the report).

This wing reads profiles (`sidecar.core`) and audit trails (`sidecar.audit`); it must not
serve Checks, write audit records or import any transport, Kubernetes or telemetry library.
Its command line is imported lazily by `sidecar.cli`; the pure face is re-exported from
`sidecar.policy.simulate`, not here, so that building `mandate`'s parser stays light.
"""

__all__: list[str] = []
