"""The repository's ``kernels/`` folder never shadows Hugging Face's ``kernels`` package.

transformers (5.25 and newer) imports the installed ``kernels`` package while it builds a model. Python
started with ``-m`` or ``-c`` puts its working directory first on ``sys.path``; started in the
repository root, that directory holds our ``kernels/`` folder. It is a namespace package (no
``__init__.py``), which the import system only takes when no regular package of that name exists
anywhere on the path, so the installed one always wins. On top of that, every Python process the
project starts runs with ``-P`` (:func:`kvcache.child.python_argv`), which leaves the working
directory out altogether.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from kvcache.child import python_argv

ROOT = Path(__file__).resolve().parent.parent


def run_in_root(code: str) -> str:
    """Run ``code`` with ``python -c`` from the repository root *without* ``-P``: the worst case,
    where the working directory is the first entry of ``sys.path``."""
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout.strip()


def test_hugging_face_kernels_package_is_installed() -> None:
    """The checks below mean something only with the real package present (a dev dependency)."""
    from importlib.metadata import version

    assert version("kernels")


def test_import_kernels_from_the_repository_root_gets_the_installed_package() -> None:
    where = run_in_root("import kernels; print(kernels.__file__)")
    assert where != "None"
    assert Path(where).resolve().is_relative_to(Path(sys.prefix).resolve()), where
    assert not Path(where).resolve().is_relative_to(ROOT / "kernels"), where


def test_a_model_builds_from_the_repository_root() -> None:
    """What failed on a fresh machine: transformers' ``from kernels import ...`` while building."""
    got = run_in_root(
        "from kvcache.model import hf\nmodel = hf.load_model('tiny').model\nprint(type(model).__name__)"
    )
    assert got.endswith("ForCausalLM"), got


def test_our_kernels_still_import_as_kvcache_kernels() -> None:
    got = run_in_root(
        "from kvcache.kernels.dispatch import pack_blocks\n"
        "from kvcache.kernels.paged import paged_attention\n"
        "print(pack_blocks.__module__, paged_attention.__module__)"
    )
    assert got == "kvcache.kernels.dispatch kvcache.kernels.paged"


def test_kernels_folder_is_a_namespace_package() -> None:
    """An ``__init__.py`` here would make the folder a regular package that shadows the real one."""
    assert not (ROOT / "kernels" / "__init__.py").exists()


def test_python_argv_runs_in_safe_path_mode(tmp_path: Path) -> None:
    out = subprocess.run(
        python_argv("-c", "import sys; print(sys.flags.safe_path)"),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.strip() == "True"


def _executable_launches(path: Path) -> list[int]:
    """Line numbers where ``sys.executable`` appears in code (not in strings or docs)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    return [
        node.lineno
        for node in ast.walk(tree)
        if isinstance(node, ast.Attribute)
        and node.attr == "executable"
        and isinstance(node.value, ast.Name)
        and node.value.id == "sys"
    ]


@pytest.mark.parametrize("folder", ["kvcache", "kernels", "benches", "scripts", "tests"])
def test_every_python_child_is_started_through_python_argv(folder: str) -> None:
    allowed = {ROOT / "kvcache" / "child.py", Path(__file__).resolve()}
    offenders = [
        f"{path.relative_to(ROOT)}:{line}"
        for path in sorted((ROOT / folder).rglob("*.py"))
        if path.resolve() not in allowed
        for line in _executable_launches(path)
    ]
    assert not offenders, f"start Python children with kvcache.child.python_argv: {offenders}"
