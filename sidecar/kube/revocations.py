"""The AgentRevocation watcher: each AgentRevocation of the namespace as a revocation of the
`kubernetes` source of the RevocationStore, and each object it sees handed to its
:class:`RevocationReporter` (Events, status; after the store write, `check` corrects a status
that says otherwise than this pod, which now enforces it, knows).

It writes the store only through replace_source (after a list, then mark_complete), upsert
and remove; it never clears it because the API is unreachable (the reflector then yields
nothing). A refusal (401/403, or no AgentRevocation resource) is a configuration error, not
an outage: the store is marked refused, so every Check is denied saying which permission or
resource is missing, until a list succeeds; the entries in force stay. It must not: talk to
the API, or decide what to report.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any, Unpack

from kubernetes_asyncio.client import ApiClient

from sidecar.core.revocation import Revocation
from sidecar.kube.consumer import Consumer, WatchOptions
from sidecar.kube.convert import (
    GROUP,
    KIND,
    PLURAL,
    SOURCE,
    VERSION,
    ObjectState,
    object_key,
    object_state,
    revocation_from_object,
)
from sidecar.kube.errors import KubeError, KubeNotFound, describe
from sidecar.kube.reporter import RevocationReporter
from sidecar.state.revocations import RevocationStore

__all__ = ["RevocationWatcher", "refusal"]

log = logging.getLogger(__name__)


def refusal(exc: KubeError, namespace: str) -> str:
    """What a refused list or watch of AgentRevocations means, and what fixes it."""
    if isinstance(exc, KubeNotFound):
        return (
            f"{describe(exc)}: the API server does not serve {PLURAL}.{GROUP}/{VERSION} in "
            f"namespace {namespace!r}: install the CRD (deploy/crds/agentrevocation.yaml)"
        )
    return (
        f"{describe(exc)}: this pod's service account needs get, list and watch on "
        f"{PLURAL}.{GROUP} in namespace {namespace!r} (a Role and RoleBinding as in "
        "deploy/base)"
    )


class RevocationWatcher(Consumer):
    """Lists and watches AgentRevocations of one namespace into a RevocationStore.

    `run()` is the infinite loop (bounded by `_iterations` in tests: one iteration is a list
    if needed plus one watch stream); `start()`/`stop()` run it as a task."""

    _plural = PLURAL
    _kind = KIND
    reporter: RevocationReporter

    def __init__(
        self,
        store: RevocationStore,
        namespace: str,
        *,
        api_client: ApiClient,
        pod_name: str,
        **options: Unpack[WatchOptions],
    ) -> None:
        super().__init__(namespace, api_client=api_client, pod_name=pod_name, **options)
        self.store = store
        self.reporter = RevocationReporter(
            store, api_client, namespace, pod_name=pod_name, **self._report_options
        )

    def _replace(self, items: Sequence[Mapping[str, Any]]) -> str:
        converted = [self._convert(obj) for obj in items]
        self.reporter.replaced(converted)
        added, removed = self.store.replace_source(SOURCE, [rev for rev, _ in converted])
        self.store.mark_complete()
        for rev, _ in converted:  # enforced now: a status that says otherwise is corrected
            self.reporter.check(rev)
        return f"{added} added, {removed} removed"

    def _apply(self, obj: Mapping[str, Any]) -> None:
        rev, state = self._convert(obj)
        self.reporter.seen(rev, state)
        self.store.upsert(rev)
        self.reporter.check(rev)

    def _remove(self, obj: Mapping[str, Any]) -> None:
        key = object_key(obj, self.namespace)
        self.reporter.forget(key)
        self.store.remove(key)

    def _refused(self, exc: KubeError) -> None:
        why = refusal(exc, self.namespace)
        if self.store.refused != why:
            log.error("AgentRevocations cannot be read: %s; denying every call", why)
            self.reporter.refused(why)
        self.store.refuse(why)

    def _convert(self, obj: Mapping[str, Any]) -> tuple[Revocation, ObjectState]:
        rev, problems = revocation_from_object(obj, self.namespace)
        self._warn(rev.name, rev.uid, problems)
        return rev, object_state(obj)
