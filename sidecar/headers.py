"""The `x-mandate-*` header names: one place for every module that reads or sets them.

What mandate sets on an allowed upstream request (removing any value the agent sent):
`x-mandate-agent`, `x-mandate-purpose`, `x-mandate-task`, `x-mandate-decision`. What an
agent may send to declare its context (selecting among rights it already has):
`x-mandate-purpose`, `x-mandate-task`. The rest pass only between Envoy and mandate's HTTP
transport (`envoy/*-http.yaml`) and never reach an upstream.

Names only: light enough for the agent client (`sidecar.agentapi.client`) to import."""

from __future__ import annotations

import re

__all__ = [
    "AGENT_HEADER",
    "CALL_HEADER",
    "CODE_HEADER",
    "CREDENTIAL_HEADERS",
    "DECISION_HEADER",
    "LENGTH_HEADER",
    "LOG_AGENT_HEADER",
    "OUTCOME_HEADER",
    "OWN_PREFIXES",
    "PURPOSE_HEADER",
    "SCHEME_HEADER",
    "SET_HEADERS",
    "TASK_HEADER",
    "TASK_ID",
    "TASK_ID_RULE",
    "TXN_TOKEN_HEADER",
]

# Set by mandate on an allowed upstream request.
AGENT_HEADER = "x-mandate-agent"
DECISION_HEADER = "x-mandate-decision"
PURPOSE_HEADER = "x-mandate-purpose"  # also what an agent may declare
TASK_HEADER = "x-mandate-task"  # also what an agent may declare
SET_HEADERS = (AGENT_HEADER, PURPOSE_HEADER, TASK_HEADER, DECISION_HEADER)

# A task id (`ReportTask`, `x-mandate-task`): 1-128 visible ASCII characters but the comma,
# since Envoy joins a header sent twice with "," (`T1` twice arrives as `T1,T1`: a value that
# named no task would escape the task's declaration).
TASK_ID = re.compile(r"[\x21-\x2b\x2d-\x7e]{1,128}")
TASK_ID_RULE = "1-128 visible ASCII characters, no comma"

# Every spelling of "x-mandate-" that a CGI/WSGI upstream folds into HTTP_X_MANDATE_: an
# agent's `x_mandate_agent` would sit next to the x-mandate-agent mandate sets. envoy/
# refuses header names with "_" (headers_with_underscores_action); the Check pipeline
# removes them too, for an Envoy configured otherwise.
OWN_PREFIXES = ("x-mandate-", "x_mandate_", "x-mandate_", "x_mandate-")

# Between Envoy and the HTTP transport only (envoy/*-http.yaml).
OUTCOME_HEADER = "x-mandate-outcome"
CODE_HEADER = "x-mandate-code"  # for Envoy's access logs only (dynamic metadata)
LOG_AGENT_HEADER = "x-mandate-log-agent"  # for Envoy's access logs only (dynamic metadata)
CALL_HEADER = "x-mandate-call"  # the call's facts for behaviour analysis (dynamic metadata)
LENGTH_HEADER = "x-mandate-content-length"
SCHEME_HEADER = "x-mandate-scheme"

# Credentials (issue 17): the headers mandate may set on an allowed call to a host that has a
# credential, and removes when the agent sent them there (it holds no credential, so one it
# sends is not its own). The HTTP transport's Envoy configs copy exactly these from mandate's
# answer (`allowed_upstream_headers`), so a profile may name only these.
TXN_TOKEN_HEADER = "txn-token"
CREDENTIAL_HEADERS = ("authorization", "x-api-key", "api-key", "x-auth-token", TXN_TOKEN_HEADER)
