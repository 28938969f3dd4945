"""Typed, frozen configuration. Every flag a user can set is validated here, once.

``ModelConfig`` is derived from a Hugging Face ``config.json``-shaped dict (GGUF files are
translated into that shape by the loader), so the model code knows one convention.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import torch

from tokenmill.engine_args import EngineArgs

_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
}


def parse_dtype(name: str | torch.dtype, device: str) -> torch.dtype:
    """"auto" is float32 on CPU (fast fp32 GEMMs, exact parity with transformers)."""
    if isinstance(name, torch.dtype):
        return name
    if name == "auto":
        return torch.float32 if device == "cpu" else torch.bfloat16
    if name not in _DTYPES:
        raise ValueError(f"dtype must be one of auto, {', '.join(_DTYPES)}; got {name!r}.")
    return _DTYPES[name]


def parse_kv_cache_dtype(name: str, model: str, model_dtype: torch.dtype, device: str,
                         quantization: str) -> torch.dtype:
    """"auto": float16 where the weights stay packed on the CPU: a GGUF checkpoint (what
    llama.cpp, where such files come from, keeps its cache in; the CPU attention kernel
    then fetches half the bytes) or a float checkpoint quantized at load
    (``--quantization q8_0|q4_0|q4_k``); else the model's dtype. "float16" and "float32"
    are for the CPU."""
    if name == "auto":
        packed = ((quantization == "auto" and model.endswith(".gguf"))
                  or quantization in QUANTIZE_AT_LOAD)
        if device == "cpu" and packed and model_dtype == torch.float32:
            from tokenmill.kernels.cpu import kernels

            if kernels() is not None:  # else the weights are dequantized at load
                return torch.float16
        return model_dtype
    if name not in ("float16", "float32"):
        raise ValueError(f"kv_cache_dtype must be auto, float16 or float32; got {name!r}.")
    if device != "cpu":
        raise ValueError("kv_cache_dtype float16/float32 is for the CPU; on a GPU the cache "
                         "keeps the model's dtype (use auto).")
    return _DTYPES[name]


# --quantization values that quantize a float (Hugging Face) checkpoint at load
QUANTIZE_AT_LOAD = ("q8_0", "q4_0", "q4_k")
QUANTIZATIONS = ("auto", "none", *QUANTIZE_AT_LOAD)


def check_quantization(quantization: str, model: str, device: str, load_format: str) -> None:
    """Refuses a --quantization that does not apply, saying what to do instead."""
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"quantization must be one of {', '.join(QUANTIZATIONS)}; got "
                         f"{quantization!r}.")
    if quantization not in QUANTIZE_AT_LOAD:
        return
    flag = f"--quantization {quantization}"
    if model.lower().endswith(".gguf"):
        raise ValueError(
            f"{flag} quantizes a Hugging Face safetensors folder at load; {model} is a GGUF "
            "file, already quantized: use --quantization auto (its quantized matrices run "
            "packed as stored) or none (dequantized to float), or requantize it with "
            "llama.cpp's llama-quantize.")
    if device != "cpu":
        raise ValueError(f"{flag} makes weights for the CPU kernels; on {device} use "
                         "--quantization auto.")
    if load_format == "dummy":
        raise ValueError(f"{flag} quantizes weights read from the checkpoint; "
                         "--load-format dummy has none (drop one of the two).")


def parse_kv_cache_memory(text: str | int) -> int | None:
    """"auto" -> None (the engine sizes the pool from free memory), else bytes."""
    if isinstance(text, str) and text.strip().lower() == "auto":
        return None
    return parse_size(text)


_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b?)\s*$", re.IGNORECASE)


def parse_size(text: str | int) -> int:
    """Parses "2GiB", "512MiB", "1.5G", "1000000" into bytes (K/M/G/T are powers of 1024)."""
    if isinstance(text, int):
        return text
    m = _SIZE_RE.match(text)
    if not m:
        raise ValueError(f"cannot read a memory size from {text!r}; use e.g. 2GiB or 512MiB.")
    value, unit = float(m.group(1)), m.group(2).lower()
    return int(value * 1024 ** " kmgt".index(unit or " "))


@dataclass(frozen=True)
class RopeConfig:
    theta: float = 10000.0
    scaling_type: str = "default"  # default | linear | llama3
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


def _rope_from_hf(hf: dict[str, Any]) -> RopeConfig:
    params = dict(hf.get("rope_parameters") or {})
    params.update(hf.get("rope_scaling") or {})
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    kind = params.get("rope_type", params.get("type", "default")) or "default"
    if kind not in ("default", "linear", "llama3"):
        raise ValueError(f"rope scaling type {kind!r} is not supported (default, linear, llama3).")
    return RopeConfig(
        theta=float(theta),
        scaling_type=kind,
        factor=float(params.get("factor", 1.0)),
        low_freq_factor=float(params.get("low_freq_factor", 1.0)),
        high_freq_factor=float(params.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=int(
            params.get("original_max_position_embeddings", 8192)),
    )


@dataclass(frozen=True)
class ModelConfig:
    """The shapes and options of a decoder-only transformer."""

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope: RopeConfig
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool = False
    qk_norm: bool = False
    hidden_act: str = "silu"
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> ModelConfig:
        archs = hf.get("architectures") or []
        if not archs:
            raise ValueError("config.json has no 'architectures' entry; cannot pick a model.")
        arch = archs[0]
        heads = int(hf["num_attention_heads"])
        eos = hf.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ())
        return cls(
            architecture=arch,
            vocab_size=int(hf["vocab_size"]),
            hidden_size=int(hf["hidden_size"]),
            intermediate_size=int(hf["intermediate_size"]),
            num_layers=int(hf["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=int(hf.get("num_key_value_heads") or heads),
            head_dim=int(hf.get("head_dim") or hf["hidden_size"] // heads),
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            rope=_rope_from_hf(hf),
            max_position_embeddings=int(hf.get("max_position_embeddings", 4096)),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            # Qwen2 always has q/k/v biases; Llama-family configs say so with attention_bias.
            qkv_bias=arch == "Qwen2ForCausalLM" or bool(hf.get("attention_bias", False)),
            qk_norm=arch == "Qwen3ForCausalLM",
            hidden_act=hf.get("hidden_act", "silu"),
            bos_token_id=hf.get("bos_token_id"),
            eos_token_ids=eos_ids,
        )

    def kv_bytes_per_token(self, dtype: torch.dtype) -> int:
        elem = torch.tensor([], dtype=dtype).element_size()
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * elem


@dataclass(frozen=True)
class CacheConfig:
    """The paged KV pool. ``kv_cache_memory`` None ("auto") sizes it from the memory
    left once the model is loaded (``tokenmill.engine.kv_pool_sizing``)."""

    block_size: int = 16
    kv_cache_memory: int | None = None
    enable_prefix_caching: bool = True
    dtype: torch.dtype | None = None  # of the K/V entries; None: the model's dtype
    # the auto size never goes past what max_num_seqs requests of max_model_len tokens
    # (the model's context when None) can use; the scheduler's flags, copied here
    max_num_seqs: int = 128
    max_model_len: int | None = None

    def __post_init__(self) -> None:
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two, got {self.block_size}.")
        if self.kv_cache_memory is not None and self.kv_cache_memory <= 0:
            raise ValueError(f"kv_cache_memory must be positive, got {self.kv_cache_memory}.")


@dataclass(frozen=True)
class SchedulerConfig:
    """Token budget per step and how many requests may run at once.

    ``max_model_len`` of None means: the model's context length, capped by what the KV
    pool can hold (resolved by the engine once the pool is sized)."""

    max_num_batched_tokens: int = 512
    max_num_seqs: int = 128
    max_model_len: int | None = None
    enable_chunked_prefill: bool = True
    scheduling_policy: str = "fcfs"  # fcfs | lpm (longest cached prefix first)

    def __post_init__(self) -> None:
        if self.scheduling_policy not in ("fcfs", "lpm"):
            raise ValueError(f"scheduling_policy must be fcfs or lpm, got "
                             f"{self.scheduling_policy!r}.")
        if self.max_num_batched_tokens < 1:
            raise ValueError("max_num_batched_tokens must be >= 1.")
        if self.max_num_seqs < 1:
            raise ValueError("max_num_seqs must be >= 1.")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError("max_model_len must be >= 2.")


@dataclass(frozen=True)
class EngineConfig:
    """Everything the engine needs to start, checked and typed; built from ``EngineArgs``."""

    model: str
    tokenizer: str
    dtype: torch.dtype
    device: str
    load_format: str
    seed: int
    skip_tokenizer_init: bool = False
    # "auto": GGUF matrices in the types the CPU kernels read stay packed (C kernels
    # multiply them); "none": every weight is dequantized to ``dtype`` at load;
    # "q8_0" | "q4_0" | "q4_k": a float checkpoint's linear weights are quantized at load
    quantization: str = "auto"
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)

    @classmethod
    def create(cls, **flags: Any) -> EngineConfig:
        """``from_args(EngineArgs(**flags))``: the flags by their names."""
        return cls.from_args(EngineArgs(**flags))

    @classmethod
    def from_args(cls, args: EngineArgs) -> EngineConfig:
        """Checks every flag and builds the typed configs. ``args.model`` must be set (the
        entry points put the embedded default model there when none is named)."""
        if args.model is None:
            raise ValueError("no model given.")
        if args.load_format not in ("auto", "dummy"):
            raise ValueError(f"load_format must be 'auto' or 'dummy', got "
                             f"{args.load_format!r}.")
        device = args.device
        if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
            raise ValueError(f"device must be cpu or cuda, got {device!r}.")
        check_quantization(args.quantization, args.model, device, args.load_format)
        check_scale_out(args)
        model_dtype = parse_dtype(args.dtype, device)
        return cls(
            model=args.model,
            tokenizer=args.tokenizer or args.model,
            dtype=model_dtype,
            device=device,
            load_format=args.load_format,
            seed=args.seed,
            skip_tokenizer_init=args.skip_tokenizer_init,
            quantization=args.quantization,
            cache=CacheConfig(
                block_size=args.block_size,
                kv_cache_memory=parse_kv_cache_memory(args.kv_cache_memory),
                enable_prefix_caching=args.enable_prefix_caching,
                dtype=parse_kv_cache_dtype(args.kv_cache_dtype, args.model, model_dtype,
                                           device, args.quantization),
                max_num_seqs=args.max_num_seqs, max_model_len=args.max_model_len),
            scheduler=SchedulerConfig(
                max_num_batched_tokens=args.max_num_batched_tokens,
                max_num_seqs=args.max_num_seqs,
                max_model_len=args.max_model_len,
                enable_chunked_prefill=args.enable_chunked_prefill,
                scheduling_policy=args.scheduling_policy,
            ),
        )


def check_scale_out(args: EngineArgs) -> None:
    """One engine is one process: replicas are ``tokenmill serve``'s (tokenmill.replicas,
    which builds each replica with data_parallel_size=1)."""
    if args.data_parallel_size < 1:
        raise ValueError(f"data_parallel_size must be >= 1, got {args.data_parallel_size}.")
    if args.tensor_parallel_size < 1:
        raise ValueError(f"tensor_parallel_size must be >= 1, got "
                         f"{args.tensor_parallel_size}.")
    if args.tensor_parallel_size > 1:
        raise ValueError("tensor_parallel_size > 1 runs a group of processes behind a "
                         "server: use `tokenmill serve --tensor-parallel-size N`.")
    if args.data_parallel_size > 1:
        raise ValueError("data_parallel_size > 1 runs replicas behind a server: use "
                         "`tokenmill serve --data-parallel-size N`.")
