"""The policy wing: tools that work on profiles with the audit trail, off the Check path.

- `simulate`: replay recorded decisions against candidate profiles and report which past
  calls would change (pure);
- `suggest`: propose a profile from what an agent did (pure), with `generalize` (path
  templates and argument domains from recorded values) and `yamltext` (YAML with comments);
- `cli`: `mandate simulate` and `mandate profile suggest` (read the trail and the
  profiles, print the report or the proposal).

This wing reads profiles (`sidecar.core`) and audit trails (`sidecar.audit`); it must not
serve Checks, write audit records or import any transport, Kubernetes or telemetry library.
Its command line is imported lazily by `sidecar.cli`; the pure faces are imported from
`sidecar.policy.simulate` and `sidecar.policy.suggest`, not re-exported here, so that
building `mandate`'s parser stays light.
"""

__all__: list[str] = []
