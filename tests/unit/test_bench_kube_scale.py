"""The pure parts of bench/kube_scale.py (python -m bench kube_scale): how an API request is
classified, the per-phase differences, the line fitted through N = 1, 10, 100 and the idle
rate of watch requests. The benchmark itself is run by hand, never by tests."""

from __future__ import annotations

import math

import pytest

from bench.kube_scale import (
    count_kinds,
    delta,
    extrapolate,
    idle_requests_per_second,
    linear_fit,
    percentile,
    request_kind,
)

NS = "/apis/mandate.dev/v1alpha1/namespaces/agents"


@pytest.mark.parametrize(
    ("method", "path", "params", "kind"),
    [
        ("GET", f"{NS}/agentrevocations", {"watch": "true"}, "watch"),
        ("GET", f"{NS}/agentrevocations", {"watch": "1", "resourceVersion": "7"}, "watch"),
        ("GET", f"{NS}/agentrevocations", {"limit": "500"}, "list"),
        ("GET", f"{NS}/agentelevations", {}, "list"),
        ("PATCH", f"{NS}/agentrevocations/a/status", {}, "status_patch"),
        ("GET", f"{NS}/agentrevocations/a/status", {}, "status_get"),
        ("POST", "/api/v1/namespaces/agents/events", {}, "event_post"),
        ("GET", f"{NS}/agentrevocations/a", {}, "other"),
        ("GET", "/api/v1/namespaces/agents", {}, "other"),
        ("GET", "/apis", {}, "other"),
        ("get", f"{NS}/agentrevocations", {"watch": "false"}, "list"),
    ],
)
def test_request_kind(method: str, path: str, params: dict[str, str], kind: str) -> None:
    assert request_kind(method, path, params) == kind


def test_count_kinds_has_every_kind() -> None:
    counts = count_kinds(
        [
            ("POST", "/api/v1/namespaces/agents/events", {}),
            ("POST", "/api/v1/namespaces/agents/events", {}),
            ("GET", f"{NS}/agentrevocations", {"watch": "true"}),
        ]
    )
    assert counts == {
        "watch": 1,
        "list": 0,
        "status_patch": 0,
        "status_get": 0,
        "event_post": 2,
        "other": 0,
    }


def test_delta_subtracts_numbers_recursively_and_keeps_the_rest() -> None:
    before = {"cpu_s": 1.5, "requests": {"watch": 2, "list": 1}, "open": 3, "name": "x"}
    after = {"cpu_s": 2.0, "requests": {"watch": 5, "list": 1, "new": 4}, "open": 3, "name": "y"}
    assert delta(after, before) == {
        "cpu_s": 0.5,
        "requests": {"watch": 3, "list": 0, "new": 4},
        "open": 0,
        "name": "y",
    }


def test_linear_fit_and_extrapolation() -> None:
    # 3 N - 1 (every pod posts and patches, all but one re-read): exact through 1, 10, 100.
    points = [(1.0, 2.0), (10.0, 29.0), (100.0, 299.0)]
    a, b = linear_fit(points)
    assert a == pytest.approx(-1.0) and b == pytest.approx(3.0)
    assert extrapolate(points, 1000) == pytest.approx(2999.0)
    # Constant figures stay constant; a fit below zero is clamped.
    assert extrapolate([(1, 1.0), (10, 1.0), (100, 1.0)], 1000) == pytest.approx(1.0)
    assert extrapolate([(1, 5.0), (10, 2.0)], 1000) == 0.0
    assert linear_fit([(10.0, 4.0)]) == (4.0, 0.0)
    with pytest.raises(ValueError):
        linear_fit([])


def test_idle_rate_is_two_watches_per_pod_per_mean_timeout() -> None:
    assert idle_requests_per_second(1000) == pytest.approx(2000 / 270)
    assert idle_requests_per_second(1, watchers=1, timeout=(10.0, 10.0)) == pytest.approx(0.1)


def test_percentile_nearest_rank() -> None:
    assert percentile([3.0, 1.0, 2.0], 50) == 2.0
    assert percentile([3.0, 1.0, 2.0], 100) == 3.0
    assert percentile([5.0], 1) == 5.0
    assert math.isnan(percentile([], 50))
