"""The profile loader turns any input into a Snapshot or a ProfileErrors naming the file:
never another exception. Inputs: random bytes, random YAML documents, YAML-ish text and
mutations of the example profiles (fields deleted, renamed, retyped)."""

from __future__ import annotations

import copy
import tempfile
from pathlib import Path
from typing import Any

import yaml
from hypothesis import example, given, settings
from hypothesis import strategies as st

from sidecar.core import Snapshot, load_profiles
from sidecar.errors import ProfileErrors

EXAMPLE = Path(__file__).resolve().parents[2] / "devstack" / "demo" / "profiles" / "agents.yaml"
EXAMPLE_DOCS: list[dict[str, Any]] = list(yaml.safe_load_all(EXAMPLE.read_text()))
NAME = "profile.yaml"


def load_text(content: bytes) -> None:
    """Write ``content`` as the only profile file of a fresh directory and load it: a
    Snapshot, or ProfileErrors whose every problem names that file (or, for "nothing
    found", the directory)."""
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        path = directory / NAME
        path.write_bytes(content)
        try:
            snap = load_profiles(directory)
        except ProfileErrors as exc:
            assert exc.problems
            for p in exc.problems:
                assert p.message and isinstance(p.message, str)
                if p.file == str(directory):
                    assert p.message == "no AgentProfile documents found", p
                else:
                    assert p.file == str(path), p
                    assert str(p).startswith(str(path))
            return
        assert isinstance(snap, Snapshot)
        assert snap.agents


def dump(docs: list[Any]) -> bytes:
    return yaml.safe_dump_all(docs, allow_unicode=True, sort_keys=False).encode()


# --- strategies ------------------------------------------------------------------------------

VOCAB = [
    "apiVersion", "kind", "metadata", "name", "spec", "owner", "identities", "serviceAccount",
    "spiffe", "defaultPurpose", "purposes", "allow", "deny", "hosts", "methods", "paths",
    "mcpTools", "mcpMethods", "rateLimit", "requests", "per", "elevations", "behavior",
    "mode", "mandate.dev/v1alpha1", "AgentProfile", "GET", "/v1/**", "*.example.com", "1m",
]  # fmt: skip
scalar = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(VOCAB),
    st.text(max_size=12),
    st.binary(max_size=8),
)
key = st.one_of(
    st.sampled_from(VOCAB), st.text(max_size=8), st.integers(), st.none(), st.booleans()
)
node = st.recursive(
    scalar,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(key, inner, max_size=4),
    ),
    max_leaves=25,
)
profile_like = st.fixed_dictionaries(
    {"apiVersion": st.just("mandate.dev/v1alpha1"), "kind": st.just("AgentProfile")},
    optional={"metadata": node, "spec": node},
)

# YAML text that PyYAML itself must reject or turn into odd Python values: complex keys,
# anchors and aliases, merge keys, tags, tabs, unterminated flow collections, deep nesting.
FRAGMENTS = [
    "? [a, b]\n: 1\n", "? {a: 1}\n: 2\n", "{[1]: x}\n", "a: &x [1]\nb: *x\n", "*nope\n",
    "<<: {a: 1}\n", "<<: 5\n", "!!binary aGk=\n", "!!python/object:os.system x\n", "!foo x\n",
    "a: 1\na: 2\n", "---\n", "...\n", "\t- x\n", "[", "{", "]", "'", '"\\x', "%YAML 1.1\n",
    "%TAG ! tag:x,1:\n", "- - - x\n", "kind: AgentProfile\n", "apiVersion: mandate.dev/v1alpha1\n",
    "metadata: {name: x}\n", "spec:\n  owner: o\n", "2026-01-01: x\n", ".inf: .nan\n", "\ufeff",
    "\x00", "\x85", "a: !!set {x}\n", "a: !!omap [x: 1]\n", "a: !!timestamp 2026-13-99\n",
]  # fmt: skip
yaml_text = st.lists(st.sampled_from(FRAGMENTS), min_size=1, max_size=8).map("".join)
nested = st.builds(
    lambda opener, n, closer: (opener * n + "x" + closer * n).encode(),
    st.sampled_from(["[", "{a: ", "- "]),
    st.integers(min_value=1, max_value=1500),
    st.sampled_from(["]", "}", ""]),
)


@st.composite
def mutated_example(draw: st.DrawFn) -> bytes:
    """The example profiles with a few random fields deleted, renamed or retyped."""
    docs = copy.deepcopy(EXAMPLE_DOCS)
    for _ in range(draw(st.integers(min_value=1, max_value=4))):
        # walk to a random container
        parent: Any = draw(st.sampled_from(docs))
        for _ in range(draw(st.integers(min_value=0, max_value=6))):
            children = (
                [k for k, v in parent.items() if isinstance(v, dict | list) and v]
                if isinstance(parent, dict)
                else [i for i, v in enumerate(parent) if isinstance(v, dict | list) and v]
            )
            if not children:
                break
            parent = parent[draw(st.sampled_from(children))]
        if not parent:
            continue
        keys = list(parent) if isinstance(parent, dict) else list(range(len(parent)))
        k = draw(st.sampled_from(keys))
        action = draw(st.sampled_from(["delete", "rename", "retype", "duplicate"]))
        if action == "delete":
            del parent[k]
        elif action == "rename" and isinstance(parent, dict):
            parent[draw(st.one_of(st.sampled_from(VOCAB), st.text(max_size=6)))] = parent.pop(k)
        elif action == "duplicate" and isinstance(parent, list):
            parent.append(copy.deepcopy(parent[k]))
        else:
            parent[k] = draw(node)
    if draw(st.booleans()):
        docs.append(copy.deepcopy(draw(st.sampled_from(EXAMPLE_DOCS))))  # a duplicate agent
    return dump(docs)


@given(st.binary(max_size=300))
@example(b"\xff\xfe")
@example(b"")
def test_random_bytes(content: bytes) -> None:
    load_text(content)


@given(st.lists(st.one_of(node, profile_like), min_size=1, max_size=3))
def test_random_yaml_documents(docs: list[Any]) -> None:
    load_text(dump(docs))


@given(yaml_text)
@example("? [a, b]\n: 1\n")
@example("{[1]: x}\n")
def test_yaml_text(text: str) -> None:
    load_text(text.encode("utf-8", "surrogatepass"))


@settings(max_examples=15)  # each deep example runs to the recursion limit
@given(nested)
def test_deep_nesting(content: bytes) -> None:
    load_text(content)


@given(mutated_example())
def test_mutated_example_profiles(content: bytes) -> None:
    load_text(content)


def test_the_example_itself_loads() -> None:
    load_text(EXAMPLE.read_bytes())
