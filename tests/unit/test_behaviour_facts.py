"""What behaviour analysis is told about a call (issue 21), with plain data: the call facts
made on the Check path from the body (MCP tools, argument shapes, fingerprints of the
sensitive arguments, a JSON body's keys), their text in Envoy's dynamic metadata on both
transports, and reading them back from an access log entry."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from envoy.data.accesslog.v3 import accesslog_pb2

from sidecar.audit.arguments import ArgumentKey, recorded_arguments
from sidecar.audit.canonical import canonical_json
from sidecar.behaviour.access_log import event_from_entry
from sidecar.check.grpc_transport import response_for
from sidecar.check.http_transport import _response
from sidecar.check.pipeline import CheckPipeline
from sidecar.check.request import Identity
from sidecar.core import Code, Decision, RequestView, load_profiles
from sidecar.core.callfacts import NO_FACTS, CallFacts, decode, describe
from sidecar.core.mcp import tool_call_body
from sidecar.core.recording import ArgumentRecording, CallArguments
from sidecar.headers import CALL_HEADER

KEY = ArgumentKey.of(b"k" * 32)
SENSITIVE = frozenset({"to", "recipients", "iban"})


def fp(value: object) -> str:
    return KEY.mac(canonical_json(value))


def facts(body: bytes, sensitive: frozenset[str] = SENSITIVE, key: bool = True) -> CallFacts:
    return describe(body, False, sensitive, fp if key else None, KEY.id if key else "")


def rpc(*messages: dict[str, Any]) -> bytes:
    doc: Any = list(messages) if len(messages) > 1 else messages[0]
    return json.dumps(doc).encode()


def call(tool: str, args: object, i: int = 1) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": i, "method": "tools/call",
            "params": {"name": tool, "arguments": args}}  # fmt: skip


# -- describe -----------------------------------------------------------------------------------


def test_an_mcp_tool_call_gives_its_tool_shape_and_sensitive_fingerprints() -> None:
    f = facts(tool_call_body("send_money", {"to": "DE89 3704", "amount": 12.5, "memo": None}))
    assert f.tools == ("send_money",)
    assert f.shapes == ("amount:n,memo:z,to:s",)  # names sorted, one letter per JSON type
    assert f.values == (("to", fp("DE89 3704")),)  # only the sensitive argument, hashed
    assert f.key_id == KEY.id
    assert "DE89" not in f.encode()  # never the value


def test_every_item_of_a_sensitive_list_is_fingerprinted_on_its_own() -> None:
    f = facts(tool_call_body("send_email", {"recipients": ["a@x.test", "b@x.test", None, ""]}))
    assert f.values == (("recipients", fp("a@x.test")), ("recipients", fp("b@x.test")))
    assert f.shapes == ("recipients:a",)


def test_the_fingerprint_is_the_audit_trails_hash_of_the_same_value() -> None:
    """One key, one encoding: an operator finds the calls that carried a new value in the
    audit trail by the hash the explanation's fingerprint equals."""
    body = tool_call_body("send_money", {"to": "mallory@evil.test"})
    recorded = recorded_arguments(CallArguments(ArgumentRecording(), "/mcp", body, False), KEY)
    assert recorded is not None
    assert recorded["mcp"][0]["args"]["to"]["hash"] == facts(body).values[0][1]


def test_without_a_key_no_value_is_fingerprinted_and_odd_names_are_positions() -> None:
    f = facts(tool_call_body("send_money", {"to": "x", "a b": 1}), key=False)
    assert f.values == () and f.key_id == ""
    assert f.shapes == ("#1:i,to:s",)
    hashed = facts(tool_call_body("send_money", {"to": "x", "a b": 1}))
    assert hashed.shapes == (f"#{fp('a b')}:i,to:s",)  # a name that is data: hashed


def test_a_tool_name_that_is_not_an_identifier_is_hashed() -> None:
    assert facts(tool_call_body("rm -rf /", {})).tools == ("#" + fp("rm -rf /"),)


def test_a_batch_gives_each_tool_call_in_order_and_skips_session_methods() -> None:
    body = rpc(
        {"jsonrpc": "2.0", "id": 0, "method": "tools/list"},
        call("read_inbox", {}, 1),
        call("send_money", {"to": "x"}, 2),
    )
    f = facts(body)
    assert f.tools == ("read_inbox", "send_money") and f.shapes == ("", "to:s")


def test_a_json_body_gives_its_top_level_keys_and_sensitive_values() -> None:
    f = facts(b'{"iban": "DE00", "amount": 5, "meta": {"k": 1}}')
    assert f.tools == () and f.body_shape == "amount:i,iban:s,meta:o"
    assert f.values == (("iban", fp("DE00")),)


@pytest.mark.parametrize(
    ("body", "truncated"),
    [
        (b"", False),
        (b"plain text", False),
        (b'{"to": "x"', False),  # not JSON
        (b'{"to": "x", "to": "y"}', False),  # not strict JSON: a key twice
        (b'{"to": "x"}', True),  # not seen whole
        (b"[1, 2]", False),  # JSON, not an object nor JSON-RPC
        (rpc({"jsonrpc": "2.0", "id": 1, "method": "tools/list"}), False),  # no tool call
    ],
)
def test_no_facts_for_what_is_no_tool_call_nor_json_object(body: bytes, truncated: bool) -> None:
    assert describe(body, truncated, SENSITIVE, fp, KEY.id) is NO_FACTS


def test_bounds_many_arguments_and_values() -> None:
    args = {f"k{i:02d}": i for i in range(40)} | {"recipients": [f"r{i}" for i in range(30)]}
    f = facts(tool_call_body("t", args))
    shape = f.shapes[0].split(",")
    assert len(shape) == 33 and shape[-1] == "+9"  # 32 names, then how many more
    # 8 fingerprints of one argument: 7 items, and the rest of the array as one value.
    assert [v for _, v in f.values] == [fp(f"r{i}") for i in range(7)] + [
        fp([f"r{i}" for i in range(7, 30)])
    ]


def test_a_value_beyond_the_bounds_is_never_unseen() -> None:
    """Padding a call with known recipients or known tools must not hide a new one."""
    known = ["alice"] * 8
    padded = facts(tool_call_body("send", {"recipients": [*known, "eve"]}))
    plain = facts(tool_call_body("send", {"recipients": known}))
    assert padded.values != plain.values  # eve changed the 8th value (the rest as one)
    many = facts(rpc(*(call("read", {"recipients": f"r{i}"}, i) for i in range(20))))
    assert len(many.values) == 16 and many.values[-1][0] == "+"  # the rest, as one value
    other = facts(
        rpc(
            *(call("read", {"recipients": f"r{i}"}, i) for i in range(19)),
            call("read", {"recipients": "eve"}, 19),
        )
    )
    assert other.values[-1] != many.values[-1]
    tools = facts(rpc(*(call("read", {}, i) for i in range(8)), call("send_money", {}, 9)))
    same = facts(rpc(*(call("read", {}, i) for i in range(9))))
    assert len(tools.tools) == 8 and tools.tools[-1].startswith("+")
    assert tools.tools[-1] != same.tools[-1]  # send_money, past the 8th, still counts
    unkeyed = facts(rpc(*(call("read", {}, i) for i in range(10))), key=False)
    assert unkeyed.tools[-1] == "+3"


def test_facts_fit_their_text_whole_so_judge_and_learner_see_the_same() -> None:
    """Shapes are shortened to fit; tools and values never are: decode(encode(f)) == f."""
    long_args = {f"descriptive_argument_name_{i:02d}": i for i in range(12)}
    body = rpc(*(call(f"tool_{i}", {**long_args, "to": f"p{i}@x"}, i) for i in range(8)))
    f = facts(body)
    text = f.encode()
    assert len(text) <= 2048 and decode(text) == f
    assert f.tools == tuple(f"tool_{i}" for i in range(8)) and len(f.values) == 8
    assert any(s.startswith("+") for s in f.shapes)  # some shapes summarized as +N
    big = facts(b'{"' + b'", "'.join(b"k%03d_" % i + b"x" * 60 for i in range(40)) + b'": 1}')
    assert decode(big.encode()) == big
    # room is kept for the tool the Check pipeline says was decided before the call
    before = replace(f, previous="#" + "f" * 16)
    assert decode(before.encode()) == before and len(before.encode()) <= 2048
    longest = replace(f, previous="t" * 64)
    assert decode(longest.encode()) == longest


# -- the text -----------------------------------------------------------------------------------


def test_the_text_round_trips() -> None:
    body = rpc(call("read", {"q": "x"}, 1), call("send", {"to": ["a", "b"], "n": 1}, 2))
    f = facts(body)
    assert decode(f.encode()) == f
    json_body = facts(b'{"iban": "DE00", "amount": 5}')
    assert decode(json_body.encode()) == json_body
    assert decode("") is NO_FACTS and NO_FACTS.encode() == ""
    # the tool decided before: a name, none ('' within the window), or not known (None)
    for prev in ("read_inbox", "", None):
        assert decode(replace(f, previous=prev).encode()).previous == prev


@pytest.mark.parametrize(
    "text",
    ["garbage", "t=noparen", "v=to:nothex,k=1", "t=" + "a()|" * 50, "x=1;;;=", "v=" + "a:" * 9],
)
def test_decode_never_raises_and_keeps_only_what_encode_writes(text: str) -> None:
    f = decode(text)
    assert len(f.tools) <= 8 and all(len(fp_) == 16 for _, fp_ in f.values)


# -- the Check path: facts for analysed agents only, in both transports' metadata ------------

PROFILES = """
apiVersion: mandate.dev/v1alpha1
kind: AgentProfile
metadata: {{name: {name}}}
spec:
  owner: team
  defaultPurpose: work
  purposes:
    work:
      allow:
        - hosts: [mcp.internal]
          methods: [POST]
          mcpTools: [read_inbox, send_money]
{behavior}"""
BEHAVIOR = """  behavior:
    mode: monitor
    sensitiveArguments: [to]
"""


@pytest.fixture
def pipeline(tmp_path: Path) -> CheckPipeline:
    (tmp_path / "a.yaml").write_text(
        PROFILES.format(name="watched", behavior=BEHAVIOR)
        + "---"
        + PROFILES.format(name="plain", behavior="")
    )
    snapshot = load_profiles(tmp_path)
    return CheckPipeline(lambda: snapshot, Identity(), facts_key=KEY)


def view(agent: str, body: bytes) -> Any:
    return lambda did: RequestView(
        decision_id=did, method="POST", authority="mcp.internal", path="/mcp", body=body,
        headers={"content-type": "application/json"}, context_extensions={"agent": agent},
    )  # fmt: skip


def test_the_pipeline_describes_the_calls_of_an_analysed_agent_only(
    pipeline: CheckPipeline,
) -> None:
    body = tool_call_body("send_money", {"to": "mallory"})
    decision, _, _, text = pipeline.decide(view("watched", body))
    assert decision.allowed
    assert decode(text) == CallFacts(
        ("send_money",), ("to:s",), "", (("to", fp("mallory")),), KEY.id
    )
    # Denied calls are described too: a refused tool is behaviour as well.
    denied, _, _, text = pipeline.decide(view("watched", tool_call_body("delete_all", {})))
    assert denied.code == Code.OUTSIDE_PURPOSE and decode(text).tools == ("delete_all",)
    # No `behavior:`: nothing described, nothing parsed.
    assert pipeline.decide(view("plain", body))[3] == ""


def test_without_a_key_the_pipeline_still_names_the_tools(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text(PROFILES.format(name="watched", behavior=BEHAVIOR))
    snapshot = load_profiles(tmp_path)
    text = CheckPipeline(lambda: snapshot, Identity()).decide(
        view("watched", tool_call_body("send_money", {"to": "m"}))
    )[3]
    assert decode(text) == CallFacts(("send_money",), ("to:s",))


@pytest.mark.parametrize("allowed", [True, False])
def test_both_transports_put_the_facts_in_envoys_dynamic_metadata(allowed: bool) -> None:
    d = Decision("d" * 32, allowed, Code.ALLOWED if allowed else Code.OUTSIDE_PURPOSE, "why",
                 agent="watched", purpose="work")  # fmt: skip
    text = "t=send_money(to:s)"
    meta = response_for(d, {}, facts=text).dynamic_metadata.fields
    assert meta["call"].string_value == text
    assert _response(d, {}, facts=text).headers[CALL_HEADER] == text
    # No facts: no field, no header.
    assert "call" not in response_for(d, {}).dynamic_metadata.fields
    assert CALL_HEADER not in _response(d, {}).headers


@pytest.mark.parametrize(
    ("key", "meta"),
    [
        ("call", {"agent": "watched", "code": "allowed", "decision": "allow"}),
        (CALL_HEADER, {"x-mandate-log-agent": "watched", "x-mandate-code": "allowed",
                       "x-mandate-outcome": "allow"}),
    ],
)  # fmt: skip
def test_the_access_log_reads_the_facts_back(key: str, meta: dict[str, str]) -> None:
    f = facts(tool_call_body("send_money", {"to": "mallory"}))
    e = accesslog_pb2.HTTPAccessLogEntry()
    e.common_properties.metadata.filter_metadata["envoy.filters.http.ext_authz"].update(
        {**meta, key: f.encode()}
    )
    e.request.authority = "mcp.internal"
    e.request.path = "/mcp"
    event = event_from_entry(e, "agents", 1_800_000_000.0)
    assert event is not None and event.facts == f
    del e.common_properties.metadata.filter_metadata["envoy.filters.http.ext_authz"].fields[key]
    event = event_from_entry(e, "agents", 1_800_000_000.0)
    assert event is not None and event.facts == NO_FACTS
