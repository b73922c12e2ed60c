"""The emulated cluster's storage: objects, resourceVersions, history, watches.

What clients depend on, and what this keeps faithful:
- one cluster-wide resourceVersion counter (etcd's revision): every write takes the next
  value, which becomes the object's `metadata.resourceVersion`; a list reports the current
  one; a DELETED event carries the revision of the deletion;
- a write that changes nothing is no write: no new resourceVersion, no event;
- a history of events, so that a watch from resourceVersion N gets exactly the events after
  N; `compact()` forgets history like etcd compaction, after which a watch from before the
  compaction gets `410 Gone` ("too old resource version");
- watches get events in resourceVersion order, filtered by namespace and selectors.

Thread-safe: tests call it from their thread while the server's event loop serves HTTP.
Watch sinks are called under the lock and must not block (they hand over to a loop).
"""

from __future__ import annotations

import base64
import copy
import json
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from .schema import BUILTIN_TYPES, ResourceType, format_rfc3339, structural_errors, types_from_crd

__all__ = ["ABORT", "END", "ApiError", "Cluster", "Selector", "Watch"]

Obj = dict[str, Any]
StoreKey = tuple[str, str, str, str]  # group, plural, namespace ("" if cluster-scoped), name

# Sentinels delivered to watch sinks (besides event dicts).
END = "END"  # the stream ends cleanly (as at timeoutSeconds)
ABORT = "ABORT"  # the connection is cut (API server going away)


class ApiError(Exception):
    """An API error as a Status object (kubectl and clients read reason, message, details)."""

    def __init__(
        self,
        code: int,
        reason: str,
        message: str,
        details: Mapping[str, Any] | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.reason = reason
        self.message = message
        self.details = dict(details or {})
        self.headers = dict(headers or {})

    def status(self) -> Obj:
        body: Obj = {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code,
        }
        if self.details:
            body["details"] = self.details
        return body


def not_found(rtype: ResourceType, name: str) -> ApiError:
    return ApiError(
        404,
        "NotFound",
        f'{rtype.qualified} "{name}" not found',
        {"name": name, "group": rtype.group, "kind": rtype.plural},
    )


def gone(message: str) -> ApiError:
    return ApiError(410, "Expired", message)


@dataclass
class Selector:
    """fieldSelector and labelSelector, the subset clients use: =, ==, !=, exists, !exists,
    in, notin."""

    fields: list[tuple[str, str, str]] = field(default_factory=list)
    labels: list[tuple[str, str, Any]] = field(default_factory=list)

    @classmethod
    def parse(cls, field_selector: str = "", label_selector: str = "") -> Selector:
        sel = cls()
        for term in _split(field_selector):
            for op in ("!=", "==", "="):
                if op in term:
                    key, value = term.split(op, 1)
                    sel.fields.append((key.strip(), "!=" if op == "!=" else "=", value.strip()))
                    break
            else:
                raise ApiError(400, "BadRequest", f'invalid selector: "{field_selector}"')
        for term in _split(label_selector):
            term = term.strip()
            if " notin " in term or " in " in term:
                op = "notin" if " notin " in term else "in"
                key, rest = term.split(f" {op} ", 1)
                values = {v.strip() for v in rest.strip().strip("()").split(",") if v.strip()}
                sel.labels.append((key.strip(), op, values))
            elif "!=" in term:
                key, value = term.split("!=", 1)
                sel.labels.append((key.strip(), "!=", value.strip()))
            elif "=" in term:
                key, value = term.split("==", 1) if "==" in term else term.split("=", 1)
                sel.labels.append((key.strip(), "=", value.strip()))
            elif term.startswith("!"):
                sel.labels.append((term[1:].strip(), "!exists", None))
            elif term:
                sel.labels.append((term, "exists", None))
        return sel

    def matches(self, obj: Mapping[str, Any]) -> bool:
        for key, op, value in self.fields:
            actual = _field(obj, key)
            if (actual == value) != (op == "="):
                return False
        labels = (obj.get("metadata") or {}).get("labels") or {}
        for key, op, value in self.labels:
            ok = {
                "=": labels.get(key) == value,
                "!=": labels.get(key) != value,
                "exists": key in labels,
                "!exists": key not in labels,
                "in": labels.get(key) in value,
                "notin": labels.get(key) not in value,
            }[op]
            if not ok:
                return False
        return True


def _split(selector: str) -> list[str]:
    """Split on commas outside parentheses."""
    out, depth, cur = [], 0, ""
    for ch in selector or "":
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        if ch == "," and depth == 0:
            out.append(cur)
            cur = ""
        else:
            cur += ch
    if cur.strip():
        out.append(cur)
    return [t for t in out if t.strip()]


def _field(obj: Mapping[str, Any], path: str) -> str:
    node: Any = obj
    for part in path.split("."):
        if not isinstance(node, Mapping):
            return ""
        node = node.get(part)
    return "" if node is None else str(node)


@dataclass(eq=False)
class Watch:
    rtype: ResourceType
    namespace: str | None
    selector: Selector
    bookmarks: bool
    sink: Callable[[Any], None]


class Cluster:
    """In-memory storage with etcd-like revisions. All methods are thread-safe."""

    def __init__(self, *, first_rv: int = 1000, clock: Callable[[], float] = time.time) -> None:
        self._lock = threading.RLock()
        self._clock = clock
        self.rv = first_rv
        self.compacted_rv = first_rv
        self._objects: dict[StoreKey, Obj] = {}
        self._history: list[tuple[int, tuple[str, str], str, Obj]] = []
        self._watches: set[Watch] = set()
        self._types: dict[tuple[str, str, str], ResourceType] = {}
        for rtype in BUILTIN_TYPES:
            self._types[(rtype.group, rtype.version, rtype.plural)] = rtype

    # -- resource types -------------------------------------------------------------------

    def types(self) -> list[ResourceType]:
        with self._lock:
            return list(self._types.values())

    def find_type(self, group: str, version: str, plural: str) -> ResourceType | None:
        with self._lock:
            return self._types.get((group, version, plural))

    def type_for_kind(self, api_version: str, kind: str) -> ResourceType | None:
        with self._lock:
            for rtype in self._types.values():
                if rtype.api_version == api_version and rtype.kind == kind:
                    return rtype
        return None

    def _sync_crd_types(self) -> None:
        """Serve exactly the resources of the stored CRDs (plus the built-in ones)."""
        types = {(t.group, t.version, t.plural): t for t in BUILTIN_TYPES}
        for key, obj in self._objects.items():
            if key[:2] == ("apiextensions.k8s.io", "customresourcedefinitions"):
                for rtype in types_from_crd(obj):
                    types[(rtype.group, rtype.version, rtype.plural)] = rtype
        self._types = types

    # -- reading --------------------------------------------------------------------------

    def get(self, rtype: ResourceType, namespace: str | None, name: str) -> Obj:
        with self._lock:
            obj = self._objects.get(self._key(rtype, namespace, name))
            if obj is None:
                raise not_found(rtype, name)
            return self._render(rtype, obj)

    def list(
        self,
        rtype: ResourceType,
        namespace: str | None,
        selector: Selector | None = None,
        *,
        limit: int = 0,
        continue_token: str = "",
        resource_version: str = "",
        resource_version_match: str = "",
    ) -> tuple[list[Obj], Obj]:
        """(items, list metadata). Items sorted by namespace and name, as etcd keys are."""
        with self._lock:
            start = ""
            if continue_token:
                try:
                    token = json.loads(base64.urlsafe_b64decode(continue_token.encode()))
                    start, token_rv = str(token["start"]), int(token["rv"])
                except (ValueError, KeyError, TypeError):
                    raise ApiError(400, "BadRequest", "continue key is not valid") from None
                if token_rv < self.compacted_rv:
                    raise gone(
                        "The provided continue parameter is too old to display a consistent list "
                        "result. You can start a new list without the continue parameter."
                    )
            if resource_version_match == "Exact" and resource_version:
                wanted = _rv(resource_version)
                if wanted < self.compacted_rv:
                    raise gone(f"too old resource version: {wanted} ({self.compacted_rv})")
                if wanted != self.rv:
                    raise ApiError(
                        500, "InternalError", "the emulation lists only the current state"
                    )
            items = []
            for key in sorted(self._objects):
                group, plural, ns, name = key
                if (group, plural) != rtype.store_key:
                    continue
                if namespace and ns != namespace:
                    continue
                if start and f"{ns}/{name}" <= start:
                    continue
                obj = self._objects[key]
                if selector and not selector.matches(obj):
                    continue
                items.append(self._render(rtype, obj))
            meta: Obj = {"resourceVersion": str(self.rv)}
            if limit and len(items) > limit:
                items = items[:limit]
                last = items[-1]["metadata"]
                cursor = f"{last.get('namespace', '')}/{last['name']}"
                meta["continue"] = base64.urlsafe_b64encode(
                    json.dumps({"start": cursor, "rv": self.rv}).encode()
                ).decode()
                meta["remainingItemCount"] = 0
            return items, meta

    def objects(self, rtype: ResourceType, namespace: str | None = None) -> list[Obj]:
        return self.list(rtype, namespace)[0]

    # -- writing --------------------------------------------------------------------------

    def create(
        self, rtype: ResourceType, namespace: str | None, obj: Obj, *, dry_run: bool = False
    ) -> Obj:
        """Store a new object (already validated by the caller); returns it as stored."""
        with self._lock:
            meta = obj.setdefault("metadata", {})
            if not meta.get("name") and meta.get("generateName"):
                meta["name"] = meta["generateName"] + uuid.uuid4().hex[:5]
            name = meta["name"]
            if rtype.namespaced:
                self._require_namespace(namespace)
            key = self._key(rtype, namespace, name)
            if key in self._objects:
                raise ApiError(
                    409,
                    "AlreadyExists",
                    f'{rtype.qualified} "{name}" already exists',
                    {"name": name, "group": rtype.group, "kind": rtype.plural},
                )
            if rtype.plural == "customresourcedefinitions":
                self._check_crd(obj)
            meta.pop("resourceVersion", None)
            meta.pop("deletionTimestamp", None)
            meta["uid"] = str(uuid.uuid4())
            meta["creationTimestamp"] = format_rfc3339(self._clock())
            if rtype.namespaced:
                meta["namespace"] = namespace
            else:
                meta.pop("namespace", None)
            if rtype.custom or rtype.plural == "customresourcedefinitions":
                meta["generation"] = 1
            if "status" in rtype.subresources:
                obj.pop("status", None)
            obj["apiVersion"], obj["kind"] = rtype.api_version, rtype.kind
            if rtype.plural == "customresourcedefinitions":
                obj["status"] = _crd_status(obj)
            elif rtype.plural == "namespaces":
                obj["status"] = {"phase": "Active"}
            if dry_run:
                return copy.deepcopy(obj)
            self._write(rtype, key, obj, "ADDED")
            if rtype.plural == "customresourcedefinitions":
                self._sync_crd_types()
            return self._render(rtype, obj)

    def update(
        self,
        rtype: ResourceType,
        namespace: str | None,
        name: str,
        change: Callable[[Obj], Obj],
        *,
        subresource: str = "",
        require_rv: bool = False,
        dry_run: bool = False,
    ) -> Obj:
        """Apply ``change`` (old → new, may raise ApiError) atomically, keep what the server
        owns, check the resourceVersion precondition, bump generation on spec changes.
        ``change`` returns the new object; validation is the caller's job (in ``change``)."""
        with self._lock:
            key = self._key(rtype, namespace, name)
            old = self._objects.get(key)
            if old is None:
                raise not_found(rtype, name)
            new = change(copy.deepcopy(old))
            meta = new.setdefault("metadata", {})
            new_rv = meta.get("resourceVersion")
            if require_rv and not new_rv:
                raise ApiError(
                    422,
                    "Invalid",
                    f'{rtype.qualified_kind} "{name}" is invalid: metadata.resourceVersion: '
                    "Invalid value: 0x0: must be specified for an update",
                )
            if new_rv and str(new_rv) != old["metadata"]["resourceVersion"]:
                raise conflict(rtype, name)
            if meta.get("name", name) != name:
                raise ApiError(
                    400, "BadRequest", "the name of the object does not match the name on the URL"
                )
            if "status" in rtype.subresources:
                if subresource == "status":
                    # Only the status changes through /status.
                    status = new.get("status")
                    new = copy.deepcopy(old)
                    if status is None:
                        new.pop("status", None)
                    else:
                        new["status"] = status
                else:
                    if "status" in old:
                        new["status"] = copy.deepcopy(old["status"])
                    else:
                        new.pop("status", None)
            # Fields the server owns.
            for owned in ("uid", "creationTimestamp", "namespace", "name", "generation"):
                if owned in old["metadata"]:
                    new["metadata"][owned] = old["metadata"][owned]
                else:
                    new["metadata"].pop(owned, None)
            new["metadata"]["resourceVersion"] = old["metadata"]["resourceVersion"]
            new["apiVersion"], new["kind"] = old["apiVersion"], old["kind"]
            if rtype.plural == "customresourcedefinitions":
                self._check_crd(new)
                new["status"] = _crd_status(new)
            if new == old:
                return self._render(rtype, old)  # a no-op: no revision, no event
            if "generation" in new["metadata"] and _spec(new) != _spec(old):
                new["metadata"]["generation"] = int(old["metadata"]["generation"]) + 1
            if dry_run:
                return copy.deepcopy(new)
            meta = new["metadata"]
            if meta.get("deletionTimestamp") and not meta.get("finalizers"):
                self._delete_now(rtype, key, new)
                return self._render(rtype, new)
            self._write(rtype, key, new, "MODIFIED")
            if rtype.plural == "customresourcedefinitions":
                self._sync_crd_types()
            return self._render(rtype, new)

    def delete(
        self,
        rtype: ResourceType,
        namespace: str | None,
        name: str,
        *,
        preconditions: Mapping[str, Any] | None = None,
        dry_run: bool = False,
    ) -> Obj:
        with self._lock:
            key = self._key(rtype, namespace, name)
            obj = self._objects.get(key)
            if obj is None:
                raise not_found(rtype, name)
            pre = preconditions or {}
            if pre.get("uid") and pre["uid"] != obj["metadata"]["uid"]:
                raise ApiError(
                    409,
                    "Conflict",
                    f'Operation cannot be fulfilled on {rtype.qualified} "{name}": Precondition '
                    f"failed: UID in precondition: {pre['uid']}, UID in object meta: "
                    f"{obj['metadata']['uid']}",
                )
            if (
                pre.get("resourceVersion")
                and pre["resourceVersion"] != obj["metadata"]["resourceVersion"]
            ):
                raise conflict(rtype, name)
            if dry_run:
                return self._render(rtype, obj)
            if obj["metadata"].get("finalizers"):
                if not obj["metadata"].get("deletionTimestamp"):
                    new = copy.deepcopy(obj)
                    new["metadata"]["deletionTimestamp"] = format_rfc3339(self._clock())
                    self._write(rtype, key, new, "MODIFIED")
                    return self._render(rtype, new)
                return self._render(rtype, obj)
            return self._delete_now(rtype, key, obj)

    def _delete_now(self, rtype: ResourceType, key: StoreKey, obj: Obj) -> Obj:
        if rtype.plural == "namespaces":
            for other in [k for k in self._objects if k[2] == key[3] and k[2]]:
                other_type = self._type_of(other)
                if other_type is not None:
                    self._delete_now(other_type, other, self._objects[other])
        if rtype.plural == "customresourcedefinitions":
            group, plural = obj["spec"]["group"], obj["spec"]["names"]["plural"]
            for other in [k for k in self._objects if k[:2] == (group, plural)]:
                other_type = self._type_of(other)
                if other_type is not None:
                    self._delete_now(other_type, other, self._objects[other])
        deleted = copy.deepcopy(obj)
        self._write(rtype, key, deleted, "DELETED")
        if rtype.plural == "customresourcedefinitions":
            self._sync_crd_types()
        return self._render(rtype, deleted)

    def _type_of(self, key: StoreKey) -> ResourceType | None:
        for rtype in self._types.values():
            if rtype.store_key == key[:2]:
                return rtype
        return None

    def _write(self, rtype: ResourceType, key: StoreKey, obj: Obj, event: str) -> None:
        self.rv += 1
        obj["metadata"]["resourceVersion"] = str(self.rv)
        if event == "DELETED":
            self._objects.pop(key, None)
        else:
            self._objects[key] = obj
        snapshot = copy.deepcopy(obj)
        self._history.append((self.rv, rtype.store_key, event, snapshot))
        for watch in list(self._watches):
            if watch.rtype.store_key == rtype.store_key and self._visible(watch, snapshot):
                watch.sink({"type": event, "object": self._render(watch.rtype, snapshot)})

    # -- watching -------------------------------------------------------------------------

    def watch(
        self,
        rtype: ResourceType,
        namespace: str | None,
        sink: Callable[[Any], None],
        *,
        resource_version: str = "",
        selector: Selector | None = None,
        bookmarks: bool = False,
        send_initial_events: bool = False,
    ) -> Watch:
        """Register a watch; the events it must see first are delivered to ``sink`` before
        any later event (under the lock, so nothing falls in between). Raises 410 Gone
        (ApiError) if the resourceVersion is older than the last compaction."""
        with self._lock:
            w = Watch(rtype, namespace, selector or Selector(), bookmarks, sink)
            if resource_version in ("", "0") or send_initial_events:
                for key in sorted(self._objects):
                    obj = self._objects[key]
                    if key[:2] == rtype.store_key and self._visible(w, obj):
                        sink({"type": "ADDED", "object": self._render(rtype, obj)})
                if send_initial_events:
                    sink(self._bookmark(rtype, initial_events_end=True))
            else:
                since = _rv(resource_version)
                if since < self.compacted_rv:
                    raise gone(f"too old resource version: {since} ({self.compacted_rv})")
                for rv, store_key, event, obj in self._history:
                    if rv > since and store_key == rtype.store_key and self._visible(w, obj):
                        sink({"type": event, "object": self._render(rtype, obj)})
            self._watches.add(w)
            return w

    def unwatch(self, watch: Watch | None) -> None:
        with self._lock:
            self._watches.discard(watch)  # type: ignore[arg-type]

    def _visible(self, w: Watch, obj: Mapping[str, Any]) -> bool:
        if w.namespace and obj["metadata"].get("namespace") != w.namespace:
            return False
        return w.selector.matches(obj)

    def _bookmark(self, rtype: ResourceType, initial_events_end: bool = False) -> Obj:
        meta: Obj = {"resourceVersion": str(self.rv)}
        if initial_events_end:
            meta["annotations"] = {"k8s.io/initial-events-end": "true"}
        return {
            "type": "BOOKMARK",
            "object": {"kind": rtype.kind, "apiVersion": rtype.api_version, "metadata": meta},
        }

    def history(self, rtype: ResourceType | None = None) -> list[tuple[int, str, Obj]]:
        """(resourceVersion, event type, object) of every write since the last compaction."""
        with self._lock:
            return [
                (rv, event, copy.deepcopy(obj))
                for rv, key, event, obj in self._history
                if rtype is None or key == rtype.store_key
            ]

    @property
    def open_watches(self) -> int:
        with self._lock:
            return len(self._watches)

    # -- test hooks -----------------------------------------------------------------------

    def compact(self, *, expire_watches: bool = False) -> int:
        """Forget the history up to now (etcd compaction): a watch from an older
        resourceVersion gets 410 Gone. With ``expire_watches``, open watches also get the
        ERROR event with code 410 that the API server sends when a watcher falls behind the
        compaction, and their streams end. Returns the compaction revision."""
        with self._lock:
            self.compacted_rv = self.rv
            self._history.clear()
            if expire_watches:
                for w in list(self._watches):
                    w.sink(
                        {
                            "type": "ERROR",
                            "object": gone(
                                f"too old resource version: {self.rv - 1} ({self.rv})"
                            ).status(),
                        }
                    )
                    w.sink(END)
                self._watches.clear()
            return self.compacted_rv

    def end_watches(self) -> int:
        """End every open watch stream cleanly (as the server does at timeoutSeconds)."""
        return self._signal(END)

    def abort_watches(self) -> int:
        """Cut every open watch connection (as when the API server goes away)."""
        return self._signal(ABORT)

    def bookmark(self) -> int:
        """Send a BOOKMARK with the current resourceVersion to watches that allow them."""
        with self._lock:
            sent = 0
            for w in self._watches:
                if w.bookmarks:
                    w.sink(self._bookmark(w.rtype))
                    sent += 1
            return sent

    def _signal(self, item: str) -> int:
        with self._lock:
            watches = list(self._watches)
            self._watches.clear()
            for w in watches:
                w.sink(item)
            return len(watches)

    # -- helpers --------------------------------------------------------------------------

    def load(self, docs: Iterable[Obj]) -> None:
        """Create objects directly (CRDs first), e.g. the CRDs a test cluster starts with."""
        docs = list(docs)
        docs.sort(key=lambda d: d.get("kind") != "CustomResourceDefinition")
        for doc in docs:
            rtype = self.type_for_kind(doc.get("apiVersion", ""), doc.get("kind", ""))
            if rtype is None:
                raise ValueError(f"no resource serves {doc.get('apiVersion')} {doc.get('kind')}")
            self.create(rtype, (doc.get("metadata") or {}).get("namespace"), copy.deepcopy(doc))

    def _require_namespace(self, namespace: str | None) -> None:
        if not namespace:
            raise ApiError(
                400,
                "BadRequest",
                "the server could not find the requested resource (namespace required)",
            )
        if ("", "namespaces", "", namespace) not in self._objects:
            raise ApiError(
                404,
                "NotFound",
                f'namespaces "{namespace}" not found',
                {"name": namespace, "kind": "namespaces"},
            )

    def _key(self, rtype: ResourceType, namespace: str | None, name: str) -> StoreKey:
        return (rtype.group, rtype.plural, (namespace or "") if rtype.namespaced else "", name)

    def _render(self, rtype: ResourceType, obj: Obj) -> Obj:
        out = copy.deepcopy(obj)
        out["apiVersion"] = rtype.api_version
        return out

    def _check_crd(self, crd: Obj) -> None:
        spec = crd.get("spec") or {}
        names = spec.get("names") or {}
        errors = []
        expected = f"{names.get('plural')}.{spec.get('group')}"
        if crd["metadata"].get("name") != expected:
            errors.append(
                f'metadata.name: Invalid value: "{crd["metadata"].get("name")}": must be spec.names.plural+"."+spec.group'
            )
        for i, version in enumerate(spec.get("versions") or []):
            schema = (version.get("schema") or {}).get("openAPIV3Schema")
            if schema is None:
                errors.append(
                    f"spec.versions[{i}].schema.openAPIV3Schema: Required value: schemas are required"
                )
                continue
            errors.extend(
                e.replace("spec.versions[]", f"spec.versions[{i}]")
                for e in structural_errors(schema)
            )
        if errors:
            name = crd["metadata"].get("name", "")
            raise ApiError(
                422,
                "Invalid",
                f'CustomResourceDefinition.apiextensions.k8s.io "{name}" is invalid: '
                + (errors[0] if len(errors) == 1 else "[" + ", ".join(errors) + "]"),
                {
                    "name": name,
                    "group": "apiextensions.k8s.io",
                    "kind": "CustomResourceDefinition",
                    "causes": [
                        {
                            "reason": "FieldValueInvalid",
                            "message": e.split(": ", 1)[1],
                            "field": e.split(": ", 1)[0],
                        }
                        for e in errors
                    ],
                },
            )


def conflict(rtype: ResourceType, name: str) -> ApiError:
    return ApiError(
        409,
        "Conflict",
        f'Operation cannot be fulfilled on {rtype.qualified} "{name}": the object has been '
        "modified; please apply your changes to the latest version and try again",
        {"name": name, "group": rtype.group, "kind": rtype.plural},
    )


def _rv(value: str) -> int:
    try:
        rv = int(value)
    except ValueError:
        raise ApiError(400, "BadRequest", f'invalid resource version "{value}"') from None
    if rv < 0:
        raise ApiError(400, "BadRequest", f'invalid resource version "{value}"')
    return rv


def _spec(obj: Mapping[str, Any]) -> Any:
    return {k: v for k, v in obj.items() if k not in ("metadata", "status")}


def _crd_status(crd: Mapping[str, Any]) -> Obj:
    names = (crd.get("spec") or {}).get("names") or {}
    now = format_rfc3339(time.time())
    return {
        "acceptedNames": dict(names),
        "conditions": [
            {
                "type": "NamesAccepted",
                "status": "True",
                "reason": "NoConflicts",
                "message": "no conflicts found",
                "lastTransitionTime": now,
            },
            {
                "type": "Established",
                "status": "True",
                "reason": "InitialNamesAccepted",
                "message": "the initial names have been accepted",
                "lastTransitionTime": now,
            },
        ],
        "storedVersions": [
            v["name"] for v in (crd.get("spec") or {}).get("versions") or [] if v.get("storage")
        ],
    }
