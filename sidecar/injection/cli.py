"""`mandate inject` and `mandate webhook`: the command line of sidecar injection.

`mandate inject -f FILE` reads Kubernetes objects (YAML or JSON, several documents, `List`s;
`-` for stdin) and prints them with the sidecar added to every selected pod: a Pod itself,
the pod template of a Deployment, StatefulSet, DaemonSet, ReplicaSet, Job, CronJob or
PodTemplate. Other objects pass through unchanged. What happened to each goes to stderr:
injected or not, who holds the pod's service-account token (mandate alone, and what the
injection overrode for that), and the warnings the webhook would give, word for word. With
``--profiles DIR``, a pod whose agent has no profile there is refused as the webhook
refuses it (or warned about: the injector's ``unknownAgent``).
Exit 0, or 2 on bad input (unreadable file, bad YAML, invalid profiles, a selected pod that
cannot be injected: the message names the document and field).

`mandate webhook` serves the admission webhook (`sidecar.injection.webhook`) until SIGTERM,
with its metrics on ``--metrics-listen`` and the agent check on ``--profiles-api``.

The sidecar's image is the config's ``image``, else ``MANDATE_SIDECAR_IMAGE``, else the
built-in default: deploy/ sets it once, on the webhook's container.

Must not contain injection logic (that is `sidecar.injection.pod`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from sidecar.core import load_profiles
from sidecar.errors import ConfigError, InjectError, ProfileError

if TYPE_CHECKING:
    from sidecar.injection.pod import InjectConfig
    from sidecar.injection.profiles import ApiProfiles

__all__ = ["IMAGE_ENV", "add_inject_parser", "load_config", "run_inject"]

EXIT_OK, EXIT_BAD_INPUT = 0, 2
# The sidecar's image when the injector config names none (deploy/base/kustomization.yaml
# fills it from the webhook container's own image).
IMAGE_ENV = "MANDATE_SIDECAR_IMAGE"

# Where each kind keeps its pod template ("" = the object is the pod).
_TEMPLATES: dict[str, tuple[str, ...]] = {
    "Pod": (),
    "Deployment": ("spec", "template"),
    "StatefulSet": ("spec", "template"),
    "DaemonSet": ("spec", "template"),
    "ReplicaSet": ("spec", "template"),
    "ReplicationController": ("spec", "template"),
    "Job": ("spec", "template"),
    "CronJob": ("spec", "jobTemplate", "spec", "template"),
    "PodTemplate": ("template",),
}


def add_inject_parser(subparsers: Any) -> None:
    """Add `inject` and `webhook` to the `mandate` subcommands."""
    inj: argparse.ArgumentParser = subparsers.add_parser(
        "inject",
        help="add the sidecar to pods in Kubernetes manifests (offline)",
        description=(
            "Print the objects of FILE with mandate's sidecar added to every pod (template) "
            'labelled mandate.dev/inject: "true", exactly as the admission webhook would. '
            "Exit 0, or 2 on bad input."
        ),
    )
    inj.add_argument("-f", "--filename", required=True, help="manifest file, or - for stdin")
    inj.add_argument("-o", "--output", choices=["yaml", "json"], default="yaml")
    inj.add_argument("--config", type=Path, help="injector config (deploy/base/injector.yaml)")
    inj.add_argument(
        "--all",
        action="store_true",
        help="inject every pod, as in a namespace labelled for injection (a pod labelled "
        'mandate.dev/inject: "false" is refused unless the injector allows opt-outs: '
        "allowPodOptOut)",
    )
    inj.add_argument(
        "--profiles",
        type=Path,
        metavar="DIR",
        help="the agents' profiles (as in the profiles ConfigMap): a pod whose agent has "
        "none is refused (the injector's unknownAgent: refuse) or warned about",
    )
    web_ = subparsers.add_parser(
        "webhook",
        help="serve the mutating admission webhook (HTTPS)",
        description="Serve POST /mutate, /mutate-namespace and GET /healthz over TLS.",
    )
    web_.add_argument("--cert", type=Path, required=True, help="PEM certificate (chain)")
    web_.add_argument("--key", type=Path, required=True, help="PEM private key")
    web_.add_argument("--listen", default="0.0.0.0:8443", help="HOST:PORT (default %(default)s)")
    web_.add_argument("--config", type=Path, help="injector config (deploy/base/injector.yaml)")
    web_.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    web_.add_argument(
        "--metrics-listen",
        default="",
        metavar="HOST:PORT",
        help="serve GET /metrics over plain HTTP here (default: off)",
    )
    web_.add_argument(
        "--profiles-api",
        default="off",
        metavar="in-cluster|URL|off",
        help="check that a pod's agent has a profile in its namespace's profiles ConfigMap, "
        "read from this API server (in-cluster: the pod's service account; default off)",
    )


def load_config(path: Path | None, environ: Mapping[str, str] | None = None) -> InjectConfig:
    """The injector config from a YAML file; the built-in defaults without one. The image,
    unless the file sets one, is ``MANDATE_SIDECAR_IMAGE`` (deploy/ sets it from the webhook's
    own image: one place for the image), else the built-in default."""
    from sidecar.injection.pod import InjectConfig  # not on `mandate run`'s path (issue 20)

    environ = os.environ if environ is None else environ
    data: Any = None
    if path is not None:
        try:
            data = yaml.safe_load(path.read_text())
        except OSError as exc:
            raise ConfigError(f"--config {path}: {exc.strerror or exc}") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"--config {path}: not YAML ({exc})") from None
    image = environ.get(IMAGE_ENV, "").strip()
    if image and (data is None or (isinstance(data, dict) and "image" not in data)):
        data = {**(data or {}), "image": image}
    return InjectConfig.from_mapping(data, source=str(path) if path else IMAGE_ENV)


def run_inject(args: argparse.Namespace) -> int:
    try:
        if args.command == "webhook":
            return _webhook(args)
        return _inject(args)
    except (ConfigError, InjectError, ProfileError) as exc:
        print(f"mandate: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT


# -- mandate inject ------------------------------------------------------------------------------


def _read(filename: str) -> list[Any]:
    try:
        text = sys.stdin.read() if filename == "-" else Path(filename).read_text()
    except OSError as exc:
        raise ConfigError(f"-f {filename}: {exc.strerror or exc}") from None
    try:
        return [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError as exc:
        raise ConfigError(f"-f {filename}: not YAML ({exc})") from None


def _describe(obj: dict[str, Any]) -> str:
    meta = obj.get("metadata") if isinstance(obj.get("metadata"), dict) else {}
    assert isinstance(meta, dict)
    name = meta.get("name") or meta.get("generateName") or "(unnamed)"
    ns = f"{meta['namespace']}/" if meta.get("namespace") else ""
    return f"{obj.get('kind')} {ns}{name}"


def _pods(obj: Any) -> Iterator[tuple[dict[str, Any], dict[str, Any], tuple[str, ...]]]:
    """(object, its owner for messages, path to the pod) for each pod (template) in obj."""
    if not isinstance(obj, dict):
        return
    kind = obj.get("kind")
    if kind == "List" or (isinstance(kind, str) and kind.endswith("List")):
        for item in obj.get("items") or []:
            yield from _pods(item)
        return
    if isinstance(kind, str) and kind in _TEMPLATES:
        yield obj, obj, _TEMPLATES[kind]


def _get(obj: dict[str, Any], path: tuple[str, ...]) -> Any:
    for key in path:
        if not isinstance(obj, dict):
            return None
        obj = obj.get(key)  # type: ignore[assignment]
    return obj


def _inject(args: argparse.Namespace) -> int:
    from sidecar.injection.pod import (
        ANNOTATION_SERVICE_ACCOUNT_TOKEN,
        inject,
        mode_of,
        selected,
        unknown_agent_problem,
        warnings_for,
    )

    config = load_config(args.config)
    agents = load_profiles(args.profiles).agents if args.profiles is not None else None
    docs = _read(args.filename)
    for n, doc in enumerate(docs, start=1):
        for obj, owner, path in _pods(doc):
            what = _describe(owner)
            pod = _get(obj, path)
            if not isinstance(pod, dict):
                raise InjectError(f"document {n} ({what}): {'.'.join(path)}: expected an object")
            try:
                new = inject(pod, config, namespace_selected=args.all)
                mode = mode_of(pod, config) if new != pod else ""
            except InjectError as exc:
                raise InjectError(f"document {n} ({what}): {exc}") from None
            if not selected(pod, namespace_selected=args.all):
                print(f"unchanged {what}: not selected for injection", file=sys.stderr)
                continue
            if new == pod:  # injected before, with this injector config
                print(f"unchanged {what}: already injected", file=sys.stderr)
                continue
            # The webhook reads the namespace's profiles ConfigMap; offline, --profiles.
            unknown = unknown_agent_problem(pod, agents, str(args.profiles)) if agents else ""
            if unknown and config.unknown_agent == "refuse":
                raise InjectError(f"document {n} ({what}): {unknown}")
            # The webhook's warnings, word for word (AdmissionReview warnings there); before
            # the pod is replaced below: they compare it with the injected one.
            warnings = [f"mandate: {unknown}"] if unknown else []
            warnings += warnings_for(new, config, original=pod)
            if path:
                parent = _get(obj, path[:-1])
                assert isinstance(parent, dict)
                parent[path[-1]] = new
            else:
                obj.clear()
                obj.update(new)
            print(f"injected {what} ({mode})", file=sys.stderr)
            token = new["metadata"]["annotations"][ANNOTATION_SERVICE_ACCOUNT_TOKEN]
            print(f"  service-account token: {token}", file=sys.stderr)
            for warning in warnings:
                print(f"  warning: {warning}", file=sys.stderr)
    _print(docs, args.output)
    return EXIT_OK


class _Dumper(yaml.SafeDumper):
    pass


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    # The capture script stays readable: multi-line strings as literal blocks.
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str)


def _print(docs: list[Any], output: str) -> None:
    if output == "json":
        out: Any = (
            docs[0] if len(docs) == 1 else {"apiVersion": "v1", "kind": "List", "items": docs}
        )
        print(json.dumps(out, indent=2))
        return
    sys.stdout.write(
        yaml.dump_all(docs, Dumper=_Dumper, sort_keys=False, default_flow_style=False, width=100)
    )


# -- mandate webhook -----------------------------------------------------------------------------


def _webhook(args: argparse.Namespace) -> int:
    # aiohttp only for this command
    from sidecar.injection.profiles import ApiProfiles
    from sidecar.injection.webhook import WebhookServer

    logging.basicConfig(
        level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    host, port = _host_port("--listen", args.listen)
    config = load_config(args.config)
    metrics = _host_port("--metrics-listen", args.metrics_listen) if args.metrics_listen else None
    profiles: ApiProfiles | None = None
    if args.profiles_api == "in-cluster":
        profiles = ApiProfiles.in_cluster(config.profiles_config_map)
    elif args.profiles_api != "off":
        if not args.profiles_api.startswith(("https://", "http://")):
            raise ConfigError(
                f"--profiles-api {args.profiles_api!r}: expected in-cluster, off or a URL"
            )
        profiles = ApiProfiles(args.profiles_api, config.profiles_config_map)
    server = WebhookServer(
        config, args.cert, args.key, host, port, profiles=profiles, metrics=metrics
    )

    async def serve() -> None:
        await server.start()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        try:
            await stop.wait()
        finally:
            await server.stop()

    asyncio.run(serve())
    return EXIT_OK


def _host_port(flag: str, value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit():
        raise ConfigError(f"{flag} {value!r}: expected HOST:PORT")
    return host.strip("[]"), int(port)
