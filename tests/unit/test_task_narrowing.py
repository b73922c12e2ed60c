"""Tasks that narrow rights (issue 18, part 2): a task reported with a declaration (`allow`,
rules in the profile's syntax) holds every call naming it to the intersection of its purpose
(and elevation grants) with the declaration. A declaration can only narrow, never widen:
checked case by case, and as properties over generated declarations and calls.

The profile is written here: bank-agent, purpose `pay` (MCP tools with an amount limit, a
deny rule), purpose `strict` (requireTask), an auto elevation adding one tool.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sidecar.core import Code, Decision, RequestView, Snapshot, decide, load_profiles
from sidecar.core.agentstate import UNKNOWN_AGENT_STATE, AgentStateTable, Grant, TaskBinding
from sidecar.core.taskscope import (
    MAX_DECLARATION_BYTES,
    MAX_DECLARED_RULES,
    DeclarationError,
    validate_declaration,
)
from sidecar.errors import AgentStateError
from sidecar.state.agentstate import MAX_TASKS_PER_AGENT, AgentStateStore
from sidecar.state.agentstate.limits import MAX_DECLARED_BYTES_PER_AGENT
from sidecar.state.shm import SharedAgentState

NS = "agents"
NOW = 1_700_000_000.0
HOST = "mcp.bank"
TOOLS = ["send_money", "get_balance", "read_inbox", "delete_account", "export"]
PROFILE = """\
apiVersion: mandate.dev/v1alpha1
kind: AgentProfile
metadata: {name: bank-agent}
spec:
  owner: payments
  defaultPurpose: pay
  purposes:
    pay:
      deny:
        - hosts: [mcp.bank]
          mcpTools: [delete_account]
      allow:
        - hosts: [mcp.bank]
          methods: [POST]
          paths: ["/mcp"]
          mcpTools: [send_money, get_balance, read_inbox, delete_account]
          mcpArguments:
            send_money:
              properties: {amount: {type: number, maximum: 1000}}
              required: [amount]
        - hosts: [api.bank]
          methods: [GET]
          paths: ["/v1/**"]
    strict:
      requireTask: true
      allow:
        - hosts: [mcp.bank]
          mcpTools: [get_balance, read_inbox]
  elevations:
    exports:
      approval: auto
      maxDuration: 10m
      allow:
        - hosts: [mcp.bank]
          mcpTools: [export]
"""
DECLARED = (
    {
        "mcpTools": ["send_money"],
        "mcpArguments": {
            "send_money": {
                "properties": {"to": {"enum": ["DE01", "DE02"]}, "amount": {"maximum": 100}},
                "required": ["to", "amount"],
            }
        },
    },
    {"mcpTools": ["get_balance"]},
)


@pytest.fixture(scope="module")
def snapshot(tmp_path_factory: pytest.TempPathFactory) -> Snapshot:
    d: Path = tmp_path_factory.mktemp("profiles")
    (d / "bank.yaml").write_text(PROFILE)
    return load_profiles(d)


def mcp(tool: str, arguments: Any = None, **headers: str) -> RequestView:
    params: dict[str, Any] = {"name": tool}
    if arguments is not None:
        params["arguments"] = arguments
    body = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": params})
    return RequestView(
        decision_id="d", method="POST", authority=HOST, path="/mcp", body=body.encode(),
        headers={"content-length": str(len(body)), **headers}, configured_agent="bank-agent",
        namespace=NS,
    )  # fmt: skip


def task(
    allow: Any = DECLARED, *, name: str = "T1", purpose: str = "pay", expires: float | None = None
) -> TaskBinding:
    return TaskBinding("bank-agent", NS, name, purpose, NOW - 1, expires, tuple(allow))


def state(*tasks: TaskBinding, grants: tuple[Grant, ...] = ()) -> AgentStateTable:
    return AgentStateTable.build(1, grants, tasks)


def under(snapshot: Snapshot, view: RequestView, *tasks: TaskBinding, **kw: Any) -> Decision:
    return decide(snapshot, view, NOW, agent_state=state(*tasks, **kw))


T1 = {"x-mandate-task": "T1"}
OK = {"to": "DE01", "amount": 50}


# -- the intersection, case by case ----------------------------------------------------------


@pytest.mark.parametrize(
    ("case", "view", "code", "needle"),
    [
        ("declared tool and values", mcp("send_money", OK, **T1), Code.ALLOWED, "within"),
        ("another declared tool", mcp("get_balance", {}, **T1), Code.ALLOWED, "task[T1]"),
        (
            "a tool the purpose allows, not declared",
            mcp("read_inbox", {}, **T1),
            Code.OUTSIDE_TASK,
            "MCP tool 'read_inbox' not allowed",
        ),
        (
            "a recipient not declared",
            mcp("send_money", {"to": "GB99", "amount": 5}, **T1),
            Code.OUTSIDE_TASK,
            "argument to breaks enum",
        ),
        (
            "more than declared, within the purpose",
            mcp("send_money", {"to": "DE01", "amount": 500}, **T1),
            Code.OUTSIDE_TASK,
            "argument amount breaks maximum 100",
        ),
        (
            "a plain HTTP call the purpose allows, not declared",
            RequestView(
                "d",
                "GET",
                "api.bank",
                "/v1/accounts",
                headers=T1,
                configured_agent="bank-agent",
                namespace=NS,
            ),
            Code.OUTSIDE_TASK,
            "no rule the task declared",
        ),
        (
            "the same call without the task: the purpose's rights",
            mcp("read_inbox", {}),
            Code.ALLOWED,
            "allowed by rule pay.allow[0]",
        ),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_a_declared_task_is_held_to_its_declaration(
    snapshot: Snapshot, case: str, view: RequestView, code: str, needle: str
) -> None:
    d = under(snapshot, view, task())
    assert d.code == code, d.reason
    assert needle in d.reason
    assert d.task == ("T1" if "x-mandate-task" in view.headers else "")
    if code == Code.OUTSIDE_TASK:
        assert "GB99" not in d.reason and d.rule == ""  # never the value; no rule allowed it


def test_the_constraints_that_decided_are_named(snapshot: Snapshot) -> None:
    d = under(snapshot, mcp("send_money", OK, **T1), task())
    assert d.allowed
    assert d.constraint == (
        "pay.allow[0] mcpArguments.send_money; task[T1].allow[0] mcpArguments.send_money"
    )
    d = under(snapshot, mcp("send_money", {"to": "XX", "amount": 5}, **T1), task())
    assert d.constraint == 'MCP tool \'send_money\': argument to breaks enum ["DE01", "DE02"]'


@pytest.mark.parametrize(
    ("case", "declared", "view"),
    [
        # a declaration that lists what the purpose does not grant allows nothing more
        ("a tool outside the purpose", [{"mcpTools": ["export"]}], mcp("export", {}, **T1)),
        (
            "a host outside the purpose",
            [{"hosts": ["evil.example"]}],
            RequestView(
                "d",
                "GET",
                "evil.example",
                "/",
                headers=T1,
                configured_agent="bank-agent",
                namespace=NS,
            ),
        ),
        (
            "a looser argument constraint",
            [{"mcpTools": ["send_money"], "mcpArguments": {"send_money": {"type": "object"}}}],
            mcp("send_money", {"amount": 5000}, **T1),
        ),
        ("a match-everything rule", [{}], mcp("send_money", {"amount": 5000}, **T1)),
        (
            "a tool the purpose denies",
            [{"mcpTools": ["delete_account"]}],
            mcp("delete_account", {}, **T1),
        ),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_a_declaration_never_widens(
    snapshot: Snapshot, case: str, declared: list[dict[str, Any]], view: RequestView
) -> None:
    without = decide(snapshot, view, NOW)
    assert not without.allowed
    d = under(snapshot, view, task(validate_declaration(declared)))
    assert not d.allowed
    assert d.code == without.code  # decided by the purpose, before the declaration


def test_elevation_grants_are_narrowed_too(snapshot: Snapshot) -> None:
    g = Grant("g1", "bank-agent", NS, "exports", NOW - 5, NOW + 60, "auto")
    view = mcp("export", {}, **T1)
    assert decide(snapshot, view, NOW, agent_state=state(grants=(g,))).allowed
    assert under(snapshot, view, task(), grants=(g,)).code == Code.OUTSIDE_TASK
    wide = task([{"mcpTools": ["export"]}])
    assert under(snapshot, view, wide, grants=(g,)).allowed


def test_a_task_reported_for_another_purpose_cannot_be_borrowed(snapshot: Snapshot) -> None:
    d = under(snapshot, mcp("get_balance", {}, **T1, **{"x-mandate-purpose": "strict"}), task())
    assert d.code == Code.BAD_TASK


def test_require_task(snapshot: Snapshot) -> None:
    p = {"x-mandate-purpose": "strict"}
    no_task = decide(snapshot, mcp("get_balance", {}, **p), NOW)
    assert no_task.code == Code.OUTSIDE_TASK and "names no task" in no_task.reason
    undeclared = task((), purpose="strict")
    d = under(snapshot, mcp("get_balance", {}, **T1), undeclared)
    assert d.code == Code.OUTSIDE_TASK and "not an active task with a declaration" in d.reason
    declared = task([{"mcpTools": ["get_balance"]}], purpose="strict")
    assert under(snapshot, mcp("get_balance", {}, **T1), declared).allowed
    assert under(snapshot, mcp("read_inbox", {}, **T1), declared).code == Code.OUTSIDE_TASK
    # expired: under requireTask the call is refused, not given the purpose's whole rights
    # (without a purpose, a call naming an unknown task gets the default purpose, as ever)
    gone = task([{"mcpTools": ["get_balance"]}], purpose="strict", expires=NOW - 1)
    d = under(snapshot, mcp("get_balance", {}, **T1, **p), gone)
    assert d.code == Code.OUTSIDE_TASK


def test_a_declaration_a_reader_cannot_compile_allows_nothing(snapshot: Snapshot) -> None:
    """Version skew or a damaged table: a task whose declaration does not validate in the
    worker gets no call through, rather than its purpose's rights."""
    bad = task(({"mcpTool": ["send_money"]},))
    assert under(snapshot, mcp("send_money", OK, **T1), bad).code == Code.OUTSIDE_TASK
    table = AgentStateTable.from_dict(1, {"tasks": [bad.as_dict()]})
    assert decide(snapshot, mcp("get_balance", {}, **T1), NOW, agent_state=table).code == (
        Code.OUTSIDE_TASK
    )


def test_the_table_round_trips_a_declaration() -> None:
    t = task()
    data = json.loads(json.dumps(AgentStateTable.build(1, (), (t,)).as_dict()))
    back = AgentStateTable.from_dict(2, data)
    assert back.tasks == (t,)
    plain = task(())
    assert "allow" not in plain.as_dict()  # the file format of an undeclared task is unchanged


# -- validation -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("allow", "message"),
    [
        ([], "allow: a declaration lists at least one rule"),
        ([{"mcpTool": ["a"]}], "allow[0].mcpTool: unknown field"),
        ([{"mcpTools": ["a"]}, "x"], "allow[1]: expected an object"),
        ([{"mcpTools": "a"}], "allow[0].mcpTools: Input should be a valid list"),
        ([{"hosts": []}], "allow[0].hosts"),
        ([{"hosts": ["*"]}], "allow[0].hosts[0]"),
        ([{"paths": ["no-slash"]}], "allow[0].paths[0]"),
        ([{"methods": ["GE T"]}], "allow[0].methods[0]"),
        ([{"foldPaths": True, "paths": ["/a"]}], "allow[0].foldPaths: unknown field"),
        (
            [{"mcpTools": ["a"], "mcpArguments": {"b": {"type": "object"}}}],
            "constrain only a tool this rule lists",
        ),
        (
            [{"mcpTools": ["a"], "mcpArguments": {"a": {"$ref": "#/x"}}}],
            "keyword '$ref' is not supported",
        ),
        (
            [{"mcpTools": ["a"], "mcpArguments": {"a": {"pattern": "("}}}],
            "not a regular expression",
        ),
        ([{"query": {"minimum": "1"}}], "query.minimum: expected a number"),
        ([{"jsonBody": {"anyOf": []}}], "keyword 'anyOf' is not supported"),
        ([{"mcpTools": ["a"]}] * (MAX_DECLARED_RULES + 1), "at most 32 rules"),
        ([{"mcpTools": ["t" * 100 + str(i) for i in range(200)]}], "bytes as JSON"),
    ],
)
def test_bad_declarations_are_refused_naming_the_field(allow: list[Any], message: str) -> None:
    with pytest.raises(DeclarationError) as err:
        validate_declaration(allow)
    assert message in str(err.value)


def test_declaration_bounds_are_inclusive() -> None:
    assert len(validate_declaration([{"mcpTools": ["a"]}] * MAX_DECLARED_RULES)) == 32
    tools = ["t" * 60 + f"{i:04d}" for i in range(MAX_DECLARATION_BYTES // 70)]
    validate_declaration([{"mcpTools": tools}])


# -- the store: report, retry, and no change while active ------------------------------------


class Clock:
    def __init__(self) -> None:
        self.t = NOW

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def store(tmp_path: Path, snapshot: Snapshot) -> tuple[AgentStateStore, Clock, list[Any]]:
    clock, events = Clock(), []
    s = AgentStateStore(
        SharedAgentState.create(tmp_path / "ctx"),
        tmp_path / "context.json",
        lambda: snapshot,
        clock=clock,
        audit=events.append,
    )
    return s, clock, events


def _report(s: AgentStateStore, allow: Any = DECLARED, **kw: Any) -> TaskBinding:
    args = {"task": "T1", "purpose": "pay", "ttl": 600.0, **kw}
    return s.report_task("bank-agent", NS, args["task"], args["purpose"], args["ttl"], allow)


def test_the_store_keeps_a_declaration_and_audits_it(
    store: tuple[AgentStateStore, Clock, list[Any]], tmp_path: Path, snapshot: Snapshot
) -> None:
    s, _, events = store
    t = _report(s)
    assert t.allow == DECLARED
    assert events[-1]["type"] == "task_reported" and events[-1]["allow"] == list(DECLARED)
    saved = json.loads((tmp_path / "context.json").read_text())
    assert json.dumps(list(DECLARED), sort_keys=True) in json.dumps(saved, sort_keys=True)
    table = s.table()
    assert decide(snapshot, mcp("read_inbox", {}, **T1), NOW, agent_state=table).code == (
        Code.OUTSIDE_TASK
    )
    shared = SharedAgentState.create(tmp_path / "ctx2")
    again = AgentStateStore(shared, tmp_path / "context.json", lambda: snapshot, clock=lambda: NOW)
    assert again.load_persisted() == 1
    assert again.tasks(NS, "bank-agent")[0].allow == DECLARED  # survives a restart
    read = SharedAgentState.attach(tmp_path / "ctx2").read()  # what a worker sees
    assert decide(snapshot, mcp("read_inbox", {}, **T1), NOW, agent_state=read).code == (
        Code.OUTSIDE_TASK
    )
    assert decide(snapshot, mcp("send_money", OK, **T1), NOW, agent_state=read).allowed


@pytest.mark.parametrize(
    ("case", "change"),
    [
        ("no declaration", {"allow": ()}),
        ("a wider declaration", {"allow": [{"mcpTools": ["send_money", "read_inbox"]}]}),
        ("another purpose", {"purpose": "strict"}),
        ("a narrower declaration", {"allow": [{"mcpTools": ["get_balance"]}]}),
    ],
)
def test_an_active_declared_task_cannot_be_changed(
    store: tuple[AgentStateStore, Clock, list[Any]], case: str, change: dict[str, Any]
) -> None:
    s, _, events = store
    first = _report(s)
    n = len(events)
    allow = change.pop("allow", DECLARED)
    with pytest.raises(AgentStateError) as err:
        _report(s, allow, **change)
    assert err.value.status == "FAILED_PRECONDITION"
    assert "report a new task id" in str(err.value)
    assert s.tasks(NS, "bank-agent") == [first] and len(events) == n


def test_reporting_the_same_declaration_again_is_a_retry(
    store: tuple[AgentStateStore, Clock, list[Any]],
) -> None:
    s, clock, events = store
    first = _report(s)
    n = len(events)
    clock.t += 30
    assert _report(s, ttl=9999.0) == first and len(events) == n  # unchanged, not extended
    clock.t = NOW + 601  # expired: the id may be reported anew
    assert _report(s, [{"mcpTools": ["read_inbox"]}]).allow == ({"mcpTools": ["read_inbox"]},)


def test_an_undeclared_task_may_be_narrowed(
    store: tuple[AgentStateStore, Clock, list[Any]],
) -> None:
    s, _, _ = store
    _report(s, ())
    assert _report(s).allow == DECLARED


def test_a_bad_declaration_stores_nothing(
    store: tuple[AgentStateStore, Clock, list[Any]],
) -> None:
    s, _, events = store
    with pytest.raises(AgentStateError) as err:
        _report(s, [{"mcpTools": ["a"], "mcpArguments": {"a": {"format": "email"}}}])
    assert err.value.status == "INVALID_ARGUMENT" and "allow[0].mcpArguments.a" in str(err.value)
    assert s.tasks(NS, "bank-agent") == [] and events == []


def test_declarations_are_bounded_per_agent(
    store: tuple[AgentStateStore, Clock, list[Any]],
) -> None:
    """At the bound of declared bytes a new declaration is refused: an active declared task
    is never dropped to make room (the review found eviction let the agent re-report it
    without its declaration); once one ends, there is room again."""
    s, clock, _ = store
    tools = ["t" * 60 + f"{i:04d}" for i in range(150)]  # ~10 KB as JSON
    big = [{"mcpTools": tools}]
    n = 0
    with pytest.raises(AgentStateError) as err:
        while n < MAX_TASKS_PER_AGENT:
            _report(s, big, task=f"T{n}", ttl=60.0 + n)
            n += 1
    assert err.value.status == "RESOURCE_EXHAUSTED" and "never dropped" in str(err.value)
    kept = s.tasks(NS, "bank-agent")
    assert [t.task for t in kept] == [f"T{i}" for i in range(n)]  # none dropped
    size = sum(len(json.dumps(list(t.allow), separators=(",", ":"))) for t in kept)
    assert size <= MAX_DECLARED_BYTES_PER_AGENT
    clock.t = NOW + 60.5  # T0 ended: its room is free
    _report(s, big, task="later")
    assert "T0" not in [t.task for t in s.tasks(NS, "bank-agent")]


def test_at_the_task_bound_undeclared_tasks_make_room_never_declared_ones(
    store: tuple[AgentStateStore, Clock, list[Any]],
) -> None:
    s, clock, _ = store
    _report(s, task="declared")
    for i in range(MAX_TASKS_PER_AGENT - 1):
        clock.t += 1
        _report(s, (), task=f"plain-{i}")
    clock.t += 1
    _report(s, (), task="one-more")  # the oldest undeclared task makes room
    names = [t.task for t in s.tasks(NS, "bank-agent")]
    assert "declared" in names and "plain-0" not in names and "one-more" in names
    assert len(names) == MAX_TASKS_PER_AGENT
    # and the declared task cannot be re-reported without its declaration
    with pytest.raises(AgentStateError):
        _report(s, (), task="declared")


def test_a_declared_task_needs_a_ttl(store: tuple[AgentStateStore, Clock, list[Any]]) -> None:
    s, _, events = store
    with pytest.raises(AgentStateError) as err:
        _report(s, ttl=None)
    assert "needs a ttl" in str(err.value) and events == []


@pytest.mark.parametrize("header", ["T1,T1", "T1, T1", "a,b"])
def test_a_task_header_sent_twice_is_refused(snapshot: Snapshot, header: str) -> None:
    """Envoy joins a header sent twice with ",": `T1,T1` named no task, so the call got the
    purpose's whole rights (review finding). A comma is no part of a task id."""
    d = under(snapshot, mcp("send_money", {"to": "GB99", "amount": 900},
                            **{"x-mandate-task": header}), task())  # fmt: skip
    assert d.code == Code.BAD_TASK


def test_a_task_id_with_a_comma_cannot_be_reported(
    store: tuple[AgentStateStore, Clock, list[Any]],
) -> None:
    s, _, _ = store
    with pytest.raises(AgentStateError) as err:
        _report(s, task="a,b")
    assert "no comma" in str(err.value)


def test_while_the_agents_tasks_are_withheld_a_call_naming_one_is_refused(
    snapshot: Snapshot,
) -> None:
    """A full or unreadable table withholds the agent's tasks: a call naming a task is then
    refused, not decided under the purpose's whole rights (review finding)."""
    view = mcp("send_money", {"to": "GB99", "amount": 900}, **T1)
    withheld = AgentStateTable.build(1, (), (), (), [(NS, "bank-agent")])
    assert decide(snapshot, view, NOW, agent_state=withheld).code == Code.OUTSIDE_TASK
    assert decide(snapshot, view, NOW, agent_state=UNKNOWN_AGENT_STATE).code == Code.OUTSIDE_TASK
    back = AgentStateTable.from_dict(2, json.loads(json.dumps(withheld.as_dict())))
    assert not back.tasks_known(NS, "bank-agent") and back.tasks_known(NS, "other")
    # a call naming no task is decided as ever
    assert decide(snapshot, mcp("read_inbox", {}), NOW, agent_state=withheld).allowed


def test_reasons_quote_no_key_the_call_made_up(snapshot: Snapshot) -> None:
    declared = validate_declaration(
        [{"mcpTools": ["send_money"], "mcpArguments": {"send_money": {
            "properties": {"memo": {"additionalProperties": {"type": "string"}}}}}}]
    )  # fmt: skip
    secret = "card=4111111111111111;cvv=123"
    d = under(snapshot, mcp("send_money", {"memo": {secret: 5}, "amount": 1}, **T1),
              task(declared))  # fmt: skip
    assert d.code == Code.OUTSIDE_TASK and "memo.*" in d.reason and secret not in d.reason
    long = "x" * 20_000
    d = under(snapshot, mcp(long, {}, **T1), task())
    assert not d.allowed and len(d.reason) < 400


# -- properties: never wider than the purpose, and exactly the intersection ------------------

_VALUES = st.one_of(
    st.sampled_from(["DE01", "DE02", "GB99", ""]),
    st.integers(-5, 2000),
    st.floats(allow_nan=False, allow_infinity=False, width=32),
    st.none(),
    st.booleans(),
)
_ARGS = st.dictionaries(st.sampled_from(["to", "amount", "memo"]), _VALUES, max_size=3)
_SCHEMAS = st.fixed_dictionaries(
    {},
    optional={
        "properties": st.fixed_dictionaries(
            {},
            optional={
                "to": st.sampled_from(
                    [{"enum": ["DE01"]}, {"type": "string"}, {"pattern": "^DE"}, {"const": "DE02"}]
                ),
                "amount": st.sampled_from(
                    [{"maximum": 100}, {"type": "integer"}, {"minimum": 0, "maximum": 5000}]
                ),
            },
        ),
        "required": st.sampled_from([["to"], ["amount"], ["to", "amount"]]),
        "additionalProperties": st.booleans(),
    },
)


@st.composite
def _rules(draw: st.DrawFn) -> dict[str, Any]:
    rule: dict[str, Any] = {}
    if draw(st.booleans()):
        rule["hosts"] = draw(st.lists(st.sampled_from([HOST, "api.bank", "evil.example"]),
                                      min_size=1, max_size=2, unique=True))  # fmt: skip
    if draw(st.booleans()):
        rule["methods"] = draw(st.sampled_from([["POST"], ["GET"], ["GET", "POST"]]))
    if draw(st.booleans()):
        tools = draw(st.lists(st.sampled_from(TOOLS), min_size=1, max_size=3, unique=True))
        rule["mcpTools"] = tools
        constrained = draw(st.lists(st.sampled_from(tools), max_size=2, unique=True))
        if constrained:
            rule["mcpArguments"] = {t: draw(_SCHEMAS) for t in constrained}
    return rule


def _valid(declared: list[dict[str, Any]]) -> bool:
    try:
        validate_declaration(declared)
    except DeclarationError:  # e.g. `required` a name `additionalProperties: false` forbids
        return False
    return True


_DECLARATIONS = st.lists(_rules(), min_size=1, max_size=3).filter(_valid)
_CALLS = st.tuples(st.sampled_from(TOOLS), _ARGS, st.sampled_from(["pay", "strict"]))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(declared=_DECLARATIONS, call=_CALLS)
def test_property_a_declaration_never_widens(
    snapshot: Snapshot, declared: list[dict[str, Any]], call: tuple[str, dict[str, Any], str]
) -> None:
    """Whatever a task declares, a call naming it is allowed only if the same call under the
    same purpose, without the declaration, is allowed too (the purpose is the bound)."""
    tool, args, purpose = call
    narrowed = under(snapshot, mcp(tool, args, **T1), task(validate_declaration(declared),
                                                        purpose=purpose))  # fmt: skip
    plain = decide(snapshot, mcp(tool, args, **{"x-mandate-purpose": purpose}), NOW)
    if narrowed.allowed:
        assert plain.allowed or purpose == "strict", (narrowed.reason, plain.reason)
        assert narrowed.purpose == purpose


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(declared=_DECLARATIONS, call=_CALLS)
def test_property_the_declaration_is_an_intersection(
    snapshot: Snapshot,
    tmp_path_factory: pytest.TempPathFactory,
    declared: list[dict[str, Any]],
    call: tuple[str, dict[str, Any], str],
) -> None:
    """Allowed under the task exactly when the purpose allows it and a profile whose only
    purpose is the declaration would allow it too (so it also never narrows by accident)."""
    tool, args, _ = call
    view = mcp(tool, args, **T1)
    narrowed = under(snapshot, view, task(validate_declaration(declared)))
    by_purpose = decide(snapshot, mcp(tool, args), NOW)
    alone = decide(_declaration_profile(tmp_path_factory, declared), mcp(tool, args), NOW)
    assert narrowed.allowed == (by_purpose.allowed and alone.allowed), (
        narrowed.reason, by_purpose.reason, alone.reason,
    )  # fmt: skip


def _declaration_profile(factory: pytest.TempPathFactory, declared: list[Any]) -> Snapshot:
    profile = {
        "apiVersion": "mandate.dev/v1alpha1",
        "kind": "AgentProfile",
        "metadata": {"name": "bank-agent"},
        "spec": {"owner": "x", "defaultPurpose": "d", "purposes": {"d": {"allow": declared}}},
    }
    d = factory.mktemp("declared")
    (d / "p.yaml").write_text(json.dumps(profile))
    return load_profiles(d)


# -- a declaration is data, never code -------------------------------------------------------


@pytest.mark.parametrize(
    "schema",
    [
        {"properties": {"to": {"const": "\\\"'''" + ":__import__('os').system('touch {m}')#"}}},
        {"properties": {"to": {"enum": ["'''+__import__('os').system('touch {m}')+'''"]}}},
        {"properties": {"to": {"pattern": "')\n__import__('os').system('touch {m}')\n#"}}},
        {"properties": {"x'])\n__import__('os').system('touch {m}')#": {"type": "string"}}},
        {"required": ["\"]\n__import__('os').system('touch {m}')\n#"]},
    ],
)
def test_a_declared_schema_cannot_run_code(
    snapshot: Snapshot, tmp_path: Path, schema: dict[str, Any]
) -> None:
    """A review found that a `const` string in a declaration became code in the validator
    fastjsonschema generated (remote code execution by the agent in mandate). Schemas are
    now checked by jsonschema-rs, which generates no code: whatever the strings, nothing
    runs, and the call is decided."""
    marker = tmp_path / "pwned"
    text = json.dumps(schema).replace("{m}", str(marker))
    rule = {"mcpTools": ["send_money"], "mcpArguments": {"send_money": json.loads(text)}}
    try:
        declared = validate_declaration([rule])
    except DeclarationError:
        declared = None  # refused at validation (e.g. a pattern mandate cannot run): fine
    if declared is not None:
        d = under(snapshot, mcp("send_money", {"to": "x", "amount": 1}, **T1), task(declared))
        assert d.code in (Code.ALLOWED, Code.OUTSIDE_TASK)
    assert not marker.exists()


# -- ending a task early ---------------------------------------------------------------------


def test_ending_a_declared_task_keeps_its_id_unusable_until_its_ttl(
    store: tuple[AgentStateStore, Clock, list[Any]], snapshot: Snapshot
) -> None:
    """EndTask frees a declared task's room without letting its id be used without the
    declaration: calls naming it are denied and it cannot be reported again until it would
    have expired."""
    s, clock, events = store
    _report(s, ttl=60.0)
    kept = s.end_task("bank-agent", NS, "T1")
    assert kept is not None and kept.ended and kept.allow == ()
    assert events[-1] == {"type": "task_ended", "agent": "bank-agent", "namespace": NS,
                          "task": "T1", "purpose": "pay", "declared": True}  # fmt: skip
    d = decide(snapshot, mcp("read_inbox", {}, **T1), NOW, agent_state=s.table())
    assert d.code == Code.OUTSIDE_TASK and "has ended" in d.reason
    for allow in ((), DECLARED, [{}]):
        with pytest.raises(AgentStateError) as err:
            _report(s, allow)
        assert err.value.status == "FAILED_PRECONDITION" and "has ended" in str(err.value)
    with pytest.raises(AgentStateError) as err:
        s.end_task("bank-agent", NS, "T1")
    assert err.value.status == "NOT_FOUND"
    clock.t = NOW + 61  # its TTL is over: the id is free
    assert _report(s, ()).allow == ()


def test_an_ended_task_does_not_count_against_the_task_bound(
    store: tuple[AgentStateStore, Clock, list[Any]],
) -> None:
    s, clock, _ = store
    for i in range(MAX_TASKS_PER_AGENT):
        clock.t += 0.01
        _report(s, task=f"T{i}", ttl=600.0)
    with pytest.raises(AgentStateError):
        _report(s, task="one-too-many")
    s.end_task("bank-agent", NS, "T0")
    _report(s, task="one-too-many")  # room again; T0 still blocks its id
    with pytest.raises(AgentStateError):
        _report(s, task="T0")


def test_ending_an_undeclared_task_drops_it(
    store: tuple[AgentStateStore, Clock, list[Any]],
) -> None:
    s, _, _ = store
    _report(s, (), task="plain")
    assert s.end_task("bank-agent", NS, "plain") is None
    assert s.tasks(NS, "bank-agent") == []
    _report(s, (), task="plain")  # reported again at once


def test_a_restart_keeps_every_declared_and_ended_task(tmp_path: Path, snapshot: Snapshot) -> None:
    """Review finding: at load the store trimmed each agent to its newest 64 tasks, ended
    ones included, so a restart could drop a declared task (or its tombstone) and free its
    id for a report without the declaration. Trimming now drops only undeclared tasks."""
    clock = Clock()
    state = tmp_path / "context.json"

    def store() -> AgentStateStore:
        return AgentStateStore(
            SharedAgentState.create(size=4 * 1024 * 1024), state, lambda: snapshot, clock=clock
        )

    s = store()
    s.load_persisted()
    s.report_task("bank-agent", NS, "rent", "pay", 3600.0, DECLARED)
    for i in range(MAX_TASKS_PER_AGENT):
        clock.t += 0.01
        s.report_task("bank-agent", NS, f"t{i}", "pay", 600.0, [{"mcpTools": ["get_balance"]}])
        s.end_task("bank-agent", NS, f"t{i}")
    again = store()
    again.load_persisted()
    kept = {t.task: t for t in again.tasks(NS, "bank-agent")}
    assert "rent" in kept and kept["rent"].allow == DECLARED
    assert all(kept[f"t{i}"].ended for i in range(MAX_TASKS_PER_AGENT))
    with pytest.raises(AgentStateError):
        again.report_task("bank-agent", NS, "rent", "pay", 60.0, ())
    with pytest.raises(AgentStateError):
        again.report_task("bank-agent", NS, "t0", "pay", 60.0, ())
    view = mcp("send_money", {"to": "GB33", "amount": 900}, **{"x-mandate-task": "rent"})
    assert decide(snapshot, view, clock.t, agent_state=again.table()).code == Code.OUTSIDE_TASK


def test_an_overflowed_table_says_every_agent_is_withheld(snapshot: Snapshot) -> None:
    """Review finding: the risks-only table published on overflow said nobody was withheld:
    where it fit, readers took the agents' tasks as known (and absent), and a call naming a
    declared task got the purpose's whole rights."""
    from sidecar.core.agentstate import RiskState
    from sidecar.state.agentstate.layout import TableWriter

    risks = [RiskState("bank-agent", NS, 0.1)]
    only_risks = AgentStateTable.build(0, (), (), risks, [(NS, "bank-agent")])
    # one byte short of the risks with the withheld list (the old fallback, without the
    # list, fit there and was published as complete)
    size = len(SharedAgentState.create(size=1 << 16).encode(only_risks)) + 24 - 1
    shared = SharedAgentState.create(size=size)
    writer = TableWriter(shared)
    layout = writer.lay_out((), [task(DECLARED, expires=NOW + 60)], risks)
    assert layout.overflow
    writer.write(layout)
    read = shared.read()
    assert not read.tasks_known(NS, "bank-agent")
    view = mcp("send_money", {"to": "GB33", "amount": 900}, **T1)
    assert decide(snapshot, view, NOW, agent_state=read).code == Code.OUTSIDE_TASK
