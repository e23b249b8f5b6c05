"""The one module that imports ``transformers``: models, tokenizers and the model's KV cache object.

- :func:`load_model` builds a random-weight model from a config (``tiny``, ``tiny-llama``,
  ``tiny-qwen2``, ``tiny-mistral``, ``tiny-gpt2``, ``tiny-phi``, ``small-qwen2``,
  ``qwen2.5-7b-shape``: real code paths, no download) or loads a name or local path with
  ``from_pretrained`` from local files only.
- :func:`new_cache` / :func:`read_cache` convert between the contiguous KV layout the block kernels
  produce, ``[num_layers, 2, kv_heads, seq, head_dim]``, and the model's cache object, for both the
  transformers 4.5x legacy helpers (``DynamicCache.from_legacy_cache``, ``key_cache``) and the 5.x
  Cache API (``cache.layers[i].keys``). A transformers upgrade is this file's problem only.
- :func:`forward` runs the model on new tokens at explicit positions after whatever the cache holds.

Not here: which blocks are cached or where they live (``manager``, ``engine``), block copies
(``kvcache.kernels``).
"""

from __future__ import annotations

import functools
import inspect
import os
from dataclasses import dataclass
from typing import Any

import torch
import transformers
from huggingface_hub import try_to_load_from_cache
from transformers import AutoConfig, AutoTokenizer, DynamicCache

from kvcache.errors import ConfigError, ModelError

# Untyped entry points of transformers, named once so the rest of the module type-checks.
_AutoModel: Any = transformers.AutoModelForCausalLM

TRANSFORMERS_MAJOR = int(transformers.__version__.split(".")[0])

TINY_FAMILIES = ("llama", "qwen2", "mistral", "gpt2", "phi")
_ALIASES = {"tiny": "llama"}
SMALL_QWEN2 = "small-qwen2"  # a few million parameters: CPU benchmarks where the model dominates
QWEN25_7B_SHAPE = "qwen2.5-7b-shape"  # random weights with Qwen2.5-7B's shape, for GPU benchmarks


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


def tiny_model_names() -> list[str]:
    return ["tiny", *(f"tiny-{f}" for f in TINY_FAMILIES), SMALL_QWEN2, QWEN25_7B_SHAPE]


def tiny_config(name: str) -> Any:
    """The config behind a random-weight model name (see :func:`tiny_model_names`)."""
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
    raise ModelError(f"no tiny config named {name!r}; choose one of {', '.join(tiny_model_names())}")


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
) -> LoadedModel:
    """A model in eval mode on ``device`` (CUDA when present, else CPU) in ``dtype`` (bf16 on CUDA,
    float32 on CPU by default). Random-weight names are seeded by ``seed``."""
    dev = _device(device)
    dt = dtype if dtype is not None else (torch.bfloat16 if dev.type == "cuda" else torch.float32)
    tokenizer = None
    if name_or_path in tiny_model_names():
        torch.manual_seed(seed)
        with torch.device(dev):
            model = _from_config(tiny_config(name_or_path), dt)
        model_id = "tiny-llama" if name_or_path == "tiny" else name_or_path
    else:
        model = _from_pretrained(name_or_path, dev, dt)
        tokenizer = load_tokenizer(name_or_path)
        model_id = name_or_path
    model.eval()
    return LoadedModel(model, tokenizer, _probe_shape(model, dev), model_id, dev, dt)


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
            f"its path, or use a random-weight model: {', '.join(tiny_model_names())}"
        ) from exc
    model: Any = _AutoModel.from_pretrained(
        name_or_path, local_files_only=True, attn_implementation="sdpa", **{dtype_kw: dtype}
    )
    return model.to(device)


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def load_tokenizer(name_or_path: str) -> Any | None:
    """The tokenizer stored with a model, or None (random-weight models and checkpoints saved
    without one: transformers would otherwise build an empty tokenizer from the config)."""
    if name_or_path in tiny_model_names():
        return None
    if os.path.isdir(name_or_path):
        stored = any(os.path.exists(os.path.join(name_or_path, f)) for f in _TOKENIZER_FILES)
    else:
        stored = any(isinstance(try_to_load_from_cache(name_or_path, f), str) for f in _TOKENIZER_FILES)
    if not stored:
        return None
    try:
        return AutoTokenizer.from_pretrained(name_or_path, local_files_only=True)
    except (OSError, ValueError):
        return None


@torch.inference_mode()
def _probe_shape(model: Any, device: torch.device) -> KVShape:
    """Read the KV geometry off one real forward, so every family reports it the same way."""
    cache = new_cache(None)
    ids = torch.zeros((1, 1), dtype=torch.long, device=device)
    logits = forward(model, ids, cache, 0)
    kv = read_cache(cache, 0, 1)  # [L, 2, H, 1, D]
    return KVShape(kv.shape[0], kv.shape[2], kv.shape[4], logits.shape[-1])


# ---- the cache object ------------------------------------------------------------------------


def new_cache(kv: torch.Tensor | None) -> Any:
    """A cache object holding ``kv`` ``[num_layers, 2, kv_heads, seq, head_dim]`` (batch 1), or an
    empty one. Layer tensors are views of ``kv``: no copy beyond the gather that produced it.

    Layers are full-attention even for sliding-window models: the model's mask still applies the
    window, and the whole prefix stays readable for the pool.
    """
    if kv is None:
        return DynamicCache()
    return _cache_from_pairs([(kv[i, 0].unsqueeze(0), kv[i, 1].unsqueeze(0)) for i in range(kv.shape[0])])


def _cache_from_pairs(pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> Any:
    if hasattr(DynamicCache, "from_legacy_cache"):  # transformers 4.5x
        return DynamicCache.from_legacy_cache(tuple(pairs))
    cache = DynamicCache()
    for layer_idx, (k, v) in enumerate(pairs):
        # Set the layer's tensors directly: ``update`` would concatenate onto an empty tensor,
        # copying the whole prefix a second time.
        cache.update(k[:, :, :0], v[:, :, :0], layer_idx)
        layer: Any = cache.layers[layer_idx]
        layer.keys, layer.values = k, v
    return cache


def cache_layers(cache: Any) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per-layer ``(keys, values)``, each ``[batch, kv_heads, seq, head_dim]``."""
    if hasattr(cache, "layers"):  # transformers >= 4.56
        layers: list[Any] = list(cache.layers)
        return [(layer.keys, layer.values) for layer in layers]
    return list(zip(cache.key_cache, cache.value_cache, strict=True))


def cache_length(cache: Any) -> int:
    return int(cache.get_seq_length())


def read_cache(cache: Any, start: int, end: int, batch_index: int = 0) -> torch.Tensor:
    """Positions ``start:end`` of one sequence as ``[num_layers, 2, kv_heads, end - start, head_dim]``."""
    layers = cache_layers(cache)
    return torch.stack(
        [torch.stack((k[batch_index, :, start:end], v[batch_index, :, start:end])) for k, v in layers]
    )


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
        past = cache.to_legacy_cache() if cache_length(cache) else None
        out = model(
            input_ids=input_ids, position_ids=positions, past_key_values=past, use_cache=True, **kwargs
        )
        cache.key_cache = [k for k, _ in out.past_key_values]
        cache.value_cache = [v for _, v in out.past_key_values]
    else:
        kwargs[args.cache_kwarg] = cache
        out = model(input_ids=input_ids, position_ids=positions, use_cache=True, **kwargs)
    return out.logits[:, -1].float()  # type: ignore[no-any-return]


def batch_cache(kv: torch.Tensor, batch: int) -> Any:
    """A cache holding the same ``kv`` ``[L, 2, H, seq, D]`` for ``batch`` sequences (calibration)."""
    expanded = kv.unsqueeze(2).expand(-1, -1, batch, -1, -1, -1).contiguous()  # [L, 2, B, H, seq, D]
    return _cache_from_pairs([(expanded[layer, 0], expanded[layer, 1]) for layer in range(kv.shape[0])])
