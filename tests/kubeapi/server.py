"""The Kubernetes API emulation's HTTP side: a kmock handler and a server you can stop.

:class:`KubeAPI` extends `kmock.KubernetesScaffold` (request parsing and recording, Status
rendering, the kmock DSL for injected reactions: `api.handler['get /apis'] << 503`). Any
request that no injected reaction answers is served by the emulation below, over the
:class:`~tests.kubeapi.store.Cluster`: discovery, OpenAPI v3, list/get/create/replace/
patch/delete, the status subresource, watch streams, Tables for `kubectl get`.

:class:`KubeAPIServer` runs it on 127.0.0.1 (port 0 the first time) in a thread with its own
event loop, so synchronous tests (kubectl, subprocesses, real Envoy) and asynchronous ones
(a watcher in the test's loop) can use it alike; its hooks (`down`/`up`, `compact`,
`end_watches`, ...) are plain thread-safe calls.
"""

from __future__ import annotations

import asyncio
import copy
import hashlib
import json
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import aiohttp.web
import attrs
import jsonpatch
import kmock
import yaml
from kmock._internal import parsing as kmock_parsing

from .schema import Cause, ResourceType
from .store import ABORT, END, ApiError, Cluster, Selector

__all__ = ["CRD_PATH", "CRD_PATHS", "ELEVATION_CRD_PATH", "KubeAPI", "KubeAPIServer"]

ROOT = Path(__file__).resolve().parents[2]
CRD_DIR = ROOT / "deploy" / "crds"
CRD_PATH = CRD_DIR / "agentrevocation.yaml"
ELEVATION_CRD_PATH = CRD_DIR / "agentelevation.yaml"
# Every CRD that deploy/ installs, as its kustomization lists them: the cluster a test gets
# serves what a real installation would.
CRD_PATHS = tuple(
    CRD_DIR / name
    for name in yaml.safe_load((CRD_DIR / "kustomization.yaml").read_text())["resources"]
)
SERVER_VERSION = {
    "major": "1",
    "minor": "37",
    "gitVersion": "v1.37.1-kubeapi-emulation",
    "gitCommit": "0000000000000000000000000000000000000000",
    "gitTreeState": "clean",
    "buildDate": "2026-01-01T00:00:00Z",
    "goVersion": "go1.26",
    "compiler": "gc",
    "platform": "linux/amd64",
}
_POLL = 0.2  # how often a waiting watch stream checks that its client is still there
_kmock_parse_path = kmock_parsing.parse_path


def _parse_path(path: str) -> Any:
    """kmock's request parser, which raises on the namespaces collection itself
    (`/api/v1/namespaces`: `kubectl apply` of a Namespace, `kubectl get namespaces`) before
    any handler runs. Only kmock's request records use what it parses: the emulation routes
    on the raw path."""
    try:
        return _kmock_parse_path(path)
    except ValueError:
        parts = path.strip("/").split("/")
        group, version = ("", parts[1]) if parts[0] == "api" else (parts[1], parts[2])
        return kmock_parsing.ParsedPath(group, version, plural=parts[-1])


kmock_parsing.parse_path = _parse_path


def _json_response(
    body: Any, status: int = 200, warnings: Iterable[str] = ()
) -> aiohttp.web.Response:
    resp = aiohttp.web.Response(
        status=status, text=json.dumps(body), content_type="application/json"
    )
    for warning in warnings:
        resp.headers.add("Warning", f"299 - {json.dumps(warning)}")
    return resp


def _truthy(values: list[str]) -> bool:
    """apimachinery's Convert_Slice_string_To_bool: only absent, "false" or "0" are false."""
    return bool(values) and values[0] != "0" and values[0].lower() != "false"


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    out = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = merge_patch(out.get(key), value)
    return out


@attrs.define(kw_only=True)
class KubeAPI(kmock.KubernetesScaffold):
    cluster: Cluster = attrs.field(factory=Cluster)
    token: str | None = None

    def __attrs_post_init__(self) -> None:
        # Deliberately not the scaffold's: its discovery fallbacks describe resources declared
        # to kmock; ours come from the stored CRDs. Injected reactions still take precedence.
        pass

    async def _handle(self, request: kmock.Request) -> aiohttp.web.StreamResponse:
        try:
            return await super()._handle(request)  # reactions injected with the kmock DSL
        except NotImplementedError:
            pass
        raw = request._raw_request
        assert raw is not None
        try:
            self._authenticate(raw)
            return await self._route(request, raw)
        except ApiError as exc:
            resp = _json_response(exc.status(), exc.code)
            for key, value in exc.headers.items():
                resp.headers[key] = value
            return resp

    def _authenticate(self, raw: aiohttp.web.BaseRequest) -> None:
        if self.token is None:
            return
        if raw.headers.get("Authorization", "") != f"Bearer {self.token}":
            raise ApiError(401, "Unauthorized", "Unauthorized")

    # -- routing --------------------------------------------------------------------------

    async def _route(
        self, request: kmock.Request, raw: aiohttp.web.BaseRequest
    ) -> aiohttp.web.StreamResponse:
        path = raw.path if raw.path == "/" else raw.path.rstrip("/")
        method = raw.method
        if path in ("/healthz", "/livez", "/readyz"):
            return aiohttp.web.Response(text="ok")
        if path.startswith("/openapi/v3"):
            return self._openapi(path, raw)
        if method == "GET":
            if path == "/version":
                return _json_response(SERVER_VERSION)
            if path == "/":
                return _json_response({"paths": sorted(self._paths())})
            if path == "/api":
                host = raw.host
                return _json_response(
                    {
                        "kind": "APIVersions",
                        "versions": ["v1"],
                        "serverAddressByClientCIDRs": [
                            {"clientCIDR": "0.0.0.0/0", "serverAddress": host}
                        ],
                    }
                )
            if path == "/apis":
                return _json_response(self._group_list())
        parts = path.strip("/").split("/")
        if parts[0] == "api" and len(parts) >= 2:
            group, version, rest = "", parts[1], parts[2:]
        elif parts[0] == "apis" and len(parts) >= 2:
            group = parts[1]
            if len(parts) == 2:
                if method != "GET":
                    raise self._method_not_allowed(method)
                return _json_response(self._group(group))
            version, rest = parts[2], parts[3:]
        else:
            raise ApiError(404, "NotFound", "the server could not find the requested resource")
        if not rest:
            if method != "GET":
                raise self._method_not_allowed(method)
            return _json_response(self._resource_list(group, version))
        namespace, plural, name, sub = self._parse_rest(rest)
        rtype = self.cluster.find_type(group, version, plural)
        if rtype is None or (namespace and not rtype.namespaced):
            raise ApiError(404, "NotFound", "the server could not find the requested resource")
        if name is None and rtype.namespaced is False and namespace:
            raise ApiError(404, "NotFound", "the server could not find the requested resource")
        if sub and sub not in rtype.subresources:
            raise ApiError(404, "NotFound", "the server could not find the requested resource")
        q = raw.query
        if method == "GET" and _truthy(q.getall("watch", [])):
            return await self._watch(raw, rtype, namespace, name)
        if name is None:
            if method == "GET":
                return self._list(raw, rtype, namespace)
            if method == "POST":
                return await self._create(request, raw, rtype, namespace)
            if method == "DELETE":
                return self._delete_collection(raw, rtype, namespace)
            raise self._method_not_allowed(method)
        if method == "GET":
            obj = self.cluster.get(rtype, namespace, name)
            if "as=Table" in raw.headers.get("Accept", ""):
                return _json_response(
                    self._table(
                        raw, rtype, [obj], {"resourceVersion": obj["metadata"]["resourceVersion"]}
                    )
                )
            return _json_response(obj)
        if method == "PATCH":
            return await self._patch(request, raw, rtype, namespace, name, sub or "")
        if method == "PUT":
            return await self._replace(request, raw, rtype, namespace, name, sub or "")
        if method == "DELETE" and not sub:
            return self._delete(request, raw, rtype, namespace, name)
        raise self._method_not_allowed(method)

    @staticmethod
    def _parse_rest(rest: list[str]) -> tuple[str | None, str, str | None, str | None]:
        """(namespace, plural, name, subresource) from the path after the group version."""
        if (
            rest[0] == "namespaces"
            and len(rest) >= 3
            and not (len(rest) == 3 and rest[2] in ("status", "finalize"))
        ):
            namespace, rest = rest[1], rest[2:]
        else:
            namespace = None
        plural = rest[0]
        name = rest[1] if len(rest) > 1 else None
        sub = "/".join(rest[2:]) or None
        return namespace, plural, name, sub

    @staticmethod
    def _method_not_allowed(method: str) -> ApiError:
        return ApiError(
            405,
            "MethodNotAllowed",
            f"the server does not allow this method on the requested resource ({method})",
        )

    # -- discovery ------------------------------------------------------------------------

    def _versions(self) -> dict[str, list[str]]:
        groups: dict[str, list[str]] = {}
        for rtype in self.cluster.types():
            versions = groups.setdefault(rtype.group, [])
            if rtype.version not in versions:
                versions.append(rtype.version)
        return groups

    def _group(self, group: str) -> dict[str, Any]:
        versions = self._versions().get(group)
        if not versions or not group:
            raise ApiError(404, "NotFound", "the server could not find the requested resource")
        entries = [{"groupVersion": f"{group}/{v}", "version": v} for v in versions]
        return {
            "kind": "APIGroup",
            "apiVersion": "v1",
            "name": group,
            "versions": entries,
            "preferredVersion": entries[0],
        }

    def _group_list(self) -> dict[str, Any]:
        groups = [self._group(g) for g in sorted(self._versions()) if g]
        for g in groups:
            g.pop("kind")
            g.pop("apiVersion")
        return {"kind": "APIGroupList", "apiVersion": "v1", "groups": groups}

    def _resource_list(self, group: str, version: str) -> dict[str, Any]:
        resources = [t for t in self.cluster.types() if t.group == group and t.version == version]
        if not resources:
            raise ApiError(404, "NotFound", "the server could not find the requested resource")
        return {
            "kind": "APIResourceList",
            "apiVersion": "v1",
            "groupVersion": f"{group}/{version}" if group else version,
            "resources": [
                entry for t in sorted(resources, key=lambda t: t.plural) for entry in t.discovery()
            ],
        }

    def _paths(self) -> set[str]:
        paths = {
            "/api",
            "/api/v1",
            "/apis",
            "/version",
            "/openapi/v3",
            "/healthz",
            "/livez",
            "/readyz",
        }
        for group, versions in self._versions().items():
            if group:
                paths.add(f"/apis/{group}")
                paths.update(f"/apis/{group}/{v}" for v in versions)
        return paths

    # -- OpenAPI v3 -----------------------------------------------------------------------

    def _openapi_doc(self, gv: str) -> dict[str, Any] | None:
        types = [
            t
            for t in self.cluster.types()
            if ("apis/" + t.group_version if t.group else "api/" + t.version) == gv
        ]
        if not types:
            return None
        schemas: dict[str, Any] = dict(_COMMON_SCHEMAS)
        paths: dict[str, Any] = {}
        for t in sorted(types, key=lambda t: t.plural):
            schemas.update(t.openapi_schemas())
            paths.update(t.openapi_paths())
        return {
            "openapi": "3.0.0",
            "info": {"title": "Kubernetes", "version": SERVER_VERSION["gitVersion"]},
            "paths": paths,
            "components": {"schemas": schemas},
        }

    def _openapi(self, path: str, raw: aiohttp.web.BaseRequest) -> aiohttp.web.Response:
        if raw.method != "GET":
            raise self._method_not_allowed(raw.method)
        gvs = sorted(
            {
                ("apis/" + t.group_version) if t.group else ("api/" + t.version)
                for t in self.cluster.types()
            }
        )
        if path == "/openapi/v3":
            index = {}
            for gv in gvs:
                doc = self._openapi_doc(gv)
                digest = (
                    hashlib.sha512(json.dumps(doc, sort_keys=True).encode()).hexdigest().upper()
                )
                index[gv] = {"serverRelativeURL": f"/openapi/v3/{gv}?hash={digest}"}
            return _json_response({"paths": index})
        doc = self._openapi_doc(path.removeprefix("/openapi/v3/"))
        if doc is None:
            raise ApiError(404, "NotFound", "the server could not find the requested resource")
        resp = _json_response(doc)
        if "hash" in raw.query:
            resp.headers["Cache-Control"] = "public, immutable"
        return resp

    # -- reading --------------------------------------------------------------------------

    def _selector(self, raw: aiohttp.web.BaseRequest, name: str | None = None) -> Selector:
        fields = raw.query.get("fieldSelector", "")
        if name is not None:
            fields = ",".join(f for f in (fields, f"metadata.name={name}") if f)
        return Selector.parse(fields, raw.query.get("labelSelector", ""))

    def _list(
        self, raw: aiohttp.web.BaseRequest, rtype: ResourceType, namespace: str | None
    ) -> aiohttp.web.Response:
        q = raw.query
        try:
            limit = int(q.get("limit", "0") or 0)
        except ValueError:
            raise ApiError(400, "BadRequest", "limit must be an integer") from None
        items, meta = self.cluster.list(
            rtype,
            namespace,
            self._selector(raw),
            limit=limit,
            continue_token=q.get("continue", ""),
            resource_version=q.get("resourceVersion", ""),
            resource_version_match=q.get("resourceVersionMatch", ""),
        )
        if "as=Table" in raw.headers.get("Accept", ""):
            return _json_response(self._table(raw, rtype, items, meta))
        return _json_response(
            {
                "apiVersion": rtype.api_version,
                "kind": rtype.list_kind or f"{rtype.kind}List",
                "metadata": meta,
                "items": items,
            }
        )

    def _table(
        self,
        raw: aiohttp.web.BaseRequest,
        rtype: ResourceType,
        items: list[dict[str, Any]],
        meta: Mapping[str, Any],
    ) -> dict[str, Any]:
        return rtype.table(items, meta, raw.query.get("includeObject", "Metadata"), time.time())

    # -- watching -------------------------------------------------------------------------

    async def _watch(
        self,
        raw: aiohttp.web.BaseRequest,
        rtype: ResourceType,
        namespace: str | None,
        name: str | None,
    ) -> aiohttp.web.StreamResponse:
        q = raw.query
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Any] = asyncio.Queue()

        def sink(item: Any) -> None:  # called under the cluster lock, from any thread
            loop.call_soon_threadsafe(queue.put_nowait, item)

        try:
            timeout = float(q["timeoutSeconds"]) if q.get("timeoutSeconds") else None
        except ValueError:
            raise ApiError(400, "BadRequest", "timeoutSeconds must be an integer") from None
        selector = self._selector(raw, name)
        watch = None
        try:
            watch = self.cluster.watch(
                rtype,
                namespace,
                sink,
                resource_version=q.get("resourceVersion", ""),
                selector=selector,
                bookmarks=_truthy(q.getall("allowWatchBookmarks", [])),
                send_initial_events=_truthy(q.getall("sendInitialEvents", [])),
            )
        except ApiError as exc:
            if exc.code != 410:
                raise
            # As kube-apiserver does: 200, one ERROR event carrying the 410 Status, the end.
            queue.put_nowait({"type": "ERROR", "object": exc.status()})
            queue.put_nowait(END)
        resp = aiohttp.web.StreamResponse(status=200, headers={"Content-Type": "application/json"})
        resp.enable_chunked_encoding()
        deadline = None if timeout is None else loop.time() + timeout
        tables = "as=Table" in raw.headers.get("Accept", "")
        first_table = True
        try:
            await resp.prepare(raw)
            while True:
                wait = _POLL if deadline is None else min(_POLL, deadline - loop.time())
                if wait <= 0:
                    break  # timeoutSeconds: the server ends the stream cleanly
                try:
                    item = await asyncio.wait_for(queue.get(), wait)
                except TimeoutError:
                    if raw.transport is None or raw.transport.is_closing():
                        return resp  # the client went away
                    continue
                if item == END:
                    break
                if item == ABORT:
                    if raw.transport is not None:
                        raw.transport.abort()
                    return resp
                if tables and item.get("type") in ("ADDED", "MODIFIED", "DELETED"):
                    # kubectl get -w asks for Tables: one row per event, the column
                    # definitions in the first one only (as kube-apiserver does).
                    obj = item["object"]
                    meta = {"resourceVersion": obj["metadata"]["resourceVersion"]}
                    table = rtype.table(
                        [obj], meta, q.get("includeObject", "Metadata"), time.time()
                    )
                    if not first_table:
                        table["columnDefinitions"] = []
                    first_table = False
                    item = {"type": item["type"], "object": table}
                await resp.write(json.dumps(item).encode() + b"\n")
            await resp.write_eof()
        except (ConnectionError, RuntimeError):
            pass  # the client went away mid-write
        finally:
            self.cluster.unwatch(watch)
        return resp

    # -- writing --------------------------------------------------------------------------

    def _body(self, request: kmock.Request, raw: aiohttp.web.BaseRequest) -> Any:
        if "yaml" in raw.content_type:
            try:
                return yaml.safe_load(request.body.decode())
            except (yaml.YAMLError, UnicodeDecodeError):
                raise ApiError(
                    400, "BadRequest", "the body of the request was in an unknown format"
                ) from None
        try:
            return json.loads(request.body.decode() or "null")
        except (ValueError, UnicodeDecodeError):
            raise ApiError(
                400,
                "BadRequest",
                "the body of the request was in an unknown format - accepted media types include: application/json, application/yaml",
            ) from None

    def _admit(
        self,
        rtype: ResourceType,
        obj: Any,
        raw: aiohttp.web.BaseRequest,
        name: str | None,
        warnings: list[str],
        old: Mapping[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Decode (strict or not), prune and validate an object about to be stored (with the
        CRD's transition rules, and ratcheting, when it replaces ``old``)."""
        if not isinstance(obj, dict):
            raise ApiError(
                400,
                "BadRequest",
                f'{rtype.kind} in version "{rtype.version}" cannot be handled as a {rtype.kind}: json: cannot unmarshal into Go value of type map[string]interface {{}}',
            )
        kind, api_version = obj.get("kind"), obj.get("apiVersion")
        if not kind:
            raise ApiError(400, "BadRequest", f"Object 'Kind' is missing in '{json.dumps(obj)}'")
        if kind != rtype.kind or api_version != rtype.api_version:
            raise ApiError(
                400,
                "BadRequest",
                f"the API version in the data ({api_version}) does not match the expected API version ({rtype.api_version})"
                if kind == rtype.kind
                else f'{kind} in version "{rtype.version}" cannot be handled as a {rtype.kind}: no kind "{kind}" is registered',
            )
        mode = raw.query.get("fieldValidation", "Warn")
        if mode not in ("Ignore", "Warn", "Strict"):
            raise ApiError(
                400,
                "BadRequest",
                f'fieldValidation: Unsupported value: "{mode}": supported values: "Ignore", "Strict", "Warn"',
            )
        unknown = rtype.unknown_fields(obj)
        if unknown and mode == "Strict":
            fields = ", ".join(f'unknown field "{p}"' for p in unknown)
            raise ApiError(
                400,
                "BadRequest",
                f'{rtype.kind} in version "{rtype.version}" cannot be handled as a {rtype.kind}: strict decoding error: {fields}',
            )
        if mode == "Warn":
            warnings.extend(f'unknown field "{p}"' for p in unknown)
        rtype.prune(obj)
        causes = rtype.validate(obj, old) + self._validate_builtin(rtype, obj)
        if causes:
            shown = name or (obj.get("metadata") or {}).get("name") or ""
            raise _invalid(rtype, shown, causes)
        return obj

    @staticmethod
    def _validate_builtin(rtype: ResourceType, obj: Mapping[str, Any]) -> list[Cause]:
        """core/v1 Event: the legacy rule the API server applies to v1 events without
        eventTime: the event lives in its involved object's namespace."""
        causes = []
        if rtype.plural == "events" and not obj.get("eventTime"):
            involved = obj.get("involvedObject") or {}
            ns = (obj.get("metadata") or {}).get("namespace") or ""
            other = involved.get("namespace") or ""
            if (other and other != ns) or (not other and ns not in ("", "default")):
                causes.append(
                    Cause(
                        "involvedObject.namespace",
                        "FieldValueInvalid",
                        f'Invalid value: "{other}": does not match event.namespace',
                    )
                )
        return causes

    async def _create(
        self,
        request: kmock.Request,
        raw: aiohttp.web.BaseRequest,
        rtype: ResourceType,
        namespace: str | None,
    ) -> aiohttp.web.Response:
        obj = self._body(request, raw)
        meta = obj.get("metadata") if isinstance(obj, dict) else None
        if isinstance(meta, dict):
            if rtype.namespaced and namespace:
                if meta.get("namespace") and meta["namespace"] != namespace:
                    raise ApiError(
                        400,
                        "BadRequest",
                        "the namespace of the provided object does not match the namespace sent on the request",
                    )
                meta["namespace"] = namespace
            if not meta.get("name") and meta.get("generateName"):
                meta["name"] = (
                    meta["generateName"]
                    + hashlib.sha1(str(time.time_ns()).encode()).hexdigest()[:5]
                )
        warnings: list[str] = []
        obj = self._admit(rtype, obj, raw, None, warnings)
        stored = self.cluster.create(rtype, namespace, obj, dry_run=self._dry_run(raw))
        return _json_response(stored, 201, warnings)

    @staticmethod
    def _dry_run(raw: aiohttp.web.BaseRequest) -> bool:
        return "All" in raw.query.getall("dryRun", [])

    async def _patch(
        self,
        request: kmock.Request,
        raw: aiohttp.web.BaseRequest,
        rtype: ResourceType,
        namespace: str | None,
        name: str,
        sub: str,
    ) -> aiohttp.web.Response:
        ctype = raw.content_type
        body = self._body(request, raw)
        apply: Callable[[dict[str, Any]], Any]
        if ctype == "application/merge-patch+json" or (
            ctype == "application/strategic-merge-patch+json" and not rtype.custom
        ):
            if not isinstance(body, dict):
                raise ApiError(
                    400,
                    "BadRequest",
                    "json: cannot unmarshal into Go value of type map[string]interface {}",
                )
            apply = lambda old: merge_patch(old, body)  # noqa: E731
        elif ctype == "application/json-patch+json":
            if not isinstance(body, list):
                raise ApiError(
                    400,
                    "BadRequest",
                    "json: cannot unmarshal object into Go value of type jsonpatch.Patch",
                )

            def apply(old: dict[str, Any]) -> Any:
                try:
                    return jsonpatch.apply_patch(old, body)
                except (jsonpatch.JsonPatchException, jsonpatch.JsonPointerException) as exc:
                    raise ApiError(
                        422,
                        "Invalid",
                        f"the server rejected our request due to an error in our request: {exc}",
                    ) from None

        elif ctype == "application/apply-patch+yaml":
            if not raw.query.get("fieldManager"):
                raise ApiError(
                    422,
                    "Invalid",
                    'PatchOptions.meta.k8s.io "" is invalid: fieldManager: Required value: is required for apply patch',
                )
            if not isinstance(body, dict):
                raise ApiError(
                    400, "BadRequest", "the body of the request was in an unknown format"
                )
            try:
                self.cluster.get(rtype, namespace, name)
            except ApiError as exc:
                if exc.code != 404 or sub:
                    raise
                body.setdefault("metadata", {})["name"] = name
                return await self._create_from(rtype, namespace, body, raw)
            apply = lambda old: merge_patch(old, body)  # noqa: E731
        else:
            raise ApiError(
                415,
                "UnsupportedMediaType",
                "the body of the request was in an unknown format - accepted media types include: application/json-patch+json, application/merge-patch+json, application/apply-patch+yaml",
            )
        warnings: list[str] = []

        def change(old: dict[str, Any]) -> dict[str, Any]:
            # Through /status too the whole object is validated, against the stored one: the
            # spec is unchanged there, so its rules are not checked again (ratcheting).
            return self._admit(rtype, apply(old), raw, name, warnings, old)

        updated = self.cluster.update(
            rtype, namespace, name, change, subresource=sub, dry_run=self._dry_run(raw)
        )
        return _json_response(updated, 200, warnings)

    async def _create_from(
        self,
        rtype: ResourceType,
        namespace: str | None,
        obj: dict[str, Any],
        raw: aiohttp.web.BaseRequest,
    ) -> aiohttp.web.Response:
        warnings: list[str] = []
        obj = self._admit(rtype, obj, raw, None, warnings)
        return _json_response(
            self.cluster.create(rtype, namespace, obj, dry_run=self._dry_run(raw)), 201, warnings
        )

    async def _replace(
        self,
        request: kmock.Request,
        raw: aiohttp.web.BaseRequest,
        rtype: ResourceType,
        namespace: str | None,
        name: str,
        sub: str,
    ) -> aiohttp.web.Response:
        body = self._body(request, raw)
        warnings: list[str] = []

        def change(old: dict[str, Any]) -> dict[str, Any]:
            return self._admit(rtype, copy.deepcopy(body), raw, name, warnings, old)

        updated = self.cluster.update(
            rtype,
            namespace,
            name,
            change,
            subresource=sub,
            require_rv=rtype.custom,
            dry_run=self._dry_run(raw),
        )
        return _json_response(updated, 200, warnings)

    def _delete(
        self,
        request: kmock.Request,
        raw: aiohttp.web.BaseRequest,
        rtype: ResourceType,
        namespace: str | None,
        name: str,
    ) -> aiohttp.web.Response:
        options = self._body(request, raw) if request.body else None
        preconditions = (options or {}).get("preconditions") if isinstance(options, dict) else None
        dry_run = self._dry_run(raw) or "All" in (
            (options or {}).get("dryRun") or [] if isinstance(options, dict) else []
        )
        obj = self.cluster.delete(
            rtype, namespace, name, preconditions=preconditions, dry_run=dry_run
        )
        if rtype.custom:
            return _json_response(obj)
        return _json_response(
            {
                "kind": "Status",
                "apiVersion": "v1",
                "metadata": {},
                "status": "Success",
                "details": {
                    "name": name,
                    "group": rtype.group,
                    "kind": rtype.plural,
                    "uid": obj["metadata"]["uid"],
                },
            }
        )

    def _delete_collection(
        self, raw: aiohttp.web.BaseRequest, rtype: ResourceType, namespace: str | None
    ) -> aiohttp.web.Response:
        items, _ = self.cluster.list(rtype, namespace, self._selector(raw))
        for item in items:
            try:
                self.cluster.delete(rtype, namespace, item["metadata"]["name"])
            except ApiError as exc:
                if exc.code != 404:
                    raise
        return _json_response(
            {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success"}
        )


def _invalid(rtype: ResourceType, name: str, causes: list[Cause]) -> ApiError:
    shown = str(causes[0]) if len(causes) == 1 else "[" + ", ".join(str(c) for c in causes) + "]"
    return ApiError(
        422,
        "Invalid",
        f'{rtype.qualified_kind} "{name}" is invalid: {shown}',
        {
            "name": name,
            "group": rtype.group,
            "kind": rtype.kind,
            "causes": [c.as_dict() for c in causes],
        },
    )


_META = "io.k8s.apimachinery.pkg.apis.meta.v1"
_COMMON_SCHEMAS: dict[str, Any] = {
    f"{_META}.ObjectMeta": {
        "description": "ObjectMeta is metadata that all persisted resources must have.",
        "type": "object",
        "properties": {
            "name": {"type": "string", "description": "Name must be unique within a namespace."},
            "generateName": {"type": "string"},
            "namespace": {"type": "string"},
            "uid": {"type": "string"},
            "resourceVersion": {"type": "string"},
            "generation": {"type": "integer", "format": "int64"},
            "creationTimestamp": {"type": "string", "format": "date-time"},
            "deletionTimestamp": {"type": "string", "format": "date-time"},
            "labels": {"type": "object", "additionalProperties": {"type": "string", "default": ""}},
            "annotations": {
                "type": "object",
                "additionalProperties": {"type": "string", "default": ""},
            },
            "finalizers": {"type": "array", "items": {"type": "string", "default": ""}},
            "ownerReferences": {"type": "array", "items": {"type": "object"}},
            "managedFields": {"type": "array", "items": {"type": "object"}},
        },
    },
    f"{_META}.ListMeta": {
        "type": "object",
        "properties": {
            "resourceVersion": {"type": "string"},
            "continue": {"type": "string"},
            "remainingItemCount": {"type": "integer", "format": "int64"},
        },
    },
    f"{_META}.Status": {
        "type": "object",
        "properties": {
            "code": {"type": "integer", "format": "int32"},
            "message": {"type": "string"},
            "reason": {"type": "string"},
            "status": {"type": "string"},
        },
        "x-kubernetes-group-version-kind": [{"group": "", "kind": "Status", "version": "v1"}],
    },
}


class KubeAPIServer:
    """The emulation served on 127.0.0.1 from a background thread. Start with `start()` (or
    as a context manager); every hook is a plain call, safe from any thread."""

    def __init__(
        self,
        crds: Iterable[Path | str] = CRD_PATHS,
        *,
        namespaces: Iterable[str] = ("default", "kube-system", "agents"),
        token: str | None = None,  # kubectl sends no bearer token over plain http
        cluster: Cluster | None = None,
    ) -> None:
        self.cluster = cluster or Cluster()
        self.token = token
        self._crds = [Path(p) for p in crds]
        self._namespaces = list(namespaces)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: kmock.Server | None = None
        self.handler: KubeAPI | None = None
        self.port = 0
        self.host = "127.0.0.1"

    # -- lifecycle ------------------------------------------------------------------------

    def start(self) -> KubeAPIServer:
        docs: list[dict[str, Any]] = []
        for path in self._crds:
            docs.extend(d for d in yaml.safe_load_all(path.read_text()) if d)
        docs.extend(
            {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}}
            for ns in self._namespaces
        )
        self.cluster.load(docs)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="kubeapi", daemon=True)
        self._thread.start()
        self._call(self._start())
        return self

    async def _start(self) -> None:
        self.handler = KubeAPI(cluster=self.cluster, token=self.token)
        await self.handler.__aenter__()
        await self._listen()

    async def _listen(self) -> None:
        assert self.handler is not None
        self._server = kmock.Server(self.handler, host=self.host, port=self.port or None)
        await self._server.__aenter__()
        self.port = self._server.port

    async def _close(self) -> None:
        self.cluster.abort_watches()
        await asyncio.sleep(0.01)  # let the streams see it and cut their connections
        if self._server is not None:
            server, self._server = self._server, None
            await server.__aexit__(None, None, None)

    def stop(self) -> None:
        if self._loop is None:
            return

        async def stop() -> None:
            await self._close()
            if self.handler is not None:
                await self.handler.__aexit__(None, None, None)

        try:
            self._call(stop())
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            assert self._thread is not None
            self._thread.join(5)
            self._loop.close()
            self._loop = None

    def __enter__(self) -> KubeAPIServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _call(self, coro: Any, timeout: float = 10) -> Any:
        assert self._loop is not None, "the server is not started"
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def write_kubeconfig(self, path: Path, namespace: str = "agents") -> Path:
        user: dict[str, Any] = {"token": self.token} if self.token else {}
        path.write_text(
            yaml.safe_dump(
                {
                    "apiVersion": "v1",
                    "kind": "Config",
                    "clusters": [{"name": "kubeapi", "cluster": {"server": self.url}}],
                    "users": [{"name": "tester", "user": user}],
                    "contexts": [
                        {
                            "name": "kubeapi",
                            "context": {
                                "cluster": "kubeapi",
                                "user": "tester",
                                "namespace": namespace,
                            },
                        }
                    ],
                    "current-context": "kubeapi",
                }
            )
        )
        return path

    # -- fault hooks ----------------------------------------------------------------------

    def down(self) -> None:
        """The API server goes away: open watch connections are cut, new connections are
        refused, until `up()`. Stored state is kept (etcd survives)."""
        self._call(self._close())

    def up(self) -> None:
        """Listen again, on the same port."""
        self._call(self._listen())

    @property
    def is_up(self) -> bool:
        return self._server is not None

    def compact(self, *, expire_watches: bool = False) -> int:
        """Compact history: a watch from an older resourceVersion gets 410 Gone (see
        `Cluster.compact`)."""
        return self.cluster.compact(expire_watches=expire_watches)

    def end_watches(self) -> int:
        """End every open watch stream cleanly."""
        return self.cluster.end_watches()

    def bookmark(self) -> int:
        return self.cluster.bookmark()

    def wait_watches(self, count: int = 1, timeout: float = 10) -> None:
        """Block until at least ``count`` watch streams are open (sync tests; see
        `until_watches` for async ones)."""
        deadline = time.monotonic() + timeout
        while self.cluster.open_watches < count:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.cluster.open_watches} watch(es) open, wanted {count}")
            time.sleep(0.005)

    async def until_watches(self, count: int = 1, timeout: float = 10) -> None:
        """`wait_watches` for async tests (it does not block the caller's event loop)."""
        deadline = time.monotonic() + timeout
        while self.cluster.open_watches < count:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.cluster.open_watches} watch(es) open, wanted {count}")
            await asyncio.sleep(0.005)

    def react(self, criteria: Any, *payload: Any) -> None:
        """Inject a kmock reaction (in the server's loop), e.g. `react('list', 503)`."""
        assert self.handler is not None and self._loop is not None
        done = threading.Event()

        def add() -> None:
            assert self.handler is not None
            view: Any = self.handler[criteria]
            for item in payload:
                view = view << item
            done.set()

        self._loop.call_soon_threadsafe(add)
        done.wait(5)

    # -- state, for assertions ------------------------------------------------------------

    def rtype(self, resource: str) -> ResourceType:
        """`agentrevocations`, `events`, `arev`, `AgentRevocation` → its ResourceType."""
        for t in self.cluster.types():
            if resource in (t.plural, t.kind, t.singular, *t.short_names):
                return t
        raise KeyError(resource)

    def objects(
        self, resource: str = "agentrevocations", namespace: str | None = None
    ) -> list[dict[str, Any]]:
        return self.cluster.objects(self.rtype(resource), namespace)

    def get(self, resource: str, namespace: str | None, name: str) -> dict[str, Any]:
        return self.cluster.get(self.rtype(resource), namespace, name)

    def history(self, resource: str = "agentrevocations") -> list[tuple[int, str, dict[str, Any]]]:
        """(resourceVersion, ADDED|MODIFIED|DELETED, object) of each write since compaction."""
        return self.cluster.history(self.rtype(resource))

    def events(self, namespace: str | None = None) -> list[dict[str, Any]]:
        return self.objects("events", namespace)

    def create(self, obj: Mapping[str, Any]) -> dict[str, Any]:
        """Create an object as a client would (validated), bypassing HTTP."""
        obj = copy.deepcopy(dict(obj))
        rtype = self.cluster.type_for_kind(obj.get("apiVersion", ""), obj.get("kind", ""))
        if rtype is None:
            raise KeyError(f"{obj.get('apiVersion')} {obj.get('kind')}")
        causes = rtype.validate(obj)
        if causes:
            raise _invalid(rtype, (obj.get("metadata") or {}).get("name", ""), causes)
        rtype.prune(obj)
        return self.cluster.create(rtype, (obj.get("metadata") or {}).get("namespace"), obj)

    def patch(
        self,
        resource: str,
        namespace: str | None,
        name: str,
        patch: Mapping[str, Any],
        *,
        subresource: str = "",
    ) -> dict[str, Any]:
        rtype = self.rtype(resource)

        def change(old: dict[str, Any]) -> dict[str, Any]:
            new: dict[str, Any] = merge_patch(old, dict(patch))
            causes = rtype.validate(new, old)
            if causes:
                raise _invalid(rtype, name, causes)
            return new

        return self.cluster.update(rtype, namespace, name, change, subresource=subresource)

    def delete(self, resource: str, namespace: str | None, name: str) -> dict[str, Any]:
        return self.cluster.delete(self.rtype(resource), namespace, name)

    @property
    def requests(self) -> list[kmock.Request]:
        """Every request served so far (kmock's records)."""
        return list(self.handler) if self.handler is not None else []

    @property
    def resource_version(self) -> int:
        return self.cluster.rv

    def __repr__(self) -> str:
        return f"<KubeAPIServer {self.url} rv={self.cluster.rv}>"


def load_yaml(path: Path | str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(Path(path).read_text()) if d]
