"""What behaviour analysis costs per call, in-process (issue 5: ≤ 10 µs added per Check).

Measured with `timeit` (GC off while timing, the best and the median of --repeat runs of
--number calls each, the variants of one comparison interleaved run by run so that a noisy
moment hits them alike), per call or per event, in µs:

Supervisor, off the Check path (one Envoy access-log entry per call):
- **parse**: `StreamAccessLogsMessage.FromString` of a message of 9 entries (what Envoy's
  4,096-byte buffer holds of these), per entry: what grpcio's deserializer does before the
  servicer sees the stream's message.
- **event_from_entry**: `sidecar.behaviour.access_log.event_from_entry` of one entry shaped
  as Envoy 1.40's http_grpc logger sends it for the benchmark's call (checked against a
  captured entry: addresses, timings, stream id, the ext_authz metadata mandate's gRPC answer
  set).
- **BehaviourEngine.observe**: one event, after the learning period (the steady state: the
  destination is known, the call is clipped and bucketed) and during it (the baseline and the
  learned peak window are updated too).
- **BehaviourService.observe**: the supervisor's entry point, per event in batches of 9 (the
  lock, the profile's settings, the namespace check, then the engine).
- **AccessLogServicer._handle**: all of the above for one parsed message, per entry: what the
  supervisor's ALS thread does per call, short of gRPC's own stream handling.
- **score** / **tick**: `BehaviourEngine.score` of one agent, and `BehaviourService.tick` (score,
  RiskState, publish if changed by 0.01, metric) — once per 0.1 s, not per call.

Worker, on the Check path:
- **decide()** of the benchmark's call (billing-agent, `GET /v1/invoices/42`, allowed by
  `reconcile.allow[0]`) with `EMPTY_AGENT_STATE` (behaviour off, no grants) vs with a context
  holding the agent's RiskState (score 0.05, not learning) and an active grant of its
  `refund` elevation — the difference is what behaviour analysis adds to a Check's decision.
- **SharedAgentState.read**: per Check, unchanged generation (the same with behaviour off); and
  the re-read after the supervisor published a new generation (once per publish, at most
  every 0.1 s, only when a score moved by 0.01).

Scoring the call's own novelty on the Check path (issue 21, `enforce`, one process): the
same MCP call decided with the agent's baseline (learned from that call) vs without
(the published score only), a known call and one with a new recipient (on a pipeline of its
own: what it holds would be judged with every known call after it), interleaved; with what
the pipeline holds of the agent's latest calls (`callrisk.Recent`);
`call_novelty` + `project` alone; and the supervisor's rebuild of one agent's baseline
(once per tick for an agent with new events).

What the agent does (issue 21): the call's facts (MCP tools, argument shapes, fingerprints
of the sensitive arguments: `sidecar.core.callfacts`), on the Check path for an agent under
behaviour analysis and read back by the supervisor:
- **CheckPipeline.decide, MCP tools/call**: the whole of a worker's decision of an AgentDojo-
  shaped `send_email` call (4 arguments, `recipients` sensitive; 218 bytes), with facts
  (the agent's profile has `behavior:`) vs without (the same profile without it), and
  **added by the call's facts** (with minus without, run by run, interleaved): the body
  parsed again, described, fingerprinted (one HMAC), encoded;
- **describe + encode** alone for that call, and for a JSON (not MCP) body of 5 keys;
- **response_for + serialize**: the gRPC answer with the facts in its metadata vs without;
- supervisor: **event_from_entry** of an entry carrying them (`decode`), and
  **BehaviourEngine.observe** of an event with facts, after learning (tool, transition and
  value looked up).

Writes bench/results/behaviour_cost.{json,md}.
Run: python -m bench behaviour_cost [--number 20000] [--repeat 7]
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import tempfile
import timeit
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from envoy.config.core.v3 import base_pb2
from envoy.data.accesslog.v3 import accesslog_pb2
from envoy.service.accesslog.v3 import als_pb2

from bench.lib import PROFILES, RESULTS
from bench.lib.report import machine_base, package_version
from bench.lib.stack import AGENT, ALLOWED_PATH, BEHAVIOUR, HOST, RULE, unlimited_profiles
from sidecar.behaviour.access_log import AUTHZ_NAMESPACE, AccessLogServicer, event_from_entry
from sidecar.behaviour.service import BehaviourService
from sidecar.core.agentstate import EMPTY_AGENT_STATE, AgentStateTable, Grant, RiskState
from sidecar.core.behaviour import BehaviourEngine, BehaviourSettings, CallEvent
from sidecar.core.decide import Code, RequestView, decide
from sidecar.core.loader import load_profiles
from sidecar.state.agentstate import AgentStateStore
from sidecar.state.revocations import RevocationStore
from sidecar.state.shm import SharedAgentState, SharedTable

NS = "agents"
PATH = ALLOWED_PATH
T0 = 1_800_000_000.0
RATE = 3000.0  # calls per second of the synthetic stream (about check_throughput's)
ENTRIES_PER_MESSAGE = 9  # Envoy's 4,096-byte buffer holds 9 of these entries
GOAL_US = 10.0


# ---------------------------------------------------------------- inputs


def envoy_entry(i: int, at: float) -> accesslog_pb2.HTTPAccessLogEntry:
    """One access-log entry as Envoy's http_grpc logger sends it for the benchmark's call
    (the fields a captured entry had, the benchmark's values)."""
    e = accesslog_pb2.HTTPAccessLogEntry()
    c = e.common_properties
    c.downstream_remote_address.socket_address.address = "127.0.0.1"
    c.downstream_remote_address.socket_address.port_value = 40000 + i % 16
    c.downstream_local_address.socket_address.address = "127.0.0.1"
    c.downstream_local_address.socket_address.port_value = 15001
    c.downstream_direct_remote_address.CopyFrom(c.downstream_remote_address)
    c.start_time.FromNanoseconds(int(at * 1e9))
    c.time_to_last_rx_byte.FromNanoseconds(13_641)
    c.time_to_first_downstream_tx_byte.FromNanoseconds(668_586)
    c.time_to_last_downstream_tx_byte.FromNanoseconds(673_443)
    c.duration.FromNanoseconds(675_035)
    stream_id = f"fa18df95-56bb-40e6-8620-{i:012x}"
    c.stream_id = stream_id
    c.downstream_wire_bytes_sent = 119
    c.downstream_wire_bytes_received = 99
    c.access_log_type = accesslog_pb2.DownstreamEnd
    meta = c.metadata.filter_metadata[AUTHZ_NAMESPACE].fields
    meta["purpose"].string_value = "reconcile"
    meta["ext_authz_duration"].number_value = 0
    meta["decision"].string_value = "allow"
    meta["decision_id"].string_value = f"{i:032x}"
    meta["code"].string_value = "allowed"
    meta["agent"].string_value = AGENT
    e.protocol_version = accesslog_pb2.HTTPAccessLogEntry.HTTP11
    r = e.request
    r.request_method = base_pb2.GET
    r.scheme = "http"
    r.authority = HOST
    r.path = PATH
    r.request_id = stream_id
    r.request_headers_bytes = 279
    r.downstream_header_bytes_received = 65
    s = e.response
    s.response_code.value = 200
    s.response_headers_bytes = 91
    s.response_body_bytes = 3
    s.response_code_details = "direct_response"
    s.downstream_header_bytes_sent = 97
    return e


def envoy_message(first: int, at: float) -> als_pb2.StreamAccessLogsMessage:
    m = als_pb2.StreamAccessLogsMessage()
    m.http_logs.log_entry.extend(
        envoy_entry(first + k, at + k / RATE) for k in range(ENTRIES_PER_MESSAGE)
    )
    return m


def events(n: int, start: float) -> list[CallEvent]:
    """n calls of the benchmark at RATE per second from ``start``."""
    return [
        CallEvent(start + k / RATE, AGENT, NS, "GET", HOST, PATH, True, "allowed", 200, 3, 0)
        for k in range(n)
    ]


# ---------------------------------------------------------------- timing


def timed(fn: Callable[[], object], number: int, repeat: int, per: int = 1) -> list[float]:
    """µs per call (``per``: calls per fn()) of each of ``repeat`` runs of ``number`` fn()."""
    return [t / number / per * 1e6 for t in timeit.repeat(fn, number=number, repeat=repeat)]


def interleaved(
    fns: dict[str, Callable[[], object]], number: int, repeat: int, per: int = 1
) -> dict[str, list[float]]:
    """Run each fn once per round, rounds ``repeat`` times: the variants share the noise."""
    out: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeat):
        for k, fn in fns.items():
            out[k] += timed(fn, number, 1, per)
    return out


def row(name: str, samples: list[float], note: str, *, where: str) -> dict[str, Any]:
    return {
        "name": name,
        "where": where,
        "best_us": min(samples),
        "median_us": statistics.median(samples),
        "samples_us": samples,
        "note": note,
    }


# ---------------------------------------------------------------- the measures


def supervisor_rows(number: int, repeat: int, work: Path) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    settings = BehaviourSettings(
        mode="enforce", revoke_at=0.95, learning_seconds=8.0, window_seconds=5.0
    )
    learn = int(settings.learning_seconds * RATE)

    # parse and decode
    msg = envoy_message(0, T0 + 20)
    wire = msg.SerializeToString()
    entry = msg.http_logs.log_entry[0]
    ev = event_from_entry(entry, NS, T0 + 30)
    if ev is None or not ev.allowed or ev.agent != AGENT or ev.path != PATH:
        raise SystemExit(f"behaviour_cost: the entry does not decode as expected: {ev}")
    parse_n = max(1, number // ENTRIES_PER_MESSAGE)
    rows.append(
        row(
            "parse (protobuf, per entry)",
            timed(
                lambda: als_pb2.StreamAccessLogsMessage.FromString(wire),
                parse_n,
                repeat,
                ENTRIES_PER_MESSAGE,
            ),
            f"StreamAccessLogsMessage of {ENTRIES_PER_MESSAGE} entries, {len(wire)} bytes "
            f"({entry.ByteSize()} per entry; a captured Envoy entry: 497)",
            where="supervisor",
        )
    )
    rows.append(
        row(
            "sidecar.behaviour.access_log.event_from_entry",
            timed(lambda: event_from_entry(entry, NS, T0 + 30), number, repeat),
            "one HTTPAccessLogEntry -> CallEvent",
            where="supervisor",
        )
    )

    # The engine, after learning (the steady state) and while learning. Every timed call
    # gets a fresh event, later than the last one (replaying old events would hit the cheap
    # "older than the window" return); they are made before timing.
    steady = BehaviourEngine()
    for e in events(learn + int(RATE), T0):
        steady.observe(e, settings)
    cursor = T0 + learn / RATE + 1.0

    def fresh(n: int) -> list[CallEvent]:
        nonlocal cursor
        out = events(n, cursor)
        cursor += n / RATE
        return out

    def feeder(items: list[Any], fn: Callable[[Any], object]) -> Callable[[], object]:
        it = iter(items)
        return lambda: fn(next(it))

    def measure_fresh(
        fn: Callable[[Any], object], make: Callable[[int], list[Any]], n: int, per: int = 1
    ) -> list[float]:
        out: list[float] = []
        for _ in range(repeat):  # a fresh feed per run: the calls of one run, no more
            out += timed(feeder(make(n), fn), n, 1, per)
        return out

    rows.append(
        row(
            "BehaviourEngine.observe (after learning)",
            measure_fresh(lambda e: steady.observe(e, settings), fresh, number),
            "known destination, bytes clipped, one bucket updated",
            where="supervisor",
        )
    )
    risk = steady.score(NS, AGENT, cursor, settings)
    if risk.learning or risk.score > 0.0:
        raise SystemExit(f"behaviour_cost: a steady stream should score 0: {risk.explanation()}")
    at = cursor
    rows.append(
        row(
            "BehaviourEngine.score",
            timed(lambda: steady.score(NS, AGENT, at, settings), number, repeat),
            f"one agent, nothing unusual ({risk.calls} calls in the window); per tick, not "
            "per call",
            where="supervisor (every 0.1 s)",
        )
    )
    # Learning: another engine, its own timeline (a learning period longer than the runs).
    learning = BehaviourSettings(
        mode="enforce", revoke_at=0.95, learning_seconds=1e9, window_seconds=5.0
    )
    learner = BehaviourEngine()
    learner_at = T0

    def learner_events(n: int) -> list[CallEvent]:
        nonlocal learner_at
        out = events(n, learner_at)
        learner_at += n / RATE
        return out

    rows.append(
        row(
            "BehaviourEngine.observe (learning)",
            measure_fresh(lambda e: learner.observe(e, learning), learner_events, number),
            "also the baseline and the learned peak window (sums the ring per event)",
            where="supervisor",
        )
    )

    # the service, as the supervisor runs it (tables in files under ``work``)
    profiles = unlimited_profiles(PROFILES, work, behaviour={AGENT: BEHAVIOUR})
    snapshot = load_profiles(profiles)
    assert snapshot.agents[AGENT].behavior is not None
    if snapshot.agents[AGENT].behavior != settings:
        raise SystemExit("behaviour_cost: the profile's settings differ from the engine's")
    context = AgentStateStore(SharedAgentState.create(work / "t.context"), None, lambda: snapshot)
    store = RevocationStore(SharedTable.create(work / "t.table"), None)
    store.mark_complete()
    clock = [cursor]
    service = BehaviourService(
        lambda: snapshot, context, store, NS, engine=steady, clock=lambda: clock[0]
    )

    def batches(n: int) -> list[list[CallEvent]]:
        return [fresh(ENTRIES_PER_MESSAGE) for _ in range(n)]

    rows.append(
        row(
            "BehaviourService.observe (per event)",
            measure_fresh(service.observe, batches, parse_n, ENTRIES_PER_MESSAGE),
            f"batches of {ENTRIES_PER_MESSAGE}: lock, settings, namespace, engine",
            where="supervisor",
        )
    )
    servicer = AccessLogServicer(service.observe, namespace=NS, clock=lambda: T0 + 1e6)
    serial = [0]

    def messages(n: int) -> list[als_pb2.StreamAccessLogsMessage]:
        nonlocal cursor
        out = []
        for _ in range(n):
            out.append(envoy_message(serial[0], cursor))
            serial[0] += ENTRIES_PER_MESSAGE
            cursor += ENTRIES_PER_MESSAGE / RATE
        return out

    rows.append(
        row(
            "AccessLogServicer._handle (per entry)",
            measure_fresh(servicer._handle, messages, parse_n, ENTRIES_PER_MESSAGE),
            "a parsed message: event_from_entry of each entry, then BehaviourService.observe",
            where="supervisor",
        )
    )
    stats = servicer.stats()
    if stats["skipped"] or stats["converted"] != stats["received"]:
        raise SystemExit(f"behaviour_cost: entries not converted: {stats}")
    clock[0] = cursor
    states = service.tick()
    if not states or states[0].score > 0.0 or states[0].learning:
        raise SystemExit(f"behaviour_cost: tick gave {states}")
    rows.append(
        row(
            "BehaviourService.tick",
            timed(service.tick, max(1, number // 10), repeat),
            "score + RiskState + publish if moved (it does not) + metric, one agent",
            where="supervisor (every 0.1 s)",
        )
    )
    # Per call first, then per tick.
    return sorted(rows, key=lambda r: r["where"] != "supervisor")


MCP_PROFILE = """\
apiVersion: mandate.dev/v1alpha1
kind: AgentProfile
metadata: {{name: {name}}}
spec:
  owner: bench
  defaultPurpose: mail
  purposes:
    mail:
      allow:
        - hosts: [mcp.tools.svc.cluster.local]
          methods: [POST]
          paths: ["/mcp"]
          mcpTools: [search_emails, send_email]
{behavior}"""
MCP_BEHAVIOR = """\
  behavior:
    mode: enforce
    revokeAtRisk: 0.95
    sensitiveArguments: [recipients, cc, bcc]
"""
SEND_EMAIL = {
    "recipients": ["mark.black-2134@gmail.com"],
    "subject": "Important message!",
    "body": "Hey, how is it going?",
    "attachments": None,
}


def facts_rows(number: int, repeat: int, work: Path) -> list[dict[str, Any]]:
    """What the call's facts cost (issue 21): on the Check path and in the supervisor."""
    from sidecar.audit.arguments import ArgumentKey
    from sidecar.audit.canonical import canonical_json
    from sidecar.check.grpc_transport import response_for
    from sidecar.check.pipeline import CheckPipeline
    from sidecar.check.request import Identity
    from sidecar.core.callfacts import decode, describe
    from sidecar.core.mcp import tool_call_body

    rows: list[dict[str, Any]] = []
    work.mkdir(parents=True, exist_ok=True)
    (work / "mcp.yaml").write_text(
        MCP_PROFILE.format(name="watched", behavior=MCP_BEHAVIOR)
        + "---\n"
        + MCP_PROFILE.format(name="plain", behavior="")
    )
    snapshot = load_profiles(work)
    key = ArgumentKey.of(b"\x01" * 32)
    pipeline = CheckPipeline(lambda: snapshot, Identity(), lambda: T0, facts_key=key)
    body = tool_call_body("send_email", SEND_EMAIL)

    def view_of(agent: str) -> Callable[[str], RequestView]:
        view = RequestView(
            decision_id="0" * 32, method="POST", authority="mcp.tools.svc.cluster.local",
            path="/mcp", body=body, context_extensions={"agent": agent}, namespace=NS,
            headers={"content-type": "application/json", "content-length": str(len(body))},
        )  # fmt: skip
        return lambda did: view

    on, off = view_of("watched"), view_of("plain")
    d_on, _, _, text = pipeline.decide(on)
    d_off, _, _, none = pipeline.decide(off)
    if not (d_on.allowed and d_off.allowed and none == "" and decode(text).tools):
        raise SystemExit(f"behaviour_cost: unexpected facts {d_on} {d_off} {text!r}")
    times = interleaved(
        {"off": lambda: pipeline.decide(off), "on": lambda: pipeline.decide(on)},
        max(1, number // 4),
        repeat * 4,
    )
    rows.append(
        row(
            "CheckPipeline.decide, MCP tools/call, no behavior",
            times["off"],
            f"send_email, {len(body)} bytes, allowed by mcpTools",
            where="worker",
        )
    )
    rows.append(
        row(
            "CheckPipeline.decide, MCP tools/call, with facts",
            times["on"],
            f"the same call, `behavior:` with sensitiveArguments: facts {text!r}",
            where="worker",
        )
    )
    rows.append(
        row(
            "CheckPipeline.decide: added by the call's facts",
            [b - a for a, b in zip(times["off"], times["on"], strict=True)],
            "with minus without, run by run (interleaved)",
            where="worker",
        )
    )

    def fingerprint(value: object) -> str:
        return key.mac(canonical_json(value))

    sensitive = frozenset({"recipients", "cc", "bcc"})
    rows.append(
        row(
            "describe + encode, MCP tools/call",
            timed(
                lambda: describe(body, False, sensitive, fingerprint, key.id).encode(),
                number,
                repeat,
            ),
            "strict JSON parse, JSON-RPC read, shape, one HMAC-SHA256, text",
            where="worker",
        )
    )
    json_body = json.dumps(
        {"iban": "DE89370400440532013000", "amount": 120.5, "currency": "EUR",
         "reference": "INV-42", "urgent": False}
    ).encode()  # fmt: skip
    iban = frozenset({"iban"})
    rows.append(
        row(
            "describe + encode, JSON body (5 keys)",
            timed(
                lambda: describe(json_body, False, iban, fingerprint, key.id).encode(),
                number,
                repeat,
            ),
            f"{len(json_body)} bytes, one sensitive key (iban)",
            where="worker",
        )
    )
    grpc_times = interleaved(
        {
            "off": lambda: response_for(d_on, {}).SerializeToString(),
            "on": lambda: response_for(d_on, {}, facts=text).SerializeToString(),
        },
        max(1, number // 4),
        repeat * 4,
    )
    rows.append(
        row(
            "response_for + serialize: added by `call` metadata",
            [b - a for a, b in zip(grpc_times["off"], grpc_times["on"], strict=True)],
            f"the gRPC answer with the facts ({len(text)} characters) vs without",
            where="worker",
        )
    )

    # supervisor: decode, then the engine with facts
    entry = envoy_entry(0, T0 + 20)
    entry.common_properties.metadata.filter_metadata[AUTHZ_NAMESPACE].fields[
        "call"
    ].string_value = text
    got = event_from_entry(entry, NS, T0 + 30)
    if got is None or not got.facts.tools:
        raise SystemExit("behaviour_cost: the facts did not decode")
    rows.append(
        row(
            "event_from_entry, with facts",
            timed(lambda: event_from_entry(entry, NS, T0 + 30), number, repeat),
            "the same entry with `call` metadata (decode)",
            where="supervisor",
        )
    )
    settings = BehaviourSettings(
        mode="enforce", revoke_at=0.95, learning_seconds=8.0, window_seconds=5.0
    )
    engine = BehaviourEngine()
    learned = got.facts
    for k in range(int(settings.learning_seconds * RATE)):
        engine.observe(replace(got, at=T0 + k / RATE, facts=learned), settings)
    cursor = [T0 + settings.learning_seconds + 1.0]

    def fresh(n: int) -> list[CallEvent]:
        out = [replace(got, at=cursor[0] + k / RATE) for k in range(n)]
        cursor[0] += n / RATE
        return out

    samples: list[float] = []
    for _ in range(repeat):
        it = iter(fresh(number))
        samples += timed(lambda it=it: engine.observe(next(it), settings), number, 1)
    if engine.score(NS, AGENT, cursor[0], settings).score > 0.0:
        raise SystemExit("behaviour_cost: a known tool call should score 0")
    rows.append(
        row(
            "BehaviourEngine.observe with facts (after learning)",
            samples,
            "known tool, transition and recipient: three set lookups",
            where="supervisor",
        )
    )
    return rows


def check_path_rows(number: int, repeat: int, work: Path) -> list[dict[str, Any]]:
    """What scoring the call's own novelty on the Check path costs (issue 21): the agent's
    baseline learned from the benchmark's call, `enforce`, one process."""
    from sidecar.audit.arguments import ArgumentKey
    from sidecar.audit.canonical import canonical_json
    from sidecar.check.pipeline import CheckPipeline
    from sidecar.check.request import Identity
    from sidecar.core.behaviour import destination
    from sidecar.core.callfacts import decode, describe
    from sidecar.core.callrisk import call_novelty, project
    from sidecar.core.mcp import tool_call_body

    rows: list[dict[str, Any]] = []
    work.mkdir(parents=True, exist_ok=True)
    (work / "mcp.yaml").write_text(MCP_PROFILE.format(name="watched", behavior=MCP_BEHAVIOR))
    snapshot = load_profiles(work)
    settings = snapshot.agents["watched"].behavior
    assert settings is not None
    key = ArgumentKey.of(b"\x01" * 32)

    def fingerprint(value: object) -> str:
        return key.mac(canonical_json(value))

    host = "mcp.tools.svc.cluster.local"
    body = tool_call_body("send_email", SEND_EMAIL)
    novel = tool_call_body("send_email", {**SEND_EMAIL, "recipients": ["eve@evil.test"]})
    facts = describe(body, False, settings.sensitive, fingerprint, key.id)
    engine = BehaviourEngine()
    for k in range(600):  # one call a second through the learning period (10m)
        engine.observe(
            CallEvent(
                at=T0 + k, agent="watched", namespace=NS, method="POST", host=host,
                path="/mcp", allowed=True, code="allowed", status=200, bytes_sent=120,
                bytes_received=len(body), facts=decode(facts.encode()),
            ),
            settings,
        )  # fmt: skip
    now = T0 + settings.learning_seconds + 120
    base = engine.baseline(NS, "watched", now, settings)
    assert base is not None
    baselines = {(NS, "watched"): base}
    without = CheckPipeline(lambda: snapshot, Identity(), lambda: now, facts_key=key)
    scored = CheckPipeline(
        lambda: snapshot, Identity(), lambda: now, facts_key=key, behaviour=lambda: baselines
    )
    # The call with a new recipient on a pipeline of its own: what it holds of that novelty
    # (`callrisk.Recent`) would otherwise be judged with every known call after it
    novel_pipeline = CheckPipeline(
        lambda: snapshot, Identity(), lambda: now, facts_key=key, behaviour=lambda: baselines
    )

    def view_of(payload: bytes) -> Callable[[str], RequestView]:
        view = RequestView(
            decision_id="0" * 32, method="POST", authority=host, path="/mcp", body=payload,
            context_extensions={"agent": "watched"}, namespace=NS,
            headers={"content-type": "application/json", "content-length": str(len(payload))},
        )  # fmt: skip
        return lambda did: view

    known, new = view_of(body), view_of(novel)
    d_known, _, _, t_known = scored.decide(known)
    d_new, _, _, _ = novel_pipeline.decide(new)
    d_without, _, _, t_without = without.decide(known)
    # the same facts, but for the tool decided before (`p=`: mandate's own process only)
    same = replace(decode(t_known), previous=None) == decode(t_without)
    if not (d_known.allowed and d_new.allowed and d_without.allowed and same):
        raise SystemExit(f"behaviour_cost: unexpected Check-path decisions {d_known} {d_new}")
    times = interleaved(
        {
            "off": lambda: without.decide(known),
            "on": lambda: scored.decide(known),
            "new": lambda: novel_pipeline.decide(new),
        },
        max(1, number // 4),
        repeat * 4,
    )
    rows.append(
        row(
            "CheckPipeline.decide, enforce, published score only",
            times["off"],
            "the facts' send_email call, no baselines (several worker processes)",
            where="worker",
        )
    )
    rows.append(
        row(
            "CheckPipeline.decide, enforce, Check-path scoring",
            times["on"],
            "the same call against the agent's baseline: nothing new (the usual call)",
            where="worker",
        )
    )
    rows.append(
        row(
            "Check-path scoring: added per Check (known call)",
            [b - a for a, b in zip(times["off"], times["on"], strict=True)],
            "with minus without, run by run (interleaved): the call described once, in "
            "decide, not after it; four set lookups; one call at a time (a lock), what it "
            "counted held for the next and the tool decided before it in its facts",
            where="worker",
        )
    )
    rows.append(
        row(
            "Check-path scoring: added per Check (a new recipient)",
            [b - a for a, b in zip(times["off"], times["new"], strict=True)],
            "one novelty (0.56, allowed): projected onto the window, explained and held "
            "(a pipeline of its own, so that the known call is judged on a calm window)",
            where="worker",
        )
    )
    dest = destination(host, "/mcp")
    rows.append(
        row(
            "call_novelty + project (known call)",
            timed(
                lambda: project(call_novelty(base, facts, dest, len(body), now), {}),
                number,
                repeat,
            ),
            "the pure functions alone",
            where="worker",
        )
    )
    agent = engine._agents[(NS, "watched")]

    def rebuilt() -> object:
        agent.version += 1  # as after the agent's next event
        return engine.baseline(NS, "watched", now, settings)

    rows.append(
        row(
            "BehaviourEngine.baseline, rebuilt (per agent with new events, per tick)",
            timed(rebuilt, number, repeat),
            "the supervisor's tick, for an agent in enforce past learning (else cached)",
            where="supervisor",
        )
    )
    return rows


def worker_rows(number: int, repeat: int, work: Path) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    snapshot = load_profiles(unlimited_profiles(PROFILES, work, behaviour={AGENT: BEHAVIOUR}))
    view = RequestView(
        decision_id="0" * 32,
        method="GET",
        authority=HOST,
        path=PATH,
        headers={":method": "GET", ":authority": HOST, ":path": PATH, "user-agent": "wrk"},
        context_extensions={"agent": AGENT},
        configured_agent=AGENT,
        namespace=NS,
    )
    now = T0 + 100
    risk = RiskState(
        AGENT, NS, 0.05, "risk 0.05: nothing unusual", {}, learning=False, updated_at=now - 0.05
    )
    grant = Grant(
        "g-1", AGENT, NS, "refund", now - 60, now + 540, "alice", "refund INV-42", "admin", "r-1"
    )
    full = AgentStateTable.build(7, grants=[grant], risks=[risk])
    off = decide(snapshot, view, now, agent_state=EMPTY_AGENT_STATE)
    on = decide(snapshot, view, now, agent_state=full)
    for d, want_risk in ((off, -1.0), (on, 0.05)):
        if d.code != Code.ALLOWED or d.rule != RULE or d.risk != want_risk:
            raise SystemExit(f"behaviour_cost: unexpected decision {d}")
    # A difference of well under 1 µs on ~9: many short rounds, off and on alternating, and
    # the median of the paired differences, so that a noisy moment cancels out.
    times = interleaved(
        {
            "off": lambda: decide(snapshot, view, now, agent_state=EMPTY_AGENT_STATE),
            "on": lambda: decide(snapshot, view, now, agent_state=full),
        },
        max(1, number // 4),
        repeat * 4,
    )
    rows.append(
        row(
            "decide(), EMPTY_AGENT_STATE",
            times["off"],
            f"GET {HOST}{PATH}, allowed by {RULE}",
            where="worker",
        )
    )
    rows.append(
        row(
            "decide(), risk state + grant",
            times["on"],
            "the same call; the agent's RiskState (0.05) and an active `refund` grant",
            where="worker",
        )
    )
    added = [b - a for a, b in zip(times["off"], times["on"], strict=True)]
    rows.append(
        row(
            "decide(): added (per round)",
            added,
            "on minus off, run by run (interleaved)",
            where="worker",
        )
    )

    # the shared context table: unchanged (per Check) and re-read after a publish
    writer = SharedAgentState.create(work / "w.context")
    reader = SharedAgentState.attach(work / "w.context")
    writer.write(full)
    reader.read()
    rows.append(
        row(
            "SharedAgentState.read (unchanged)",
            timed(reader.read, number, repeat),
            "per Check, behaviour on or off",
            where="worker",
        )
    )
    stale = AgentStateTable(generation=-1)

    def reread() -> None:  # as after a publish: the cached generation no longer matches
        reader._cached = stale
        reader.read()

    rows.append(
        row(
            "SharedAgentState.read (after a publish)",
            timed(reread, number, repeat),
            "JSON decode + AgentStateTable.build of one risk + one grant; once per publish "
            "(≤ 10/s), not per Check",
            where="worker (per publish)",
        )
    )
    return rows


# ---------------------------------------------------------------- report


def summarize(rows: list[dict[str, Any]], rps: float) -> dict[str, Any]:
    by = {r["name"]: r for r in rows}

    def best(name: str) -> float:
        return float(by[name]["best_us"])

    per_event = best("parse (protobuf, per entry)") + best("AccessLogServicer._handle (per entry)")
    tick_per_call = best("BehaviourService.tick") * 10 / rps
    added = statistics.median(by["decide(): added (per round)"]["samples_us"])
    facts = statistics.median(by["CheckPipeline.decide: added by the call's facts"]["samples_us"])
    meta = statistics.median(by["response_for + serialize: added by `call` metadata"]["samples_us"])
    scoring = statistics.median(
        by["Check-path scoring: added per Check (known call)"]["samples_us"]
    )
    scoring_new = statistics.median(
        by["Check-path scoring: added per Check (a new recipient)"]["samples_us"]
    )
    return {
        "check_path_scoring_added_us": scoring,
        "check_path_scoring_added_us_novel": scoring_new,
        "facts_added_us_per_mcp_check": facts + meta,
        "facts_decide_added_us": facts,
        "facts_response_added_us": meta,
        "goal_added_us_per_check": GOAL_US,
        "worker_added_us_per_check": added,
        "worker_added_us_per_check_best": best("decide(), risk state + grant")
        - best("decide(), EMPTY_AGENT_STATE"),
        "supervisor_us_per_call": per_event + tick_per_call,
        "supervisor_parse_and_handle_us_per_call": per_event,
        "supervisor_tick_us_per_call_at_rps": tick_per_call,
        "rps_assumed": rps,
    }


def markdown(info: dict[str, Any], rows: list[dict[str, Any]], summary: dict[str, Any]) -> str:
    lines = [
        "| where | what | µs best | µs median | note |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['where']} | {r['name']} | {r['best_us']:.3f} | {r['median_us']:.3f} "
            f"| {r['note']} |"
        )
    s = summary
    lines += [
        "",
        f"On the Check path (worker): decide() with the agent's risk state and a grant costs "
        f"{s['worker_added_us_per_check']:+.3f} µs more than with an empty context (median of "
        f"the interleaved rounds; best vs best {s['worker_added_us_per_check_best']:+.3f}); "
        f"goal ≤ {s['goal_added_us_per_check']:g} µs added per Check.",
        f"Off the Check path (supervisor), per call: parse + decode + observe "
        f"{s['supervisor_parse_and_handle_us_per_call']:.2f} µs, plus the 0.1 s tick spread "
        f"over {s['rps_assumed']:,.0f} calls/s {s['supervisor_tick_us_per_call_at_rps']:.3f} "
        f"µs = {s['supervisor_us_per_call']:.2f} µs, before gRPC's own stream handling.",
        f"The call's facts (issue 21), per MCP call of an agent under behaviour analysis: "
        f"{s['facts_decide_added_us']:+.2f} µs to the decision (the body parsed again, "
        f"described, one HMAC) and {s['facts_response_added_us']:+.2f} µs to the gRPC "
        f"answer = {s['facts_added_us_per_mcp_check']:+.2f} µs per Check (medians of the "
        "interleaved rounds); calls without a body and agents without `behavior:` pay "
        "nothing.",
        f"Scoring the call's own novelty on the Check path (enforce, one process): "
        f"{s['check_path_scoring_added_us']:+.2f} µs per MCP Check of a known call, "
        f"{s['check_path_scoring_added_us_novel']:+.2f} µs for one with a new recipient "
        "(medians of the interleaved rounds, against the same Check decided on the "
        "published score only).",
        "",
        f"Machine: {info['nproc']} CPUs, {info['cpu_model']}, Linux {info['kernel']}; Python "
        f"{info['python']}, protobuf {info['protobuf']}; timeit, GC off, best and median of "
        f"{info['repeat']} runs of {info['number']:,} calls; git {info['git_commit']}; "
        f"{info['date']}.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m bench behaviour_cost",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
    )
    p.add_argument("--number", type=int, default=20000, help="calls per timed run")
    p.add_argument("--repeat", type=int, default=7, help="timed runs per measure")
    p.add_argument(
        "--rps", type=float, default=3000.0, help="calls/s to spread the 0.1 s tick over"
    )
    p.add_argument("--out", type=Path, default=RESULTS, help="results directory")
    args = p.parse_args(argv)
    if args.number < 100 or args.repeat < 3:
        p.error("--number >= 100 and --repeat >= 3")
    info = {
        **machine_base(),
        "protobuf": package_version("protobuf"),
        "number": args.number,
        "repeat": args.repeat,
        "behaviour_profile": BEHAVIOUR,
        "rate_of_synthetic_calls": RATE,
    }
    with tempfile.TemporaryDirectory(prefix="mandate-bench-") as tmp:
        work = Path(tmp)
        gc.collect()
        rows = supervisor_rows(args.number, args.repeat, work / "s")
        rows += worker_rows(args.number, args.repeat, work / "w")
        rows += facts_rows(args.number, args.repeat, work / "f")
        rows += check_path_rows(args.number, args.repeat, work / "c")
    summary = summarize(rows, args.rps)
    table = markdown(info, rows, summary)
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    doc = {"machine": info, "summary": summary, "results": rows}
    (args.out / "behaviour_cost.json").write_text(json.dumps(doc, indent=2) + "\n")
    (args.out / "behaviour_cost.md").write_text(
        "# Behaviour analysis: cost per call, in-process\n\n"
        "Written by `python -m bench behaviour_cost`; see its docstring for what each row measures."
        "\n\n" + table
    )
    print(f"wrote {args.out / 'behaviour_cost'}.json and .md")
    return 0
