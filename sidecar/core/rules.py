"""Compiled rules and the per-purpose rule index (pure).

Rules are compiled once when profiles load: methods into sets, path patterns into one
anchored regex per rule, host patterns into an index keyed by exact host and by the parent
domain of `*.` patterns. A lookup touches at most three index buckets (exact host, its
wildcard parent, rules without hosts) and, within each, only the rules that can match the
request's method and the first segment of its path (a rule whose patterns all start with a
literal segment is filed under those segments; the others are candidates for every path),
in profile order. Lookup cost therefore follows the rules that could match, not the size of
the profile. The first matching rule in profile order wins, so the
rule a decision names is the one a reader finds first in the YAML.

A deny rule with `foldPaths: true` matches the folded path (`paths.fold_path`: NFKC,
case-folded, trailing dots and spaces stripped from each segment) against its folded
patterns, and is a candidate for every first segment (`/V1/...` must reach a rule filed
under `v1`); the folded path is computed once per lookup, and only if such a rule is tried.

A deny rule with `mcpTools`/`mcpMethods` matches a POST whose body names what it lists or
cannot be read as JSON-RPC (mandate cannot tell what it would do); other methods carry no
MCP message, so it does not match them.

CONNECT tunnels are opaque to mandate, so they are authorised by host:port alone, and
conservatively: an allow rule admits a tunnel only if it lists CONNECT in `methods` or
restricts nothing but hosts; a deny rule whose host matches refuses the tunnel whatever
else it restricts (inside the tunnel the agent could send exactly what the rule denies).
This module must not import any transport, Kubernetes or telemetry library.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType

from sidecar.core.arguments import Validator, compile_arguments, compile_schema
from sidecar.core.hosts import parse_host_pattern
from sidecar.core.mcp import McpBody, mcp_allows, mcp_denies
from sidecar.core.model import DenyRule, Rule
from sidecar.core.paths import compile_path_patterns, fold_path

__all__ = ["CONNECT", "CompiledRule", "RuleIndex", "compile_rules"]

CONNECT = "CONNECT"
_ALL = "\x00all"  # bucket key holding every entry, for CONNECT deny checks
_ANY_METHOD = ""  # bucket key for methods no rule names


@dataclass(frozen=True, slots=True)
class CompiledRule:
    rule_id: str
    order: int
    methods: frozenset[str] | None
    path_re: re.Pattern[str] | None
    mcp_tools: frozenset[str]
    mcp_methods: frozenset[str]
    mcp_methods_folded: frozenset[str]  # case-folded, for deny rules (`mcp_denies`)
    is_mcp: bool
    whole_host: bool  # restricts only hosts: may authorise a CONNECT tunnel
    fold_paths: bool  # path_re matches fold_path(path) (deny rules with `foldPaths: true`)
    # per tool: the compiled `mcpArguments` constraint its tools/call arguments must satisfy
    mcp_arguments: Mapping[str, Validator] | None = None
    query_check: Validator | None = None  # the compiled `query` constraint
    body_check: Validator | None = None  # the compiled `jsonBody` constraint
    # The literal first path segments its patterns start with; None: any path (no paths, or
    # a pattern starting with `*`/`**`).
    first_segments: frozenset[str] | None = None
    # What a decision names as the argument constraints that admitted a call (made once
    # here, not per call): per constrained tool "<rule id> mcpArguments.<tool>", and
    # "<rule id> query, jsonBody" for the HTTP constraints ("" if none)
    argument_labels: Mapping[str, str] | None = None
    http_label: str = ""

    def admits_connect(self) -> bool:
        return self.whole_host or (self.methods is not None and CONNECT in self.methods)


@dataclass(frozen=True, slots=True)
class _Entry:
    rule: CompiledRule
    port: int | None


@dataclass(frozen=True, slots=True)
class _Candidates:
    """Entries (in profile order) that may match a path, by the path's first segment."""

    by_segment: Mapping[str, tuple[_Entry, ...]]
    other: tuple[_Entry, ...]  # for a first segment no rule names literally

    def for_segment(self, segment: str) -> tuple[_Entry, ...]:
        return self.by_segment.get(segment, self.other)


def _candidates(entries: Sequence[_Entry]) -> _Candidates:
    anywhere = [e for e in entries if e.rule.first_segments is None]
    segments: set[str] = set()
    for e in entries:
        segments |= e.rule.first_segments or frozenset()
    by_segment = {
        seg: tuple(
            e for e in entries if e.rule.first_segments is None or seg in e.rule.first_segments
        )
        for seg in segments
    }
    return _Candidates(MappingProxyType(by_segment), tuple(anywhere))


_Bucket = Mapping[str, _Candidates]


@dataclass(frozen=True, slots=True)
class Match:
    """The result of a lookup: the rule that matched, or why an MCP rule refused the body."""

    rule: CompiledRule | None
    mcp_refusal: str | None = None


_NO_MATCH = Match(None)


def _bucket(entries: Sequence[_Entry]) -> _Bucket:
    named: set[str] = set()
    for e in entries:
        if e.rule.methods is not None:
            named |= e.rule.methods
    out: dict[str, _Candidates] = {
        m: _candidates([e for e in entries if e.rule.methods is None or m in e.rule.methods])
        for m in named
    }
    out[_ANY_METHOD] = _candidates([e for e in entries if e.rule.methods is None])
    out[_ALL] = _Candidates(MappingProxyType({}), tuple(entries))
    return MappingProxyType(out)


_EMPTY_BUCKET: _Bucket = _bucket(())


@dataclass(frozen=True, slots=True)
class RuleIndex:
    exact: Mapping[str, _Bucket]
    wildcard: Mapping[str, _Bucket]
    any_host: _Bucket
    size: int

    def _buckets(self, host: str) -> Iterator[_Bucket]:
        b = self.exact.get(host)
        if b is not None:
            yield b
        dot = host.find(".")
        if dot != -1 and self.wildcard:
            b = self.wildcard.get(host[dot + 1 :])
            if b is not None:
                yield b
        yield self.any_host

    def lookup(
        self,
        host: str,
        port: int,
        method: str,
        path: str,
        body: Callable[[], McpBody],
        *,
        deny: bool,
    ) -> Match:
        """The first rule (in profile order) matching the request, for an allow or deny list."""
        if not self.size:
            return _NO_MATCH  # e.g. a purpose without deny rules: nothing to walk
        if method == CONNECT:
            return self._lookup_connect(host, port, deny=deny)
        best: CompiledRule | None = None
        refusal: str | None = None
        folded: str | None = None
        slash = path.find("/", 1)
        segment = path[1:] if slash == -1 else path[1:slash]
        for bucket in self._buckets(host):
            candidates = bucket.get(method)
            if candidates is None:
                candidates = bucket[_ANY_METHOD]
            for e in candidates.for_segment(segment):
                r = e.rule
                if best is not None and r.order >= best.order:
                    break
                if e.port is not None and e.port != port:
                    continue
                if r.path_re is not None:
                    if r.fold_paths:
                        if folded is None:
                            folded = fold_path(path)
                        if r.path_re.match(folded) is None:
                            continue
                    elif r.path_re.match(path) is None:
                        continue
                if r.is_mcp:
                    if deny and method != "POST":
                        continue  # MCP messages travel by POST; other methods carry none
                    parsed = body()
                    if deny:
                        if not mcp_denies(parsed, r.mcp_tools, r.mcp_methods_folded):
                            continue
                    else:
                        why = mcp_allows(parsed, r.mcp_tools, r.mcp_methods, r.mcp_arguments)
                        if why is not None:
                            refusal = refusal or why
                            continue
                if not deny and (r.query_check is not None or r.body_check is not None):
                    why = body.refusal(r)  # type: ignore[attr-defined]
                    if why is not None:
                        refusal = refusal or why
                        continue
                best = r
                break
        if best is None:
            return Match(None, refusal) if refusal else _NO_MATCH
        return Match(best)

    def _lookup_connect(self, host: str, port: int, *, deny: bool) -> Match:
        best: CompiledRule | None = None
        for bucket in self._buckets(host):
            for e in bucket[_ALL].other:
                r = e.rule
                if best is not None and r.order >= best.order:
                    break
                if e.port is not None and e.port != port:
                    continue
                if deny or r.admits_connect():
                    best = r
                    break
        return Match(best) if best else _NO_MATCH


def compile_rules(rules: Sequence[Rule], id_prefix: str) -> RuleIndex:
    """Compile validated rules (``id_prefix`` e.g. ``reconcile.allow``) into an index."""
    exact: dict[str, list[_Entry]] = {}
    wildcard: dict[str, list[_Entry]] = {}
    any_host: list[_Entry] = []
    for i, rule in enumerate(rules):
        is_mcp = rule.mcp_tools is not None or rule.mcp_methods is not None
        fold = isinstance(rule, DenyRule) and rule.fold_paths and rule.paths is not None
        compiled = CompiledRule(
            rule_id=f"{id_prefix}[{i}]",
            order=i,
            methods=frozenset(m.upper() for m in rule.methods) if rule.methods else None,
            path_re=compile_path_patterns(rule.paths, fold=fold) if rule.paths else None,
            mcp_tools=frozenset(rule.mcp_tools or ()),
            mcp_methods=frozenset(rule.mcp_methods or ()),
            mcp_methods_folded=frozenset(m.casefold() for m in rule.mcp_methods or ()),
            is_mcp=is_mcp,
            whole_host=rule.methods is None and rule.paths is None and not is_mcp,
            fold_paths=fold,
            first_segments=None if fold else _first_segments(rule.paths),
            mcp_arguments=(
                MappingProxyType(dict(compile_arguments(rule.mcp_arguments)))
                if rule.mcp_arguments
                else None
            ),
            query_check=compile_schema(rule.query) if rule.query is not None else None,
            body_check=compile_schema(rule.json_body) if rule.json_body is not None else None,
            argument_labels=(
                MappingProxyType(
                    {t: f"{id_prefix}[{i}] mcpArguments.{t}" for t in rule.mcp_arguments}
                )
                if rule.mcp_arguments
                else None
            ),
            http_label=_http_label(f"{id_prefix}[{i}]", rule),
        )
        if rule.hosts is None:
            any_host.append(_Entry(compiled, None))
            continue
        for text in rule.hosts:
            hp = parse_host_pattern(text)
            target = wildcard if hp.wildcard else exact
            target.setdefault(hp.host, []).append(_Entry(compiled, hp.port))
    return RuleIndex(
        exact=MappingProxyType({h: _bucket(es) for h, es in exact.items()}),
        wildcard=MappingProxyType({h: _bucket(es) for h, es in wildcard.items()}),
        any_host=_bucket(any_host) if any_host else _EMPTY_BUCKET,
        size=len(rules),
    )


def _http_label(rule_id: str, rule: Rule) -> str:
    parts = [n for n, v in (("query", rule.query), ("jsonBody", rule.json_body)) if v is not None]
    return f"{rule_id} {', '.join(parts)}" if parts else ""


def _first_segments(patterns: Sequence[str] | None) -> frozenset[str] | None:
    """The literal first segments of validated path patterns, or None if any pattern (or
    the absence of patterns) may match a path starting with any segment."""
    if not patterns:
        return None
    out: set[str] = set()
    for p in patterns:
        first = p[1:].split("/", 1)[0]  # "/" -> "" (matches only the root path)
        if "*" in first:
            return None
        out.add(first)
    return frozenset(out)
