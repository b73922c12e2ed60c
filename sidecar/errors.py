"""The one exception tree of mandate, with stable error codes.

Every error mandate raises on purpose derives from :class:`MandateError`. Each carries a
stable ``code`` that doubles as a metric label and a machine-readable field in CLI output.
Library errors (yaml, pydantic, grpc, OS) are translated into this tree at one boundary
each; nothing here imports those libraries.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "AgentStateError",
    "AuditBusyError",
    "AuditError",
    "AuditInputError",
    "AuditResumeError",
    "BadRequestError",
    "ConfigError",
    "CredentialUnavailable",
    "InjectError",
    "MandateError",
    "ProfileError",
    "ProfileErrors",
    "ProfileProblem",
    "StateWriteError",
]


class MandateError(Exception):
    """Base of every error mandate raises on purpose."""

    code = "mandate_error"


class ConfigError(MandateError):
    """The sidecar's own configuration (flags, environment) is unusable."""

    code = "config_error"


class BadRequestError(MandateError):
    """A request (CLI `explain` input, a Check) is malformed."""

    code = "bad_request"


@dataclass(frozen=True, slots=True)
class ProfileProblem:
    """One problem in a profile directory: where it is and what was expected.

    ``document`` is 1-based (the first YAML document in a file is document 1); ``field`` is a
    dotted path with list indexes, e.g. ``spec.purposes.reconcile.allow[0].paths[1]``; it is
    empty when the problem concerns the whole document or file.
    """

    file: str
    document: int | None
    field: str
    message: str

    def __str__(self) -> str:
        where = self.file
        if self.document is not None:
            where += f", document {self.document}"
        if self.field:
            where += f", {self.field}"
        return f"{where}: {self.message}"


class ProfileError(MandateError):
    """Base for profile-loading errors."""

    code = "profile_error"


class ProfileErrors(ProfileError):
    """A profile directory did not load; ``problems`` lists every problem found."""

    code = "profile_invalid"

    def __init__(self, problems: list[ProfileProblem]) -> None:
        self.problems = tuple(problems)
        super().__init__("\n".join(str(p) for p in self.problems))


class AuditError(MandateError):
    """Base for audit-trail errors (writing, resuming, verifying, querying)."""

    code = "audit_error"


class AuditInputError(AuditError):
    """What was given is not an audit trail: a missing directory, no audit files, an unknown
    chain. The message names the directory or chain."""

    code = "audit_input"


class AuditResumeError(AuditError):
    """The newest file of a chain is damaged beyond a torn last line (an edited or unreadable
    last record, a missing file): the writer refuses to continue it. The message names the
    file and line."""

    code = "audit_resume"


class AuditBusyError(AuditError):
    """Another writer (process) holds the chain's lock: two writers would fork the chain."""

    code = "audit_busy"


class InjectError(MandateError):
    """A pod (or pod template) selected for injection cannot be injected: it is malformed
    where the sidecar must change it (the message names the field), uses a name or UID
    reserved for the sidecar, or asks for an unknown mode or an invalid agent id."""

    code = "inject_invalid"


class AgentStateError(MandateError):
    """The agent context API refused a request (bad task, unknown elevation, missing
    justification, too many pending requests...). ``status`` is the gRPC status name the
    API answers with: INVALID_ARGUMENT, NOT_FOUND, FAILED_PRECONDITION, RESOURCE_EXHAUSTED,
    PERMISSION_DENIED."""

    code = "context_error"

    def __init__(self, message: str, status: str = "INVALID_ARGUMENT") -> None:
        super().__init__(message)
        self.status = status


class StateWriteError(MandateError):
    """A state file (the revocation table's ``revocations.json``, ...) could not be written,
    so what is in force now would not survive a restart. ``file`` is the file, ``os_error``
    the OS error as text; the message names both. Callers that report to an operator turn it
    into an error answer: success is reported only for what is durable."""

    code = "state_not_durable"

    def __init__(self, file: str, os_error: str) -> None:
        super().__init__(f"cannot write {file}: {os_error}")
        self.file = file
        self.os_error = os_error


class CredentialUnavailable(MandateError):
    """A credential mandate should add to an allowed call cannot be had now (its file is
    missing or unreadable, the token endpoint or STS is down, slow or refused, no signing
    key). The call is refused (`credential_unavailable`, HTTP 503), never sent without it.
    The message names the credential and what failed, never a secret or token value."""

    code = "credential_unavailable"
