"""The fleet view in the metrics (issue 19, items 8 and 9): which build, which profile
version and which revocation set each pod enforces, as values Prometheus can compare across
pods without any pod writing to the API server; the elevation and watch metrics; and the
delay (`draw`) that lets one pod of many make a write all of them would make."""

from __future__ import annotations

import platform
import statistics
from dataclasses import replace
from importlib import metadata

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from sidecar import __version__
from sidecar.core.agentstate import ElevationRequest, Grant
from sidecar.core.revocation import Revocation
from sidecar.kube.reporter import draw
from sidecar.telemetry import metrics

NOW = 1_000_000.0


def rev(name: str, source: str = "kubernetes", **fields: object) -> Revocation:
    base = Revocation(
        key=f"{source}:agents/{name}",
        agent="billing-agent",
        namespace="agents",
        reason=f"reason {name}",
        source=source,
        name=name,
        uid=f"uid-{name}",
        created_at=NOW - 10,
    )
    return replace(base, **fields)  # type: ignore[arg-type]


def value(name: str, **labels: str) -> float | None:
    return metrics.REGISTRY.get_sample_value(name, labels)


def test_the_revocation_set_hash_is_the_same_for_the_same_objects_in_any_order() -> None:
    a, b = rev("a"), rev("b", expires_at=NOW + 60)
    h = metrics.revocation_set_hash([a, b])
    assert h == metrics.revocation_set_hash([b, a])
    assert 0 < h < 2**52 and float(h) == h  # exact as a float64 sample
    # Another object, another uid (deleted and created again), another reason or end: another set.
    assert metrics.revocation_set_hash([a]) != h
    assert metrics.revocation_set_hash([a, replace(b, uid="uid-b2")]) != h
    assert metrics.revocation_set_hash([a, replace(b, reason="other")]) != h
    assert metrics.revocation_set_hash([a, replace(b, expires_at=NOW + 61)]) != h
    # What one pod alone revoked (admin API, behaviour) is no part of the namespace's set.
    local = [rev("x", source="admin"), rev("y", source="behaviour")]
    assert metrics.revocation_set_hash([a, b, *local]) == h
    assert metrics.revocation_set_hash(local) == 0
    assert metrics.revocation_set_hash([]) == 0


def test_observe_revocations_sets_counts_and_the_hash_exactly_in_the_exposition() -> None:
    entries = [rev("a"), rev("old", expires_at=NOW - 1), rev("mine", source="admin")]
    metrics.observe_revocations(entries, NOW)
    assert value("mandate_revocations", source="kubernetes", active="true") == 1
    assert value("mandate_revocations", source="kubernetes", active="false") == 1
    assert value("mandate_revocations", source="admin", active="true") == 1
    assert value("mandate_revocations", source="behaviour", active="true") == 0
    expected = metrics.revocation_set_hash(entries)
    text = generate_latest(metrics.REGISTRY).decode()
    [family] = [
        f for f in text_string_to_metric_families(text) if f.name == "mandate_revocation_set_hash"
    ]
    # The text format carries the 52-bit number exactly (what count_values groups by).
    assert family.samples[0].value == expected


def test_profiles_info_is_one_for_the_version_in_force_only() -> None:
    metrics.observe_reload(True, 3, "aaaaaaaaaaaa")
    assert value("mandate_profiles_info", version="aaaaaaaaaaaa") == 1
    metrics.observe_reload(False)  # a failed reload keeps the version in force
    assert value("mandate_profiles_info", version="aaaaaaaaaaaa") == 1
    assert value("mandate_profiles_stale") == 1
    metrics.observe_reload(True, 3, "bbbbbbbbbbbb")
    assert value("mandate_profiles_info", version="bbbbbbbbbbbb") == 1
    assert value("mandate_profiles_info", version="aaaaaaaaaaaa") == 0
    assert value("mandate_profiles_stale") == 0


def test_build_info_names_this_build() -> None:
    assert (
        value(
            "mandate_build_info",
            version=__version__,
            python=platform.python_version(),
            grpc=metadata.version("grpcio"),
        )
        == 1
    )


def test_elevation_gauges_count_active_grants_and_pending_requests_per_agent() -> None:
    def grant(gid: str, agent: str, end: float) -> Grant:
        return Grant(gid, agent, "agents", "refund", NOW - 10, end, "alice")

    def request(rid: str, agent: str, state: str) -> ElevationRequest:
        return ElevationRequest(rid, agent, "agents", "refund", "why", NOW - 5, 60.0, state)

    metrics.observe_elevations(
        [
            grant("g1", "fleet-a", NOW + 60),
            grant("g2", "fleet-a", NOW + 5),
            grant("g3", "fleet-b", NOW - 1),
        ],
        [request("r1", "fleet-b", "pending"), request("r2", "fleet-b", "granted")],
        NOW,
    )
    assert value("mandate_elevation_grants", agent="fleet-a") == 2
    assert value("mandate_elevation_grants", agent="fleet-b") == 0  # ended
    assert value("mandate_elevation_requests_pending", agent="fleet-b") == 1
    assert value("mandate_elevation_requests_pending", agent="fleet-a") == 0
    metrics.observe_elevations([], [], NOW)  # all gone: every agent seen reads 0
    assert value("mandate_elevation_grants", agent="fleet-a") == 0
    assert value("mandate_elevation_requests_pending", agent="fleet-b") == 0


def test_elevation_events_and_approvals_are_bounded() -> None:
    before = value("mandate_elevation_events_total", event="granted") or 0
    metrics.observe_elevation_event("elevation_granted")
    metrics.observe_elevation_event("task_reported")  # not an elevation event
    metrics.observe_elevation_event("elevation_invented")  # not a known one
    assert value("mandate_elevation_events_total", event="granted") == before + 1
    assert value("mandate_elevation_events_total", event="invented") is None
    for result in metrics.APPROVAL_RESULTS:  # present at 0 before the first approval
        assert value("mandate_elevation_approvals_total", result=result) is not None
    granted = value("mandate_elevation_approvals_total", result="granted") or 0
    metrics.observe_approval("Granted")
    metrics.observe_approval("")
    metrics.observe_approval("Bogus")
    assert value("mandate_elevation_approvals_total", result="granted") == granted + 1
    assert value("mandate_elevation_approvals_total", result="bogus") is None


def test_watch_metrics_from_a_watchers_status() -> None:
    metrics.observe_watch(
        "agentelevations",
        {"connected": True, "refused": None, "last_sync_at": NOW, "lists": 2},
    )
    assert value("mandate_kubernetes_watch_connected", resource="agentelevations") == 1
    assert value("mandate_kubernetes_refused", resource="agentelevations") == 0
    assert (
        value("mandate_kubernetes_last_sync_timestamp_seconds", resource="agentelevations") == NOW
    )
    lists = value("mandate_kubernetes_lists_total", resource="agentelevations") or 0
    metrics.observe_watch(
        "agentelevations", {"connected": False, "refused": "403 Forbidden", "lists": 3}
    )
    assert value("mandate_kubernetes_watch_connected", resource="agentelevations") == 0
    assert value("mandate_kubernetes_refused", resource="agentelevations") == 1
    assert value("mandate_kubernetes_lists_total", resource="agentelevations") == lists + 1


def test_draw_is_stable_uniform_and_spreads_the_first_writer_over_pods() -> None:
    pods = [f"agent-pod-{i}" for i in range(400)]
    draws = [draw(p, "uid-1") for p in pods]
    assert draws == [draw(p, "uid-1") for p in pods]
    assert all(0.0 <= d < 1.0 for d in draws)
    assert abs(statistics.mean(draws) - 0.5) < 0.05
    # Different objects are first reported by different pods (no one pod does all writes).
    firsts = {min(pods[:20], key=lambda p, u=f"uid-{i}": draw(p, u)) for i in range(50)}
    assert len(firsts) > 5
