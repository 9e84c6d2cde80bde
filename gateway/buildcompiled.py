"""Builds the compiled hot path (:mod:`gateway.compiled`) with mypyc.

    python -m gateway.buildcompiled            # build, from anywhere
    python -m gateway.buildcompiled --status   # how each module loads

Run by ``make setup``/``make native``. Needs the dev extras (mypy, which
brings mypyc, and setuptools) and a C compiler. The extensions land next
to their sources, with the library they share
(``gateway/hotpath__mypyc.*.so``); the C sources and objects under
``target/mypyc``.
"""

from __future__ import annotations

import os
import sys

from gateway import compiled

GROUP = "gateway.hotpath"


def build(build_dir: str = "target/mypyc") -> None:
    # imported here: only a build needs them
    from mypyc.build import mypycify
    from setuptools import Distribution  # type: ignore[import-untyped]

    root = compiled.ROOT
    os.chdir(root)  # where pyproject.toml's mypy settings apply
    # a module taken off the list must not keep loading its old build
    for old in (root / "gateway").rglob("*.cpython-*.so"):
        if old.parent.name != "_native":
            old.unlink()
    paths = [str(compiled.source_path(m).relative_to(root)) for m in compiled.MODULES]
    # one group: the modules call each other directly; its shared library
    # is gateway/hotpath__mypyc.*.so (not a top-level module)
    exts = mypycify(paths, opt_level="3", target_dir=build_dir, group_name=GROUP)
    # a bare distribution (no project metadata): nothing but these extensions
    dist = Distribution({"name": "gateway-compiled", "ext_modules": exts})
    dist.packages = []
    dist.py_modules = []
    cmd = dist.get_command_obj("build_ext")
    cmd.inplace = True
    cmd.build_temp = build_dir
    dist.run_command("build_ext")
    for m in compiled.MODULES:  # newer than every source, as stale() expects
        ext = compiled.extension_path(m)
        if ext is not None:
            os.utime(ext)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args == ["--status"]:
        why = compiled.install_source_only()
        for name, yes in compiled.status().items():
            print(f"{name}: {'compiled' if yes else 'source'}")
        if why is not None:
            print(f"(sources: {why})")
        return 0
    if args:
        print("usage: python -m gateway.buildcompiled [--status]", file=sys.stderr)
        return 2
    build()
    return 0


if __name__ == "__main__":
    sys.exit(main())
