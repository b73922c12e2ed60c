"""Through real Envoy over gRPC with `mandate run --grpc-server aio` (grpc.aio on a loop of
its own, check.grpc_aio): test_enforcement's tests, against a stack of this shape.

The `stack` fixture here overrides conftest's (which runs once per transport, with the
default gRPC server); the tests are test_enforcement's own functions, collected again in
this module. That the worker really serves on the aio loop, not the thread-pool fallback,
is checked from its log (a fallback logs a warning instead of the aio server's line)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from .conftest import Stack, start_stack, stop_stack
from .test_enforcement import (  # noqa: F401  (collected here, against this module's stack)
    test_a_smuggled_path_prefix_gains_nothing,
    test_allowed_call_reaches_upstream_with_mandate_headers,
    test_connect_tunnels_are_authorised_by_host_and_port,
    test_denied_call_gets_403_json_and_never_leaves,
    test_dot_segments_cannot_escape_into_a_denied_prefix,
    test_header_based_purpose_is_case_insensitive_and_rules_are_per_agent,
    test_mcp_body_over_the_limit_is_truncated_and_denied,
    test_mcp_tools_are_authorised_from_the_body,
    test_outside_purpose_and_unknown_purpose,
    test_spoofed_identity_header_gains_nothing,
)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    s = start_stack(
        tmp_path_factory.mktemp("e2e-grpc-aio"), transport="grpc", extra=["--grpc-server", "aio"]
    )
    yield s
    stop_stack(s)


def test_the_aio_shape_serves_without_falling_back(stack: Stack) -> None:
    resp = stack.call(
        "billing-agent", "GET", "http://ledger.finance.svc.cluster.local/v1/invoices/1"
    )
    assert resp.status == 200, resp.body
    log = stack.mandate.log_path.read_text()
    assert "serving Checks with grpc.aio on the loop thread check-aio" in log, log[-2000:]
    assert "cannot run on grpcio" not in log
