"""kubernetes_asyncio without importing all of it (issue 20: memory per pod).

`import kubernetes_asyncio` runs package `__init__`s that import every API class and every
model the OpenAPI generator wrote: ~850 modules and +57 MB of RSS in each pod (measured:
`python -m bench memory_breakdown --pod`). mandate uses three API classes, `Watch`, the
config loaders and, to deserialize an Event it posts, a handful of models.

`install()` puts in `sys.modules`, before anything imports the library, a lazy module for
each of those packages. Each is the real package (same `__path__`, `__file__`, spec), but
instead of running its `__init__` it reads the `from X import Y` / `import X as Y` lines of
that `__init__` and imports a name only when first asked for it (PEP 562 `__getattr__`):
`from kubernetes_asyncio.client import ApiClient` imports `client/api_client.py` and what it
needs, nothing else. Every name the real package offers is offered, with the same object
(tests/unit/test_kube_lazyimport.py compares them against the real import).

The library is pinned (requirements); an `__init__` in another shape (a line the parser does
not know) makes `install()` do nothing, so a newer version costs memory, never correctness.
Nothing to do when the library is already imported (a test process, a REPL).
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import sys
import types
from pathlib import Path
from typing import Any

# The packages whose __init__ imports the world, outermost first.
PACKAGES = (
    "kubernetes_asyncio",
    "kubernetes_asyncio.client",
    "kubernetes_asyncio.client.api",
    "kubernetes_asyncio.client.models",
)


class UnknownShape(ValueError):
    """A package __init__ holds a statement the lazy module could not reproduce."""


def parse_init(text: str) -> tuple[dict[str, tuple[str, str | None]], dict[str, Any]]:
    """The names an `__init__` binds: name -> (module, attribute, or None for the module
    itself), and its literal assignments (`__version__`, `__all__`). Raises UnknownShape on
    any other statement (a docstring aside)."""
    names: dict[str, tuple[str, str | None]] = {}
    constants: dict[str, Any] = {}
    for node in ast.parse(text).body:
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module != "__future__":
                for alias in node.names:
                    if alias.name == "*":
                        raise UnknownShape(f"from {node.module} import *")
                    names[alias.asname or alias.name] = (node.module, alias.name)
        elif isinstance(node, ast.Import) and all(a.asname for a in node.names):
            for alias in node.names:
                names[str(alias.asname)] = (alias.name, None)
        elif (
            isinstance(node, ast.Assign)
            and len(node.targets) == 1
            and isinstance(node.targets[0], ast.Name)
        ):
            try:
                constants[node.targets[0].id] = ast.literal_eval(node.value)
            except ValueError:
                raise UnknownShape(ast.unparse(node)[:80]) from None
        elif not (isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)):
            raise UnknownShape(ast.unparse(node)[:80])
    return names, constants


def _lazy(name: str) -> types.ModuleType | None:
    spec = importlib.util.find_spec(name)
    if spec is None or spec.origin is None or spec.submodule_search_locations is None:
        return None
    names, constants = parse_init(Path(spec.origin).read_text(encoding="utf-8"))
    module = types.ModuleType(name)
    module.__file__ = spec.origin
    module.__path__ = list(spec.submodule_search_locations)
    module.__package__ = name
    module.__spec__ = spec
    module.__dict__.update(constants)

    def __getattr__(attr: str) -> Any:
        if attr not in names:
            raise AttributeError(f"module {name!r} has no attribute {attr!r}")
        source, real = names[attr]
        value = importlib.import_module(source)
        if real is not None:
            value = getattr(value, real)
        setattr(module, attr, value)
        return value

    def __dir__() -> list[str]:
        return sorted({*module.__dict__, *names})

    module.__getattr__ = __getattr__  # type: ignore[method-assign]
    module.__dir__ = __dir__  # type: ignore[method-assign]
    return module


def install() -> bool:
    """Lazy modules for PACKAGES, unless the library is imported already or an `__init__`
    is not in the shape they reproduce. True if installed."""
    if any(name in sys.modules for name in PACKAGES):
        return False
    made: list[tuple[str, types.ModuleType]] = []
    try:
        for name in PACKAGES:
            module = _lazy(name)
            if module is None:
                raise UnknownShape(name)
            sys.modules[name] = module  # the next find_spec needs its parent
            made.append((name, module))
    except (UnknownShape, OSError, ValueError, SyntaxError, ImportError):
        for name, _ in made:
            sys.modules.pop(name, None)
        return False
    modules = dict(made)
    for name, module in made:
        parent, _, child = name.rpartition(".")
        if parent in modules:
            setattr(modules[parent], child, module)
    return True
