"""The hot path's modules compiled to C extensions with mypyc, and running
without them.

The modules in :data:`MODULES` (the event loop, the WebSocket and
HTTP/2-link data paths, the session and forwarding logic a message goes
through) are plain typed Python; ``make setup`` also compiles them with
mypyc (``python -m gateway.buildcompiled``), which puts an extension
module next to each source file. Python imports an extension before the
source of the same name, so a built tree runs the compiled code and a tree
without the build (a wheel from ``pip install .``, a machine without a C
compiler) runs the same modules as Python.

The package's ``__init__`` calls :func:`install_source_only`, which makes
these imports load the sources instead when

- ``GATEWAY_COMPILED=0`` is in the environment (to compare the two, or to
  rule the compilation out when something behaves differently), or
- any of the sources is newer than the build (edited since ``make
  setup``): the compiled modules call each other directly, so one stale
  extension cannot be swapped for its source alone; all of them go, with a
  warning on stderr, until the next build.

``python -m gateway.buildcompiled --status`` says how each module loads.
Compiled code checks the declared types at run time (an ``int`` argument
that is not an int raises ``TypeError``), so these modules must be
mypy-clean without ``Any`` hiding another type; the test suite runs
against the compiled build, and CI also runs the sans-IO tests on the
sources.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import Final

#: the modules compiled by ``make setup``
MODULES: Final = (
    "gateway.netio",
    "gateway.ratelimit",
    "gateway.recent",
    "gateway.tlsbio",
    "gateway.trioidle",
    "gateway.protocol.codec",
    "gateway.protocol.wsframe",
    "gateway.server.pipe",
    "gateway.server.h2conn",
    "gateway.server.reactor",
    "gateway.server.shell",
    "gateway.server.ws",
    "gateway.session.hub",
    "gateway.session.limits",
    "gateway.session.state",
    "gateway.session.terms",
    "gateway.session.visitor",
    "gateway.downstream.admission",
    "gateway.downstream.balancer",
    "gateway.downstream.breaker",
    "gateway.downstream.desk",
    "gateway.downstream.deskserver",
    "gateway.downstream.forwarder",
    "gateway.downstream.h2data",
    "gateway.downstream.moveorder",
    "gateway.downstream.link",
    "gateway.downstream.proto",
    "gateway.ops.registry",
)

ENV: Final = "GATEWAY_COMPILED"
ROOT: Final = Path(__file__).resolve().parent.parent  # the package's parent (the repository)
_why: str | None = None  # why the sources are used, once decided


def source_path(name: str, root: Path = ROOT) -> Path:
    """The source file of module ``name`` (one of :data:`MODULES`)."""
    return root.joinpath(*name.split(".")).with_suffix(".py")


class _SourceOnly(importlib.abc.MetaPathFinder):
    """Finds the sources of :data:`MODULES`, ahead of their extensions."""

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname not in MODULES:
            return None
        src = source_path(fullname)
        if not src.is_file():
            return None
        return importlib.util.spec_from_file_location(fullname, src)


def extension_path(name: str, root: Path = ROOT) -> Path | None:
    """The compiled build of module ``name``, if there is one."""
    src = source_path(name, root)
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        p = src.with_suffix(suffix)
        if p.is_file():
            return p
    return None


def stale(root: Path = ROOT) -> list[str]:
    """The modules whose source changed after their build (or that have
    no build while others do); none without a build."""
    built = {m: extension_path(m, root) for m in MODULES}
    if not any(built.values()):
        return []
    out = []
    for name, ext in built.items():
        if ext is None or source_path(name, root).stat().st_mtime > ext.stat().st_mtime:
            out.append(name)
    return out


def install_source_only() -> str | None:
    """Makes the imports of :data:`MODULES` load their sources when asked
    to (``GATEWAY_COMPILED=0``) or when the build is stale. Returns why,
    or None when the build (if any) is used."""
    global _why
    if any(isinstance(f, _SourceOnly) for f in sys.meta_path):
        return _why
    if os.environ.get(ENV, "1") == "0":
        why = f"{ENV}=0"
    else:
        old = stale()
        if not old:
            return None
        why = f"sources newer than their build: {', '.join(old)}"
        print(
            f"gateway: running the hot path from source ({why}); `make native` rebuilds it",
            file=sys.stderr,
        )
    _why = why
    sys.meta_path.insert(0, _SourceOnly())
    return why


def is_compiled(module: ModuleType) -> bool:
    """Whether ``module`` was loaded from an extension (a compiled build)."""
    return isinstance(getattr(module, "__loader__", None), importlib.machinery.ExtensionFileLoader)


def status() -> dict[str, bool]:
    """Each of :data:`MODULES`: loaded compiled (True) or as source."""
    out: dict[str, bool] = {}
    for name in MODULES:
        out[name] = is_compiled(importlib.import_module(name))
    return out
