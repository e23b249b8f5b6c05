"""The layout is the architecture: what a layer imports stays below it (the layers contract in
pyproject.toml, checked by ``lint-imports`` in ``make test``); these are the seams it protects."""

from __future__ import annotations

import subprocess

from kvcache.child import python_argv


def _imports_torch(module: str) -> bool:
    code = f"import sys, {module}; print('torch' in sys.modules)"
    out = subprocess.run(python_argv("-c", code), capture_output=True, text=True, timeout=120, check=True)
    return out.stdout.strip() == "True"


def test_the_front_does_not_import_torch() -> None:
    """The front and its worker pool read the worker's wire records from ``serve.wire``, not from
    the worker module, which imports the engine and torch."""
    assert not _imports_torch("kvcache.serve.front")
    assert not _imports_torch("kvcache.serve.pool")


def test_the_runtime_router_does_not_import_the_lab() -> None:
    code = "import sys, kvcache.router; print(sorted(m for m in sys.modules if m.startswith('kvcache.lab')))"
    out = subprocess.run(python_argv("-c", code), capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "[]"


def test_kernels_import_only_errors_and_each_other() -> None:
    """kernels/ is a namespace package the layers contract cannot see (pyproject.toml says why):
    its modules may import nothing of kvcache but ``kvcache.errors`` and ``kvcache.kernels``."""
    import ast
    from pathlib import Path

    allowed = ("kvcache.errors", "kvcache.kernels")
    found = []
    for path in sorted((Path(__file__).parents[1] / "kernels").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            names += [a.name for a in node.names] if isinstance(node, ast.Import) else []
            found += [(path.name, n) for n in names if n.startswith("kvcache") and not n.startswith(allowed)]
    assert found == []
