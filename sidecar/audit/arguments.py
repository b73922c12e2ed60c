"""What a decision record keeps of a call's arguments (pure): its ``arguments`` member.

Made on the audit writer's thread, off the Check path, from the Decision's
:class:`~sidecar.core.recording.CallArguments` and the profile's choice (`spec.audit`):

- an MCP body (JSON-RPC): ``"mcp"``, one entry per message: ``method``, ``notification``
  (true for a message without an id), ``response`` (true for a client's answer), and for a
  ``tools/call`` its ``tool`` and ``args`` (its top-level arguments; ``args_type`` instead
  when they are not an object);
- another JSON object body: ``"json"``, its top-level fields; another body: ``"body"``:
  ``"json_value"`` (JSON, not an object), ``"not_json"`` (not strict JSON, see
  `sidecar.core.mcp`), ``"truncated"`` (not seen whole) or ``"withheld"`` (let go unread:
  the writer's queue held its maximum of call bodies, see `writer`);
- query parameters: ``"query"`` (a name given twice is an array, as rules read it), or
  ``"query_unreadable": true``.

Each argument is ``{"type": T}`` (a JSON Schema type: string, integer, number, boolean,
null, object, array), with, by the profile's choice: ``"value"`` (a name listed in
`spec.audit.values`, at most 1 KiB of JSON; a longer one gets ``"long": true`` and is
recorded like the others), ``"hash"`` (mode ``hashes``: the first 8 bytes of
HMAC-SHA256(key, canonical JSON of the value), hex), or nothing more (mode ``types``). An
object not kept in clear also has ``"keys"`` (its member names and their types, up to 64
members), an array ``"items"`` (the types of its elements).

Names are the call's data too (a JSON object keyed by e-mail addresses or card numbers): a
name (of an argument, a field, a query parameter, a member in ``keys``) is recorded as it
is only if it looks like an identifier (:data:`NAME`: a letter or `_`, then up to 63
letters, digits, `_`, `-`, `.`); any other is recorded as ``"#"`` and its keyed hash (mode
``hashes``) or as ``"#"`` and its position (else), never in clear. Over 128 arguments (or
messages), the rest are counted in ``<member>_omitted``. With any hash, ``"key"`` names the
key (an id derived from it, which reveals nothing of it): hashes are comparable only under
one key. Without a key (it could not be read or created: the writer logs why), hashes are
left out and ``"key"`` is ``"unavailable"``: the record is still written, never with an
unkeyed hash, which a dictionary of likely values (amounts, e-mail addresses) would undo.

At most :data:`RECORD_MAX_BYTES` of JSON: a larger member (a batch of many messages of many
arguments can make six times its body's bytes) is replaced by ``{"omitted": "too large",
"bytes": n}``, so that an agent cannot fill the audit volume faster than it sends.

Never raises: an argument that cannot be encoded is marked ``"unhashable": true``, and
anything else unexpected becomes ``{"error": ...}``, so no record is lost to its arguments.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass, field
from json.encoder import encode_basestring as _encode_str
from typing import Any

from sidecar.audit.canonical import canonical_json
from sidecar.core.arguments import query_arguments
from sidecar.core.callfacts import NAME, json_type
from sidecar.core.mcp import JsonRefusal, McpMessage, mcp_messages, parse_json_body
from sidecar.core.recording import ArgumentRecording, CallArguments

__all__ = [
    "ENTRIES_MAX",
    "NAME",
    "RECORD_MAX_BYTES",
    "VALUE_MAX_BYTES",
    "ArgumentKey",
    "json_type",
    "recorded_arguments",
]

VALUE_MAX_BYTES = 1024
ENTRIES_MAX = 128
RECORD_MAX_BYTES = 16 * 1024
_KEYS_MAX = 64
_HASH_BYTES = 8
_KEY_ID_INPUT = b"mandate-audit-argument-key-id"


@dataclass(frozen=True, slots=True)
class ArgumentKey:
    """The HMAC key of an audit directory (``secret``, never shown) and its public id."""

    secret: bytes = field(repr=False)
    id: str
    # HMAC's inner and outer SHA-256 states after the padded key (RFC 2104), made once:
    # each hash then costs two state copies (0.5 µs instead of 1.2 for hmac.digest)
    _inner: Any = field(default=None, repr=False, compare=False)
    _outer: Any = field(default=None, repr=False, compare=False)

    @classmethod
    def of(cls, secret: bytes) -> ArgumentKey:
        kid = hmac.digest(secret, _KEY_ID_INPUT, "sha256")[:6].hex()
        block = secret if len(secret) <= 64 else hashlib.sha256(secret).digest()
        block = block.ljust(64, b"\0")
        inner = hashlib.sha256(bytes(b ^ 0x36 for b in block))
        outer = hashlib.sha256(bytes(b ^ 0x5C for b in block))
        return cls(secret, kid, inner, outer)

    def mac(self, data: bytes) -> str:
        """HMAC-SHA256(secret, data), its first 8 bytes in hex."""
        inner = self._inner.copy()
        inner.update(data)
        outer = self._outer.copy()
        outer.update(inner.digest())
        return str(outer.hexdigest()[: 2 * _HASH_BYTES])


def _canonical(value: object) -> bytes:
    """`canonical_json` of one value, with the common scalars done directly (this runs once
    per argument of every audited call)."""
    if type(value) is str:
        return _encode_str(value).encode("utf-8", "backslashreplace")
    if type(value) is int:
        return int.__repr__(value).encode("ascii")
    return canonical_json(value)


def recorded_arguments(args: CallArguments, key: ArgumentKey | None) -> dict[str, Any] | None:
    """The ``arguments`` member of the call's decision record, or None when there is
    nothing to keep. ``key``: the audit directory's key (None: not available)."""
    try:
        out = _Recorder(args.recording, key).record(args)
        if out is not None:
            size = len(canonical_json(out))
            if size > RECORD_MAX_BYTES:
                return {"omitted": "too large", "bytes": size}
        return out
    except Exception as exc:  # a bug must not cost the record: it says so instead
        return {"error": f"the arguments could not be recorded ({type(exc).__name__})"}


class _Recorder:
    __slots__ = ("hashed", "hashes", "key", "values")

    def __init__(self, recording: ArgumentRecording, key: ArgumentKey | None) -> None:
        self.values = recording.values
        self.hashes = recording.mode == "hashes"
        self.key = key
        self.hashed = False  # an argument was (or, without a key, would have been) hashed

    def record(self, a: CallArguments) -> dict[str, Any] | None:
        out: dict[str, Any] = {}
        if a.withheld:
            out["body"] = "withheld"
        elif a.body is not None:
            self._body(a, out)
        if "?" in a.target:
            query = query_arguments(a.target)
            if isinstance(query, str):
                out["query_unreadable"] = True
            elif query:
                self._entries(query, out, "query")
        if self.hashed:
            out["key"] = self.key.id if self.key is not None else "unavailable"
        return out or None

    def _body(self, a: CallArguments, out: dict[str, Any]) -> None:
        mcp = a.mcp
        if mcp is not None and mcp.error is None:
            self._messages(mcp.messages, out)
            return
        doc = parse_json_body(a.body, a.truncated)
        if isinstance(doc, JsonRefusal):
            out["body"] = "truncated" if a.truncated else "not_json"
            return
        if mcp is None:  # the rules did not read it as MCP: is it?
            parsed = mcp_messages(doc)
            if parsed.error is None:
                self._messages(parsed.messages, out)
                return
        if isinstance(doc, dict):
            self._entries(doc, out, "json")
        else:
            out["body"] = "json_value"

    def _messages(self, messages: tuple[McpMessage, ...], out: dict[str, Any]) -> None:
        kept = []
        for m in messages[:ENTRIES_MAX]:
            if m.method is None:
                kept.append({"response": True})
                continue
            e: dict[str, Any] = {"method": m.method}
            if m.notification:
                e["notification"] = True
            if m.tool is not None:
                e["tool"] = m.tool
                if isinstance(m.arguments, dict):
                    self._entries(m.arguments, e, "args")
                elif m.arguments is not None:
                    e["args_type"] = json_type(m.arguments)
            kept.append(e)
        out["mcp"] = kept
        if len(messages) > ENTRIES_MAX:
            out["mcp_omitted"] = len(messages) - ENTRIES_MAX

    def _entries(self, obj: dict[str, Any], out: dict[str, Any], member: str) -> None:
        entries: dict[str, Any] = {}
        for i, (name, value) in enumerate(obj.items()):
            if i == ENTRIES_MAX:
                out[f"{member}_omitted"] = len(obj) - ENTRIES_MAX
                break
            entries[self._name(name, i)] = self._entry(name, value)
        out[member] = entries

    def _name(self, name: str, i: int) -> str:
        """``name`` as a record may show it (see the module's docstring)."""
        if NAME.fullmatch(name):
            return name
        if self.hashes and self.key is not None:
            try:
                return "#" + self.key.mac(_canonical(name))
            except (ValueError, RecursionError):
                pass
        return f"#{i}"

    def _entry(self, name: str, value: object) -> dict[str, Any]:
        t = json_type(value)
        e: dict[str, Any] = {"type": t}
        text: bytes | None = None
        try:
            if name in self.values:
                text = _canonical(value)
                if len(text) <= VALUE_MAX_BYTES:
                    e["value"] = value
                    return e
                e["long"] = True
            if self.hashes:
                self.hashed = True
                if self.key is not None:
                    text = text if text is not None else _canonical(value)
                    e["hash"] = self.key.mac(text)
        except (ValueError, RecursionError):
            e["unhashable"] = True
        if t == "object":
            assert isinstance(value, dict)
            if len(value) <= _KEYS_MAX:
                e["keys"] = {
                    self._name(k, j): json_type(v) for j, (k, v) in enumerate(value.items())
                }
        elif t == "array":
            assert isinstance(value, list)
            e["items"] = sorted({json_type(v) for v in value})
        return e
