"""The one module that imports ``transformers``: models, tokenizers and the model's KV cache object.

- :func:`load_model` builds a random-weight model from a config (``tiny``, ``tiny-llama``,
  ``tiny-qwen2``, ``tiny-mistral``, ``tiny-gpt2``, ``tiny-phi``, ``small-qwen2``,
  ``qwen2.5-7b-shape``: real code paths, no download) or loads a name or local path with
  ``from_pretrained`` from local files only.
- :func:`convert_gguf` dequantizes a GGUF file (weights, tokenizer, chat template) into a plain
  safetensors checkpoint folder that :func:`load_model` then loads fast. Which GGUF, and where the
  folder lives, is ``kvcache.model.registry``' business.
- :func:`new_cache` makes an empty cache object, and :func:`forward` runs the model on new tokens at
  explicit positions after whatever the cache holds (an uncached baseline, the KV geometry probe),
  for both transformers 4.5x (legacy ``key_cache``, models that take tuples) and 5.x (the Cache
  API's ``cache.layers[i].keys``, the ``cache=`` argument). A transformers upgrade is this file's
  problem only.
- :func:`weights_digest` names the exact weights a model holds (computed once in :func:`load_model`,
  kept in ``LoadedModel.weights_digest``), so spill tiers never mix KV of two checkpoints that
  share a name and a shape.
- :func:`paged_forward` runs one ragged batch (many sequences' tokens, flattened) with attention
  registered through transformers' ``AttentionInterface`` that reads and writes KV straight in the
  engine's paged pool (``kvcache.kernels.paged``); :func:`paged_support` says whether a model can.

Not here: which blocks are cached or where they live (``manager``, ``engine``), block copies
(``kvcache.kernels``).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import blake3
import torch
import transformers
from transformers import AutoConfig, AutoTokenizer, DynamicCache
from transformers.utils import logging as _transformers_logging

from kvcache.errors import ConfigError, ModelError
from kvcache.kernels.dispatch import Backend
from kvcache.kernels.paged import PagedMetadata, paged_attention, write_kv
from kvcache.model.registry import QWEN25_7B_SHAPE, SMALL_QWEN2, has_tokenizer_files, random_weight_names

# Untyped entry points of transformers, named once so the rest of the module type-checks.
_AutoModel: Any = transformers.AutoModelForCausalLM
_CAUSAL_LM_CLASSES: Any = transformers.MODEL_FOR_CAUSAL_LM_MAPPING  # config class -> model class
_hf_logging: Any = _transformers_logging

TRANSFORMERS_MAJOR = int(transformers.__version__.split(".")[0])

_ALIASES = {"tiny": "llama"}


@dataclass(frozen=True, slots=True)
class KVShape:
    """What one token's KV looks like for a model: the pool is sized from this."""

    num_layers: int
    kv_heads: int
    head_dim: int
    vocab_size: int

    def bytes_per_token(self, dtype: torch.dtype) -> int:
        itemsize = torch.empty((), dtype=dtype).element_size()
        return self.num_layers * 2 * self.kv_heads * self.head_dim * itemsize


@dataclass(slots=True)
class LoadedModel:
    model: Any  # a transformers PreTrainedModel in eval mode
    tokenizer: Any | None
    shape: KVShape
    model_id: str
    device: torch.device
    dtype: torch.dtype
    weights_digest: bytes = b""  # ``weights_digest(model)``, filled in by ``load_model``


def weights_digest(model: Any) -> bytes:
    """16 bytes naming a model's weights: BLAKE3 over every state-dict entry in name order (its
    name, dtype, shape and bytes, as loaded: after any dtype conversion). Reads every weight once,
    about 1 s per 5 GB on one CPU core plus the device-to-host copy for a model on a GPU; buffers
    derived from the config (rotary tables) are included, which only makes the name stricter."""
    digest = blake3.blake3(b"kvcache weights v1")
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach()
        header = f"{name}\0{str(t.dtype).removeprefix('torch.')}\0{list(t.shape)}\0".encode()
        digest.update(len(header).to_bytes(4, "little") + header)
        data = t.to("cpu").contiguous().reshape(-1)
        if data.numel():
            digest.update(memoryview(data.view(torch.uint8).numpy()))
    return digest.digest(16)


def tiny_config(name: str) -> Any:
    """The config behind a random-weight model name (see ``models.random_weight_names``)."""
    family = _ALIASES.get(name, name.removeprefix("tiny-"))
    # A larger init spread than the default 0.02 gives peaked logits, so greedy choices are far
    # from ties and cached/uncached runs must agree on every token.
    common: dict[str, Any] = {"vocab_size": 1024, "initializer_range": 0.1}
    llama_like = {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 65536,
        **common,
    }
    if name == QWEN25_7B_SHAPE:
        return transformers.Qwen2Config(
            vocab_size=152064,
            hidden_size=3584,
            intermediate_size=18944,
            num_hidden_layers=28,
            num_attention_heads=28,
            num_key_value_heads=4,
            max_position_embeddings=131072,  # room for a 32k prompt plus its decode
            tie_word_embeddings=False,
        )
    if name == SMALL_QWEN2:
        small = {"hidden_size": 256, "intermediate_size": 768, "num_hidden_layers": 4, "vocab_size": 32000}
        return transformers.Qwen2Config(**{**llama_like, **small})
    if family == "llama":
        return transformers.LlamaConfig(**llama_like)
    if family == "qwen2":
        return transformers.Qwen2Config(**llama_like)
    if family == "mistral":
        # A window shorter than the test prompts, so the sliding-window mask is exercised.
        return transformers.MistralConfig(sliding_window=48, **llama_like)
    if family == "phi":
        phi: dict[str, Any] = {"partial_rotary_factor": 0.5, "max_position_embeddings": 65536}
        return transformers.PhiConfig(
            hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, **phi, **common
        )
    if family == "gpt2":
        gpt2: dict[str, Any] = {"n_positions": 16384, "bos_token_id": 0, "eos_token_id": 0}
        return transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, **gpt2, **common)
    raise ModelError(f"no tiny config named {name!r}; choose one of {', '.join(random_weight_names())}")


def _from_config(config: Any, dtype: torch.dtype) -> Any:
    dtype_kw = "dtype" if TRANSFORMERS_MAJOR >= 5 else "torch_dtype"
    return _AutoModel.from_config(config, attn_implementation="sdpa", **{dtype_kw: dtype})


def _device(device: torch.device | str | None) -> torch.device:
    """``device``, or CUDA when present else CPU; a device this machine lacks is a ``ConfigError``."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ConfigError(f"device {str(device)!r} is not a torch device; use 'cpu' or 'cuda[:N]'") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            f"device {str(device)!r}: no CUDA device is available (torch {torch.__version__}); "
            "use 'cpu', or leave the device unset to pick CUDA only when present"
        )
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ConfigError(f"device {str(device)!r}: only {torch.cuda.device_count()} CUDA device(s) present")
    return dev


def load_model(
    name_or_path: str,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    seed: int = 0,
    model_id: str | None = None,
) -> LoadedModel:
    """A model in eval mode on ``device`` (CUDA when present, else CPU) in ``dtype`` (bf16 on CUDA,
    float32 on CPU by default). Random-weight names are seeded by ``seed``. ``model_id`` names the
    model in cache keys (default: ``name_or_path``), so a checkpoint keeps one name wherever it lies."""
    dev = _device(device)
    dt = dtype if dtype is not None else (torch.bfloat16 if dev.type == "cuda" else torch.float32)
    tokenizer = None
    if name_or_path in random_weight_names():
        torch.manual_seed(seed)
        with torch.device(dev):
            model = _from_config(tiny_config(name_or_path), dt)
        model_id = "tiny-llama" if name_or_path == "tiny" else name_or_path
    else:
        model = _from_pretrained(name_or_path, dev, dt)
        tokenizer = load_tokenizer(name_or_path)
        model_id = model_id or name_or_path
    model.eval()
    shape = _probe_shape(model, dev)
    return LoadedModel(model, tokenizer, shape, model_id, dev, dt, weights_digest(model))


def import_model_code(path: str) -> None:
    """Import transformers' code for the model class ``path``'s config names, reading no weights:
    the seconds a process's first load spends importing (holding the GIL), taken where a caller
    has work outside the GIL to overlap with them. It never raises: a config that is missing,
    damaged (transformers then raises anything from ``OSError`` to ``TypeError``) or names no
    causal LM is reported by the check or the load that follows, and only the head start is lost."""
    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True)
        _CAUSAL_LM_CLASSES[type(config)]  # the lookup imports the modeling module
    except Exception:
        return


def _from_pretrained(name_or_path: str, device: torch.device, dtype: torch.dtype) -> Any:
    dtype_kw = "dtype" if TRANSFORMERS_MAJOR >= 5 else "torch_dtype"
    try:
        AutoConfig.from_pretrained(name_or_path, local_files_only=True)
    except (OSError, ValueError) as exc:
        hub = os.environ.get("HF_HOME", "~/.cache/huggingface")
        raise ModelError(
            f"model {name_or_path!r} is neither a local directory with config.json nor in the "
            f"Hugging Face cache under {hub} (kvcache loads local files only). Download it "
            f"where there is network (`hf download {name_or_path}`), copy the folder over and pass "
            f"its path, or use a random-weight model: {', '.join(random_weight_names())}"
        ) from exc
    with _progress_bars(False):  # a local load takes about a second: a bar is only noise
        model: Any = _AutoModel.from_pretrained(
            name_or_path, local_files_only=True, attn_implementation="sdpa", **{dtype_kw: dtype}
        )
    return model.to(device)


@contextlib.contextmanager
def _progress_bars(enabled: bool) -> Iterator[None]:
    """transformers' own progress bars on or off for the block, restored afterwards."""
    import transformers.modeling_gguf_pytorch_utils as gguf_utils

    gguf_mod: Any = gguf_utils
    # The GGUF reader calls tqdm directly, not through transformers' switch: swap it for the block.
    gguf_tqdm = gguf_mod.tqdm
    was_enabled = _hf_logging.is_progress_bar_enabled()
    (_hf_logging.enable_progress_bar if enabled else _hf_logging.disable_progress_bar)()
    gguf_mod.tqdm = gguf_tqdm if enabled else functools.partial(gguf_tqdm, disable=True)
    try:
        yield
    finally:
        gguf_mod.tqdm = gguf_tqdm
        (_hf_logging.enable_progress_bar if was_enabled else _hf_logging.disable_progress_bar)()


def convert_gguf(gguf_path: str, out_dir: str, *, show_progress: bool) -> None:
    """Dequantize ``gguf_path`` to float32 and save model, tokenizer and chat template as a plain
    checkpoint in ``out_dir`` (safetensors). Needs the ``gguf`` package. Not atomic: write to a
    temporary folder and move it into place (``kvcache.model.registry`` does)."""
    folder, name = os.path.split(gguf_path)
    try:
        with _progress_bars(show_progress):
            tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
            model: Any = _AutoModel.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    except ImportError as exc:
        raise ModelError(f"reading {gguf_path} needs the gguf package: pip install gguf ({exc})") from exc
    # The weights are plain float32 tensors now; drop the marker that says "loaded from GGUF", which
    # save_pretrained refuses to serialize.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    with _progress_bars(show_progress):
        model.save_pretrained(out_dir)
        tokenizer.save_pretrained(out_dir)


def load_tokenizer(name_or_path: str) -> Any | None:
    """The tokenizer stored with a model, or None (random-weight models and checkpoints saved
    without one: transformers would otherwise build an empty tokenizer from the config)."""
    if name_or_path in random_weight_names() or not has_tokenizer_files(name_or_path):
        return None
    try:
        return AutoTokenizer.from_pretrained(name_or_path, local_files_only=True)
    except (OSError, ValueError):
        return None


@torch.inference_mode()
def _probe_shape(model: Any, device: torch.device) -> KVShape:
    """Read the KV geometry off one real forward, so every family reports it the same way."""
    cache = new_cache()
    ids = torch.zeros((1, 1), dtype=torch.long, device=device)
    logits = forward(model, ids, cache, 0)
    layers = _cache_layers(cache)
    keys = layers[0][0]  # [1, kv_heads, 1, head_dim]
    return KVShape(len(layers), keys.shape[1], keys.shape[3], logits.shape[-1])


# ---- the cache object ------------------------------------------------------------------------


def new_cache() -> Any:
    """An empty cache object; :func:`forward` grows it in place.

    Layers are full-attention even for sliding-window models: the model's mask still applies the
    window.
    """
    return DynamicCache()


def _cache_layers(cache: Any) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per-layer ``(keys, values)``, each ``[batch, kv_heads, seq, head_dim]``."""
    if hasattr(cache, "layers"):  # transformers >= 4.56
        layers: list[Any] = list(cache.layers)
        return [(layer.keys, layer.values) for layer in layers]
    return list(zip(cache.key_cache, cache.value_cache, strict=True))


@dataclass(frozen=True, slots=True)
class _ForwardArgs:
    cache_kwarg: str  # "cache" where transformers renamed it, "past_key_values" before
    legacy_tuples: bool  # the model takes and returns tuples of (k, v), not a Cache (GPT-2 in 4.5x)
    logits_to_keep: bool


@functools.cache
def _forward_args(model_class: Any) -> _ForwardArgs:
    params = inspect.signature(model_class.forward).parameters
    return _ForwardArgs(
        cache_kwarg="cache" if "cache" in params else "past_key_values",
        legacy_tuples=not getattr(model_class, "_supports_cache_class", True),
        logits_to_keep="logits_to_keep" in params,
    )


def forward(model: Any, input_ids: torch.Tensor, cache: Any, start_pos: int) -> torch.Tensor:
    """Run ``input_ids`` ``[batch, n]`` at positions ``start_pos..start_pos+n-1`` after what ``cache``
    holds (grown in place); returns the last position's logits ``[batch, vocab]`` in float32."""
    batch, n = input_ids.shape
    positions = torch.arange(start_pos, start_pos + n, device=input_ids.device).expand(batch, n)
    args = _forward_args(model.__class__)
    kwargs: dict[str, Any] = {"logits_to_keep": 1} if args.logits_to_keep else {}
    if args.legacy_tuples:
        past = cache.to_legacy_cache() if cache.get_seq_length() else None
        out = model(
            input_ids=input_ids, position_ids=positions, past_key_values=past, use_cache=True, **kwargs
        )
        cache.key_cache = [k for k, _ in out.past_key_values]
        cache.value_cache = [v for _, v in out.past_key_values]
    else:
        kwargs[args.cache_kwarg] = cache
        out = model(input_ids=input_ids, position_ids=positions, use_cache=True, **kwargs)
    return out.logits[:, -1].float()  # type: ignore[no-any-return]


# ---- paged attention over the engine's pool -------------------------------------------------

PAGED_ATTENTION = "kvcache_paged"
_STEP_KWARG = "kvcache_step"


@dataclass(frozen=True, slots=True)
class PagedStep:
    """What every attention layer of one batched forward reads: the pool and the step's metadata.
    Passed to the model as a forward keyword, so two engines in one process never share it."""

    pool: torch.Tensor  # [num_layers, 2, num_blocks, block_size, kv_heads, head_dim]
    metadata: PagedMetadata
    backend: Backend = "auto"


def _paged_attention_forward(
    module: Any,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    sliding_window: int | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers' attention signature: ``query`` ``[1, H, N, D]``, ``key``/``value`` ``[1, H_kv, N,
    D]`` for the step's flattened tokens. Writes K/V into the pool, then attends over the blocks."""
    step = kwargs.get(_STEP_KWARG)
    if not isinstance(step, PagedStep):
        raise ModelError(
            f"attention {PAGED_ATTENTION!r} runs only inside kvcache.model.hf.paged_forward (no step given)"
        )
    layer = module.layer_idx
    write_kv(step.pool, layer, step.metadata, key[0].transpose(0, 1), value[0].transpose(0, 1))
    out = paged_attention(
        query[0].transpose(0, 1),
        step.pool,
        layer,
        step.metadata,
        scale=scaling,
        sliding_window=sliding_window,
        backend=step.backend,
    )
    return out.unsqueeze(0), None  # [1, N, H, D], as transformers' attention functions return


@functools.cache
def _register_paged_attention() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(PAGED_ATTENTION, _paged_attention_forward)


@contextlib.contextmanager
def _attention_implementation(model: Any, name: str) -> Iterator[None]:
    """Switch ``model``'s attention for the duration of one forward, and always switch it back."""
    config = model.config
    previous = config._attn_implementation
    config._attn_implementation = name
    try:
        yield
    finally:
        config._attn_implementation = previous


def paged_forward(
    model: Any,
    input_ids: torch.Tensor,
    positions: torch.Tensor,
    step: PagedStep,
    logits_indices: torch.Tensor,
) -> torch.Tensor:
    """ONE forward of a ragged batch: ``input_ids``/``positions`` ``[N]`` are every scheduled token of
    every sequence, flattened; attention reads and writes KV in ``step.pool`` (no cache object, no
    mask: the paged attention applies causality per sequence). Returns float32 logits ``[len(
    logits_indices), vocab]`` at the flat positions ``logits_indices``."""
    _register_paged_attention()
    with _attention_implementation(model, PAGED_ATTENTION):
        out = model(
            input_ids=input_ids[None],
            position_ids=positions[None],
            use_cache=False,
            logits_to_keep=logits_indices,
            **{_STEP_KWARG: step},
        )
    return out.logits[0].float()  # type: ignore[no-any-return]


def paged_support(model: Any) -> str | None:
    """Why ``model`` cannot run :func:`paged_forward`, or None when it can: every layer must reach
    transformers' attention interface with a ``layer_idx`` and ``logits_to_keep`` must exist."""
    if not _forward_args(model.__class__).logits_to_keep:
        return f"{type(model).__name__}.forward has no logits_to_keep"
    layers = [m for m in model.modules() if type(m).__name__.endswith("Attention")]
    missing = [type(m).__name__ for m in layers if not isinstance(getattr(m, "layer_idx", None), int)]
    if not layers or missing:
        return f"attention modules without a layer index: {missing or 'none found'}"
    return None


def eos_token_ids(loaded: LoadedModel) -> tuple[int, ...]:
    """End-of-sequence ids from the model's generation config; none for random-weight models (their
    configs name an EOS id, but random weights give it no meaning, so generation runs to max_tokens)."""
    if loaded.model_id in random_weight_names() or loaded.tokenizer is None:
        return ()
    eos = getattr(getattr(loaded.model, "generation_config", None), "eos_token_id", None)
    if eos is None:
        return ()
    return tuple(int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos]))
