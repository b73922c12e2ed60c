"""Reading a profile directory into a snapshot, with errors that say where and what (pure I/O
of files only; no network, no transport, Kubernetes or telemetry imports).

The directory holds `*.yaml` / `*.yml` files, several documents each. Hidden entries are
skipped, which also skips the `..data` and timestamped folders of a Kubernetes ConfigMap
volume (its visible files are symlinks into them). Every problem found is reported as a
:class:`~sidecar.errors.ProfileProblem` naming the file, the 1-based document and the field
path (`spec.purposes.reconcile.allow[0].paths[1]`), and loading fails as a whole: a snapshot
is either entirely valid or not built.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from sidecar.core.model import API_VERSION, KIND, AgentProfile, json_schema
from sidecar.core.snapshot import Snapshot, SourceRef, compile_snapshot
from sidecar.errors import ProfileErrors, ProfileProblem

__all__ = ["fingerprint", "load_profiles", "profile_files"]

_SUFFIXES = (".yaml", ".yml")
_MAX_FILE_BYTES = 4 * 1024 * 1024


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate mapping keys (PyYAML keeps the last one silently)."""


def _construct_mapping(loader: _StrictLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    loader.flatten_mapping(node)
    seen: dict[Any, yaml.Node] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=True)
        try:
            hash(key)
        except TypeError:  # a complex key (`? [a]`, `{[1]: x}`): what SafeLoader says too
            raise yaml.constructor.ConstructorError(
                "while reading a mapping", node.start_mark, "found unhashable key",
                key_node.start_mark,
            ) from None  # fmt: skip
        if key in seen:
            raise yaml.constructor.ConstructorError(
                "while reading a mapping",
                node.start_mark,
                f"duplicate key {key!r} (first at line {seen[key].start_mark.line + 1})",
                key_node.start_mark,
            )
        seen[key] = key_node
    return loader.construct_mapping(node, deep=True)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def profile_files(directory: Path) -> list[Path]:
    """The profile files of a directory, sorted by name; hidden entries are skipped."""
    return sorted(
        p
        for p in directory.iterdir()
        if not p.name.startswith(".") and p.name.endswith(_SUFFIXES) and p.is_file()
    )


def fingerprint(directory: Path) -> str:
    """A cheap identity of the directory's visible content: names, sizes, mtimes, inodes of
    the files symlinks resolve to. Changes whenever a reload could see something new."""
    h = hashlib.sha256()
    try:
        for p in profile_files(directory):
            st = p.stat()
            h.update(f"{p.name}\0{st.st_ino}\0{st.st_size}\0{st.st_mtime_ns}\0".encode())
    except OSError as exc:
        h.update(f"error:{exc}".encode())
    return h.hexdigest()


@cache
def _schema() -> dict[str, Any]:
    return json_schema()


def _schema_at(loc: tuple[int | str, ...]) -> dict[str, Any] | None:
    """The JSON-schema node describing the field at a pydantic error location."""
    root = _schema()
    node: dict[str, Any] | None = root

    def resolve(n: dict[str, Any]) -> dict[str, Any]:
        while "$ref" in n:
            n = root["$defs"][n["$ref"].rsplit("/", 1)[1]]
        return n

    for part in loc:
        if node is None:
            return None
        node = resolve(node)
        if "anyOf" in node:
            options = [resolve(o) for o in node["anyOf"] if o.get("type") != "null"]
            node = options[0] if len(options) == 1 else None
            if node is None:
                return None
        if isinstance(part, int):
            node = node.get("items")
        elif part == "[key]":
            return None
        elif "properties" in node and part in node["properties"]:
            node = node["properties"][part]
        elif isinstance(node.get("additionalProperties"), dict):
            node = node["additionalProperties"]
        elif node.get("patternProperties"):
            node = next(iter(node["patternProperties"].values()))
        else:
            return None
    if node is None:
        return None
    node = resolve(node)
    if "anyOf" in node:
        # An optional object (`rateLimit`, `behavior`) is the object; a leaf keeps the outer
        # node, which carries the field's description.
        options = [resolve(o) for o in node["anyOf"] if o.get("type") != "null"]
        if len(options) == 1 and "properties" in options[0]:
            return options[0]
    return node


def _format_loc(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part == "[key]":
            out += " (name)"
        else:
            out += ("." if out else "") + str(part)
    return out


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _message(err: Any) -> str:
    kind = err["type"]
    loc = tuple(err["loc"])
    if kind == "extra_forbidden":
        parent = _schema_at(loc[:-1])
        allowed = sorted(parent.get("properties", {})) if parent else []
        hint = f"; allowed here: {', '.join(allowed)}" if allowed else ""
        if loc[-1] == "foldPaths":
            hint += " (foldPaths is for deny rules only: on an allow rule it would widen it)"
        return f"unknown field {loc[-1]!r}{hint}"
    if kind == "missing":
        return "required field is missing"
    msg: str = err["msg"]
    if msg.startswith("Value error, "):
        return msg[len("Value error, ") :]
    if kind == "string_pattern_mismatch":
        node = _schema_at(loc)
        if node and node.get("description"):
            return f"expected {node['description']}, got {_short(err['input'])}"
    if not isinstance(err.get("input"), dict | list):
        msg += f", got {_short(err.get('input'))}"
    return msg


def _documents(path: Path, label: str) -> Iterator[tuple[int, Any] | ProfileProblem]:
    try:
        with path.open("rb") as f:
            raw = f.read(_MAX_FILE_BYTES + 1)
    except OSError as exc:
        yield ProfileProblem(label, None, "", f"cannot read file: {exc.strerror or exc}")
        return
    if len(raw) > _MAX_FILE_BYTES:
        yield ProfileProblem(label, None, "", f"file is larger than {_MAX_FILE_BYTES} bytes")
        return
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        yield ProfileProblem(label, None, "", f"not UTF-8 text (byte {exc.start})")
        return
    number = 1
    loader: _StrictLoader | None = None
    try:
        loader = _StrictLoader(text)  # the reader refuses unprintable characters here already
        while loader.check_data():  # type: ignore[no-untyped-call]
            yield number, loader.get_data()
            number += 1
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        yield ProfileProblem(label, number, "", f"invalid YAML{where}: {problem}")
    except RecursionError:  # PyYAML parses and constructs nested collections recursively
        yield ProfileProblem(label, number, "", "invalid YAML: collections nested too deeply")
    finally:
        if loader is not None:
            loader.dispose()


def _validate(doc: Any, label: str, number: int) -> AgentProfile | list[ProfileProblem]:
    if not isinstance(doc, dict):
        return [ProfileProblem(label, number, "", "expected a mapping (an AgentProfile object)")]
    kind, api = doc.get("kind"), doc.get("apiVersion")
    if kind != KIND or api != API_VERSION:
        return [
            ProfileProblem(
                label,
                number,
                "kind" if kind != KIND else "apiVersion",
                f"expected apiVersion {API_VERSION!r} and kind {KIND!r}, "
                f"got {_short(api)} and {_short(kind)}",
            )
        ]
    try:
        return AgentProfile.model_validate(doc)
    except ValidationError as exc:
        return [
            ProfileProblem(label, number, _format_loc(tuple(e["loc"])), _message(e))
            for e in exc.errors(include_url=False)
        ]


def load_profiles(directory: str | os.PathLike[str]) -> Snapshot:
    """Load, validate and compile every profile in ``directory``; raise ProfileErrors listing
    every problem if anything is wrong."""
    base = Path(directory)
    problems: list[ProfileProblem] = []
    try:
        files = profile_files(base)
    except OSError as exc:
        raise ProfileErrors(
            [ProfileProblem(str(base), None, "", f"cannot list directory: {exc.strerror or exc}")]
        ) from None
    digest = hashlib.sha256()
    profiles: list[tuple[AgentProfile, SourceRef]] = []
    names: dict[str, SourceRef] = {}
    identities: dict[str, tuple[str, SourceRef]] = {}
    for path in files:
        label = str(path)
        for item in _documents(path, label):
            if isinstance(item, ProfileProblem):
                problems.append(item)
                continue
            number, doc = item
            if doc is None:
                continue  # an empty document (e.g. a trailing '---')
            result = _validate(doc, label, number)
            if isinstance(result, list):
                problems.extend(result)
                continue
            ref = SourceRef(label, number)
            name = result.metadata.name
            if name in names:
                problems.append(
                    ProfileProblem(
                        label,
                        number,
                        "metadata.name",
                        f"agent {name!r} is already defined in {names[name]}",
                    )
                )
                continue
            names[name] = ref
            for i, ident in enumerate(result.spec.identities):
                key = ident.service_account or ident.spiffe or ""
                other = identities.get(key)
                if other is not None and other[0] != name:
                    problems.append(
                        ProfileProblem(
                            label,
                            number,
                            f"spec.identities[{i}]",
                            f"identity {key!r} already belongs to agent {other[0]!r} ({other[1]})",
                        )
                    )
                identities[key] = (name, ref)
                if ident.service_account is not None:
                    bare = ident.service_account.rpartition("/")[2]
                    clash = _same_account(identities, ident.service_account, bare, name)
                    if clash is not None:
                        problems.append(
                            ProfileProblem(
                                label,
                                number,
                                f"spec.identities[{i}]",
                                f"service account {key!r} may be the same as {clash[0]!r} "
                                f"of agent {clash[1]!r} (a name alone is that account in the "
                                "sidecar's namespace): give both as namespace/name",
                            )
                        )
            profiles.append((result, ref))
            digest.update(label.encode() + b"\0" + repr(doc).encode() + b"\0")
    if not files and not problems:
        problems.append(ProfileProblem(str(base), None, "", "no *.yaml or *.yml files found"))
    elif not profiles and not problems:
        problems.append(ProfileProblem(str(base), None, "", "no AgentProfile documents found"))
    if problems:
        raise ProfileErrors(problems)
    return compile_snapshot(
        profiles, version=digest.hexdigest()[:12], files=[str(p) for p in files]
    )


def _same_account(
    identities: dict[str, tuple[str, Any]], key: str, bare: str, agent: str
) -> tuple[str, str] | None:
    """Another agent's service-account identity that names the same account as ``key``
    when one of the two is a name alone, or None."""
    for other, (owner, _) in identities.items():
        if owner == agent or other.startswith("spiffe://"):
            continue
        if ("/" in key) == ("/" in other):
            continue  # both namespaced (or both bare): equal keys are caught already
        if other.rpartition("/")[2] == bare:
            return other, owner
    return None
