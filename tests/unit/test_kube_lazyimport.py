"""sidecar.kube.lazyimport: kubernetes_asyncio imported name by name offers every name the
real import offers, the same objects, at a fraction of the modules; an `__init__` in an
unknown shape leaves the real import in place."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from sidecar.kube import lazyimport
from sidecar.kube.lazyimport import UnknownShape, parse_init

# Every name of every lazy package, as (module, qualified name) of the object it gives.
_NAMES = textwrap.dedent(
    """
    import importlib, json, sys
    lazy = sys.argv[1] == "lazy"
    if lazy:
        from sidecar.kube import lazyimport
        assert lazyimport.install() or "kubernetes_asyncio" in sys.modules
    out = {}
    for pkg in ("kubernetes_asyncio", "kubernetes_asyncio.client",
                "kubernetes_asyncio.client.api", "kubernetes_asyncio.client.models"):
        module = importlib.import_module(pkg)
        for name in dir(module):
            if name.startswith("__") or name == "absolute_import":
                continue
            value = getattr(module, name)
            where = getattr(value, "__module__", None) or getattr(value, "__name__", "")
            out[f"{pkg}.{name}"] = [where, getattr(value, "__qualname__", repr(value))]
    print(json.dumps(out))
    """
)

_FOOTPRINT = textwrap.dedent(
    """
    import json, sys
    import sidecar.kube
    from kubernetes_asyncio.client import ApiClient, CoreV1Api, CustomObjectsApi
    from kubernetes_asyncio.watch import Watch
    import kubernetes_asyncio.client.models as models
    models.CoreV1Event  # what the reporter's posted Event deserializes into
    print(json.dumps(sorted(m for m in sys.modules if m.startswith("kubernetes_asyncio"))))
    """
)


def _run(code: str, *args: str) -> object:
    proc = subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout)


def test_every_name_of_the_real_packages_is_offered_with_the_same_object() -> None:
    real, lazy = _run(_NAMES, "real"), _run(_NAMES, "lazy")
    assert isinstance(real, dict) and len(real) > 1000
    assert lazy == real


def test_what_mandate_uses_imports_a_few_dozen_modules_not_the_library() -> None:
    modules = _run(_FOOTPRINT)
    assert isinstance(modules, list)
    assert "kubernetes_asyncio.client.api.custom_objects_api" in modules
    assert "kubernetes_asyncio.client.models.core_v1_event" in modules
    # The real import is ~850 modules (every API and model).
    assert len(modules) < 60, len(modules)
    assert "kubernetes_asyncio.client.api.apps_v1_api" not in modules


def test_the_parser_reads_imports_aliases_and_literals() -> None:
    names, constants = parse_init(
        '"""doc"""\n# coding: utf-8\nfrom __future__ import absolute_import\n'
        "from a.b import C\nfrom a.d import E as F\nimport a.g as g\n"
        '__version__ = "1.2"\n__all__ = ["C"]\n'
    )
    assert names == {"C": ("a.b", "C"), "F": ("a.d", "E"), "g": ("a.g", None)}
    assert constants == {"__version__": "1.2", "__all__": ["C"]}


@pytest.mark.parametrize(
    "source",
    [
        "from a import *\n",
        "import a\n",  # binds `a`, not a name of this package
        "from . import b\n",
        "def f():\n    pass\n",
        "x = compute()\n",
        "if True:\n    from a import b\n",
    ],
)
def test_any_other_statement_is_an_unknown_shape(source: str) -> None:
    with pytest.raises(UnknownShape):
        parse_init(source)


def test_an_unknown_shape_leaves_the_real_import(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [m for m in sys.modules if m.startswith("kubernetes_asyncio")]:
        monkeypatch.delitem(sys.modules, name)
    real_parse = lazyimport.parse_init

    def parse(text: str) -> object:
        if "CoreV1Api" in text:  # the api package's __init__, the third of four
            raise UnknownShape("changed")
        return real_parse(text)

    monkeypatch.setattr(lazyimport, "parse_init", parse)
    assert lazyimport.install() is False
    assert not [m for m in sys.modules if m.startswith("kubernetes_asyncio")]


def test_nothing_is_installed_over_an_imported_library(monkeypatch: pytest.MonkeyPatch) -> None:
    import kubernetes_asyncio

    before = sys.modules["kubernetes_asyncio"]
    assert lazyimport.install() is False
    assert sys.modules["kubernetes_asyncio"] is before is kubernetes_asyncio
