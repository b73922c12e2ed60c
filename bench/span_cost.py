"""CPU per decision span: the OpenTelemetry SDK path vs the lean tracer (issue 4).

Each measurement runs in a fresh child process: it creates the tracer (`tracing_sdk.
SdkTracing` or `tracing.Tracing`), exporting over real OTLP/gRPC to a receiver in another
process (so that receiving costs the measured process nothing; the receiver counts the
spans and discards them), records `--spans` decision spans of the benchmark's request
(allowed GET, 14 attributes, a sampled Envoy parent, a new decision id and trace each)
in chunks of `--chunk` (the batch size: every batch is a full one, as at full load, and
no span is dropped), flushing after each chunk. Figures, per span:

- **record µs**: CPU time of the recording thread (`time.thread_time`), i.e. what a Check
  thread pays in `Tracing.record`;
- **total µs**: CPU time of the whole process (`time.process_time`: the recording thread,
  the export thread, gRPC's threads), i.e. what tracing costs the worker.

CPU time, not wall time: other processes on the machine change the second much less than
the first. Rounds alternate the paths; the table gives the median and the minimum over the
rounds. The script checks that the receiver got every span.

A second table measures ways of encoding one span in-process (no export), which is how
the lean tracer's design was chosen: upb message objects (nested constructors, or fields
set in place) serialized, vs `otlp_wire`'s bytes with and without the memo of repeated
attributes.

Writes bench/results/span_cost.{json,md}.
Run: python -m bench span_cost [--spans 20000] [--chunk 512] [--rounds 3]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent import futures
from pathlib import Path
from typing import Any

from bench.lib import RESULTS, ROOT
from bench.lib.report import machine_base, package_version, write_results
from sidecar.core import Decision

EXPORT = "/opentelemetry.proto.collector.trace.v1.TraceService/Export"
COUNT = "/bench.SpanCount/Get"
PATHS = ("sdk", "lean")
LABELS = {"sdk": "OpenTelemetry SDK (before)", "lean": "lean tracer (after)"}


def decision(i: int) -> Decision:
    """The benchmark's request (bench/check_throughput.py) as decided, decision id i."""
    return Decision(
        f"{0x0190_0000_0000 + i:012x}{i:020x}",
        True,
        "allowed",
        "allowed by rule reconcile.allow[0] of purpose 'reconcile'",
        agent="billing-agent",
        owner="finance-platform",
        purpose="reconcile",
        rule="reconcile.allow[0]",
        identity_source="sidecar-config",
        method="GET",
        host="ledger.finance.svc.cluster.local",
        port=80,
        path="/v1/invoices/42",
    )


def inputs(n: int) -> list[tuple[Decision, dict[str, str], int, int]]:
    rng = random.Random(4)
    now = time.time_ns()
    return [
        (
            decision(i),
            {"traceparent": f"00-{rng.getrandbits(128):032x}-{rng.getrandbits(64):016x}-01"},
            now + i * 300_000,
            now + i * 300_000 + 250_000,
        )
        for i in range(n)
    ]


# --- the receiver (its own process) ---------------------------------------------------


def receiver() -> None:
    import grpc
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
        ExportTraceServiceRequest,
    )

    count = 0

    def export(request: bytes, context: Any) -> bytes:
        nonlocal count
        msg = ExportTraceServiceRequest.FromString(request)
        count += sum(len(ss.spans) for rs in msg.resource_spans for ss in rs.scope_spans)
        return b""  # an empty ExportTraceServiceResponse

    def get(request: bytes, context: Any) -> bytes:
        return str(count).encode()

    handlers = {
        EXPORT: grpc.unary_unary_rpc_method_handler(export),
        COUNT: grpc.unary_unary_rpc_method_handler(get),
    }

    class Handler(grpc.GenericRpcHandler):
        def service(self, details: Any) -> Any:
            return handlers.get(details.method)

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    server.add_generic_rpc_handlers((Handler(),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    print(port, flush=True)
    sys.stdin.read()  # until the parent closes our stdin
    server.stop(0)


def received(port: int) -> int:
    import grpc

    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        return int(channel.unary_unary(COUNT)(b"", timeout=10))


# --- one measurement (a child process) ------------------------------------------------


def measure(path: str, port: int, spans: int, chunk: int) -> dict[str, float]:
    endpoint = f"http://127.0.0.1:{port}"
    tracer: Any
    if path == "sdk":
        from sidecar.telemetry.tracing_sdk import SdkTracing

        tracer = SdkTracing(endpoint, pod="bench-pod", namespace="agents")
    else:
        from sidecar.telemetry.tracing import Tracing

        tracer = Tracing(endpoint, pod="bench-pod", namespace="agents", max_batch=chunk)
    warm = inputs(2 * chunk)
    for d, parents, start, end in warm:
        tracer.record(d, parents, start, end)
    tracer.flush()
    work = inputs(spans)
    before = received(port)
    thread_cpu = 0.0
    p0 = time.process_time()
    for i in range(0, spans, chunk):
        t0 = time.thread_time()
        for d, parents, start, end in work[i : i + chunk]:
            tracer.record(d, parents, start, end)
        thread_cpu += time.thread_time() - t0
        if not tracer.flush():
            raise SystemExit(f"{path}: flush timed out")
    total_cpu = time.process_time() - p0
    got = received(port) - before
    tracer.shutdown()
    if got != spans:
        raise SystemExit(f"{path}: the receiver got {got} of {spans} spans")
    return {"record_us": thread_cpu / spans * 1e6, "total_us": total_cpu / spans * 1e6}


# --- encoding alternatives (in-process) -----------------------------------------------


def encodings(n: int) -> dict[str, float]:
    from opentelemetry.proto.common.v1 import common_pb2
    from opentelemetry.proto.trace.v1 import trace_pb2

    from sidecar.telemetry import otlp_wire
    from sidecar.telemetry.tracing import Tracing

    work = inputs(n)
    trace_id, parent = os.urandom(16), os.urandom(8)

    def attrs(d: Decision) -> dict[str, Any]:
        a: dict[str, Any] = {
            "mandate.decision": "allow" if d.allowed else "deny",
            "mandate.decision_id": d.decision_id,
            "mandate.code": d.code,
            "mandate.reason": d.reason,
            "mandate.rule": d.rule,
            "mandate.agent": d.agent,
            "mandate.owner": d.owner,
            "mandate.purpose": d.purpose,
            "mandate.task": d.task,
            "mandate.identity_source": d.identity_source,
            "mandate.mcp.tools": list(d.mcp_tools),
            "http.request.method": d.method,
            "server.address": d.host,
            "server.port": d.port,
            "url.path": d.path,
        }
        return {k: v for k, v in a.items() if v}

    def value(v: Any) -> Any:
        if isinstance(v, str):
            return common_pb2.AnyValue(string_value=v)
        return common_pb2.AnyValue(int_value=v)

    def upb_nested(d: Decision, start: int, end: int) -> bytes:
        return trace_pb2.Span(
            trace_id=trace_id,
            span_id=random.getrandbits(64).to_bytes(8, "big"),
            parent_span_id=parent,
            name="mandate.authorize",
            kind=2,
            start_time_unix_nano=start,
            end_time_unix_nano=end,
            attributes=[common_pb2.KeyValue(key=k, value=value(v)) for k, v in attrs(d).items()],
            status=trace_pb2.Status(),
            flags=0x300,
        ).SerializeToString()

    def upb_in_place(d: Decision, start: int, end: int) -> bytes:
        span = trace_pb2.Span(
            trace_id=trace_id,
            span_id=random.getrandbits(64).to_bytes(8, "big"),
            parent_span_id=parent,
            name="mandate.authorize",
            kind=2,
            start_time_unix_nano=start,
            end_time_unix_nano=end,
            flags=0x300,
        )
        add = span.attributes.add
        for k, v in attrs(d).items():
            kv = add()
            kv.key = k
            if isinstance(v, str):
                kv.value.string_value = v
            else:
                kv.value.int_value = v
        span.status.SetInParent()
        return span.SerializeToString()

    encoder = otlp_wire.SpanEncoder("mandate.authorize", otlp_wire.SPAN_KIND_SERVER)

    keys: dict[str, bytes] = {}

    def wire_plain(d: Decision, start: int, end: int) -> bytes:
        parts = []
        for k, v in attrs(d).items():
            if isinstance(v, str):
                key = keys.get(k) or keys.setdefault(k, otlp_wire.attribute_key(k))
                parts.append(otlp_wire.string_attribute(key, v))
            else:
                parts.append(otlp_wire.span_attribute(k, v))
        span_id = random.getrandbits(64).to_bytes(8, "big")
        return encoder.encode(trace_id, span_id, parent, "", start, end, b"".join(parts), True)

    # What Tracing.record and the export thread's encode do, parent parsing included, minus
    # the queue (the private `_submit` encodes at once into a list: nothing is exported).
    tracer = Tracing("http://127.0.0.1:9", schedule_delay_ms=60_000)
    sink: list[bytes] = []
    tracer._submit = lambda item: sink.append(tracer.encode(item))  # type: ignore[method-assign]

    def lean_record(d: Decision, start: int, end: int, parents: dict[str, str]) -> None:
        tracer.record(d, parents, start, end)

    cases: dict[str, Callable[..., Any]] = {
        "upb messages, nested constructors, serialized": upb_nested,
        "upb messages, fields set in place, serialized": upb_in_place,
        "otlp_wire bytes, every attribute encoded (no memo)": wire_plain,
        "Tracing.record (otlp_wire + memo + traceparent parsing)": lean_record,
    }
    out: dict[str, float] = {}
    for name, fn in cases.items():
        best = float("inf")
        for _ in range(3):
            sink.clear()
            gc.collect()
            t0 = time.thread_time()
            if fn is lean_record:
                for d, parents, start, end in work:
                    fn(d, start, end, parents)
            else:
                for d, _parents, start, end in work:
                    fn(d, start, end)
            best = min(best, (time.thread_time() - t0) / n * 1e6)
        out[name] = best
    tracer.shutdown()
    return out


# --- the driver -----------------------------------------------------------------------


# Children run this benchmark again through the runner, from the repository root.
SELF = [sys.executable, "-m", "bench", "span_cost"]


def child(args: list[str]) -> Any:
    proc = subprocess.run(
        [*SELF, *args], capture_output=True, text=True, timeout=600, cwd=ROOT, check=False
    )
    if proc.returncode != 0:
        raise SystemExit(f"span_cost {' '.join(args)} failed:\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m bench span_cost", description=__doc__.split("\n\n")[0]
    )
    ap.add_argument("--spans", type=int, default=20_000)
    ap.add_argument("--chunk", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--receiver", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--child", choices=(*PATHS, "encodings"), help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.receiver:
        receiver()
        return 0
    if args.child == "encodings":
        print(json.dumps(encodings(args.spans)))
        return 0
    if args.child:
        print(json.dumps(measure(args.child, args.port, args.spans, args.chunk)))
        return 0

    recv = subprocess.Popen(
        [*SELF, "--receiver"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT
    )
    try:
        assert recv.stdout is not None
        port = int(recv.stdout.readline())
        runs: dict[str, list[dict[str, float]]] = {p: [] for p in PATHS}
        for r in range(args.rounds):
            for path in PATHS if r % 2 == 0 else reversed(PATHS):
                common = ["--port", str(port), "--spans", str(args.spans)]
                res = child(["--child", path, *common, "--chunk", str(args.chunk)])
                runs[path].append(res)
                print(f"round {r + 1} {path}: {res}", file=sys.stderr)
        enc = child(["--child", "encodings", "--spans", str(args.spans)])
    finally:
        if recv.stdin is not None:
            recv.stdin.close()
        recv.wait(10)

    summary = {
        path: {
            key: {
                "median": statistics.median(r[key] for r in rs),
                "min": min(r[key] for r in rs),
            }
            for key in ("record_us", "total_us")
        }
        for path, rs in runs.items()
    }
    result = {
        **machine_base(),
        "grpcio": package_version("grpcio"),
        "protobuf": package_version("protobuf"),
        "opentelemetry_sdk": package_version("opentelemetry-sdk"),
        "settings": {"spans": args.spans, "chunk": args.chunk, "rounds": args.rounds},
        "runs": runs,
        "summary": summary,
        "encodings_us": enc,
    }
    write_results(args.out / "span_cost", result, render(result))
    return 0


def render(result: dict[str, Any]) -> str:
    s = result["summary"]
    set_ = result["settings"]
    lines = [
        "# CPU per decision span: OpenTelemetry SDK vs lean tracer",
        "",
        "Written by `python -m bench span_cost`; see bench/README.md.",
        "",
        "| path | record µs (Check thread) median / min | total µs (process) median / min |",
        "|---|---|---|",
    ]
    for path in PATHS:
        rec, tot = s[path]["record_us"], s[path]["total_us"]
        lines.append(
            f"| {LABELS[path]} | {rec['median']:.1f} / {rec['min']:.1f} "
            f"| {tot['median']:.1f} / {tot['min']:.1f} |"
        )
    ratio = s["sdk"]["total_us"]["median"] / s["lean"]["total_us"]["median"]
    lines += [
        "",
        f"Total CPU per span, SDK / lean: {ratio:.1f}x (medians).",
        "",
        "| encoding one span in-process (no export) | µs (best of 3) |",
        "|---|---|",
    ]
    lines += [f"| {name} | {us:.2f} |" for name, us in result["encodings_us"].items()]
    lines += [
        "",
        f"{set_['spans']:,} spans per run in chunks of {set_['chunk']} (one full batch each, "
        f"flushed), {set_['rounds']} rounds alternating the paths, each in a fresh process; "
        "OTLP/gRPC to a receiver in another process on 127.0.0.1.",
        "",
        f"Machine: {result['nproc']} CPUs, {result['cpu_model']}; Python {result['python']}, "
        f"grpcio {result['grpcio']}, protobuf {result['protobuf']}, opentelemetry-sdk "
        f"{result['opentelemetry_sdk']}; load average before: {result['loadavg_before']}; "
        f"git {result['git_commit']}; {result['date']}.",
        "",
    ]
    return "\n".join(lines)
