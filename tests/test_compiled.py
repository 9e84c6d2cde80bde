"""The compiled hot path (gateway.compiled): which build a process loads,
the switch to the sources, and a stale build never shadowing edited
sources."""

from __future__ import annotations

import importlib.machinery
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from gateway import compiled

ROOT = Path(__file__).resolve().parent.parent

_PROBE = "import json, sys; from gateway import compiled; json.dump(compiled.status(), sys.stdout)"


def _probe(env: dict[str, str], cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    """A fresh interpreter's :func:`compiled.status` (on stdout, as JSON)."""
    return subprocess.run(
        [sys.executable, "-c", _PROBE],
        cwd=cwd,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )


def _status(env: dict[str, str]) -> dict[str, bool]:
    got: dict[str, bool] = json.loads(_probe(env).stdout)
    return got


def _built() -> bool:
    return all(compiled.extension_path(m) is not None for m in compiled.MODULES)


def test_every_module_listed_exists_as_a_source() -> None:
    for m in compiled.MODULES:
        assert compiled.source_path(m).is_file(), m


def test_a_built_tree_loads_every_module_compiled_unless_told_not_to() -> None:
    if not _built():
        pytest.skip("no compiled build here (make native builds it)")
    assert compiled.stale() == []
    assert set(_status({compiled.ENV: "1"}).values()) == {True}
    assert set(_status({compiled.ENV: "0"}).values()) == {False}


def test_the_sources_are_what_runs_without_a_build(tmp_path: Path) -> None:
    # a copy of the package without the compiled build: nothing compiled loads
    tree = tmp_path / "tree"
    shutil.copytree(
        ROOT / "gateway",
        tree / "gateway",
        ignore=shutil.ignore_patterns("__pycache__", "*.cpython-*.so"),
    )
    out = _probe({"PYTHONPATH": str(tree)}, cwd=tree)
    assert set(json.loads(out.stdout).values()) == {False}
    assert out.stderr == ""  # no build is not a stale build


def _fake_tree(root: Path, mtime_src: float, mtime_ext: float) -> None:
    suffix = importlib.machinery.EXTENSION_SUFFIXES[0]
    for m in compiled.MODULES:
        src = compiled.source_path(m, root)
        src.parent.mkdir(parents=True, exist_ok=True)
        src.write_text("")
        ext = src.with_suffix(suffix)
        ext.write_bytes(b"")
        os.utime(src, (mtime_src, mtime_src))
        os.utime(ext, (mtime_ext, mtime_ext))


def test_a_source_edited_after_the_build_makes_the_build_stale(tmp_path: Path) -> None:
    assert compiled.stale(tmp_path) == []  # no build at all
    _fake_tree(tmp_path, 1000.0, 2000.0)
    assert compiled.stale(tmp_path) == []
    edited = compiled.MODULES[3]
    src = compiled.source_path(edited, tmp_path)
    os.utime(src, (3000.0, 3000.0))
    assert compiled.stale(tmp_path) == [edited]
    # a module whose extension is missing while the others are built
    gone = compiled.MODULES[0]
    ext = compiled.extension_path(gone, tmp_path)
    assert ext is not None
    ext.unlink()
    assert compiled.stale(tmp_path) == [gone, edited]


def test_a_stale_build_is_not_loaded_at_all() -> None:
    """One stale module sends every module to its source (compiled modules
    call each other directly, so mixing would run the old code), with a
    warning saying why."""
    if not _built():
        pytest.skip("no compiled build here (make native builds it)")
    victim = compiled.source_path(compiled.MODULES[0])
    ext = compiled.extension_path(compiled.MODULES[0])
    assert ext is not None
    st = victim.stat()
    try:
        edited = ext.stat().st_mtime + 60  # as if saved after the build
        os.utime(victim, (edited, edited))
        out = _probe({compiled.ENV: "1"})
    finally:
        os.utime(victim, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert set(json.loads(out.stdout).values()) == {False}
    assert "running the hot path from source" in out.stderr
    assert compiled.MODULES[0] in out.stderr
    assert compiled.stale() == []  # the build is current again


def test_no_compiled_function_binds_one_name_to_two_exception_types() -> None:
    """mypyc gives a name one type per function: ``except A as e`` and
    ``except B as e`` in the same function make the second clause raise
    TypeError in the compiled build (it did in ws.py: a bad frame after a
    WebSocket violation handler). Each clause needs its own name there."""
    import ast

    found = []
    for m in compiled.MODULES:
        tree = ast.parse(compiled.source_path(m).read_text())
        for fn in ast.walk(tree):
            if not isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            kinds: dict[str, set[str]] = {}
            for node in ast.walk(fn):
                if isinstance(node, ast.ExceptHandler) and node.name and node.type:
                    kinds.setdefault(node.name, set()).add(ast.unparse(node.type))
            found += [f"{m}.{fn.name}: {n}" for n, k in kinds.items() if len(k) > 1]
    assert found == []
