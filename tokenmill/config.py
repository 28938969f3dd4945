"""Typed, frozen configuration. Every flag a user can set is validated here, once.

``ModelConfig`` is derived from a Hugging Face ``config.json``-shaped dict (GGUF files are
translated into that shape by the loader), so the model code knows one convention.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field, fields
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
    # longrope (Phi-3 "su"/"longrope"): per-frequency divisors of positions below / from
    # original_max_position_embeddings, and the factor cos and sin are multiplied by
    short_factor: tuple[float, ...] = ()
    long_factor: tuple[float, ...] = ()
    attention_factor: float = 1.0


def _longrope_from_hf(hf: dict[str, Any], params: dict[str, Any], theta: float) -> RopeConfig:
    """Phi-3's longrope: ``original_max_position_embeddings`` may sit in the rope
    parameters or at the config's top level; the attention factor, when not given, is
    sqrt(1 + ln(s) / ln(original)) with s = max_position_embeddings / original (HF's)."""
    original = int(params.get("original_max_position_embeddings")
                   or hf.get("original_max_position_embeddings") or 0)
    short, long = params.get("short_factor"), params.get("long_factor")
    if not original or not short or not long or len(short) != len(long):
        raise ValueError("longrope rope scaling needs short_factor and long_factor of equal "
                         "length and original_max_position_embeddings.")
    factor = params.get("factor") or int(hf.get("max_position_embeddings", original)) / original
    attention = params.get("attention_factor")
    if attention is None:
        attention = math.sqrt(1 + math.log(factor) / math.log(original)) if factor > 1 else 1.0
    return RopeConfig(theta=theta, scaling_type="longrope", factor=float(factor),
                      original_max_position_embeddings=original,
                      short_factor=tuple(float(f) for f in short),
                      long_factor=tuple(float(f) for f in long),
                      attention_factor=float(attention))


def _rope_from_hf(hf: dict[str, Any]) -> RopeConfig:
    params = dict(hf.get("rope_parameters") or {})
    params.update(hf.get("rope_scaling") or {})
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    kind = params.get("rope_type", params.get("type", "default")) or "default"
    if float(params.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))) != 1.0:
        raise ValueError("partial rotary embeddings (partial_rotary_factor < 1) are not "
                         "supported.")
    if kind in ("longrope", "su"):
        return _longrope_from_hf(hf, params, float(theta))
    if kind not in ("default", "linear", "llama3"):
        raise ValueError(f"rope scaling type {kind!r} is not supported (default, linear, llama3, "
                         "longrope).")
    return RopeConfig(
        theta=float(theta),
        scaling_type=kind,
        factor=float(params.get("factor", 1.0)),
        low_freq_factor=float(params.get("low_freq_factor", 1.0)),
        high_freq_factor=float(params.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=int(
            params.get("original_max_position_embeddings", 8192)),
    )


def normalize_text_config(text: dict[str, Any]) -> dict[str, Any]:
    """A multimodal config's ``text_config``, with the keys a saved one may leave at
    their defaults filled in (Gemma 3's)."""
    defaults = {"vocab_size": 262208, "rms_norm_eps": 1e-6, "head_dim": 256,
                "hidden_activation": "gelu_pytorch_tanh", "tie_word_embeddings": True,
                "max_position_embeddings": 131072, "sliding_window": 4096}
    return {**defaults, **text}


_GEMMA = ("Gemma2ForCausalLM", "Gemma3ForCausalLM", "Gemma3ForConditionalGeneration")


def _attention_options(arch: str, hf: dict[str, Any]) -> dict[str, Any]:
    """The sliding-window, soft-capping and rope-per-layer-kind fields of ``ModelConfig``.

    * Mistral: every layer windowed when ``sliding_window`` is set (as transformers does).
    * Gemma 2/3: ``layer_types`` (or, in older configs, every ``sliding_window_pattern``-th
      layer global; Gemma 2 alternates) says which layers are windowed; Gemma 3's windowed
      layers use ``rope_local_base_freq`` (10k) unscaled, its global ones the config's rope
      (``rope_parameters`` may hold one dict per layer kind). Attention is scaled by
      ``query_pre_attn_scalar ** -0.5``; Gemma 2 soft-caps attention and final logits.
    """
    n = int(hf["num_hidden_layers"])
    window = hf.get("sliding_window")
    if arch == "MistralForCausalLM":
        return {"layer_windows": (int(window),) * n} if window else {}
    if arch not in _GEMMA:
        return {}
    types = hf.get("layer_types")
    if not types:
        pattern = 2 if arch == "Gemma2ForCausalLM" else int(hf.get("sliding_window_pattern", 6))
        types = ["full_attention" if (i + 1) % pattern == 0 else "sliding_attention"
                 for i in range(n)]
    if len(types) != n:
        raise ValueError(f"layer_types has {len(types)} entries for {n} layers.")
    out: dict[str, Any] = {
        "layer_windows": tuple(int(window) if t == "sliding_attention" and window else None
                               for t in types),
        "attn_softcap": hf.get("attn_logit_softcapping"),
        "final_softcap": hf.get("final_logit_softcapping"),
        "qk_norm": arch != "Gemma2ForCausalLM",
        "query_scale": float(hf.get("query_pre_attn_scalar") or hf.get("head_dim")
                             or int(hf["hidden_size"]) // int(hf["num_attention_heads"])) ** -0.5,
    }
    params = hf.get("rope_parameters")
    if isinstance(params, dict) and "full_attention" in params:  # one dict per layer kind
        out["rope"] = _rope_from_hf({"rope_parameters": params["full_attention"]})
        out["local_rope"] = _rope_from_hf({"rope_parameters": params["sliding_attention"]})
    elif arch != "Gemma2ForCausalLM":
        out["local_rope"] = RopeConfig(theta=float(hf.get("rope_local_base_freq", 10000.0)))
    return out


@dataclass(frozen=True)
class MoEConfig:
    """A Mixture-of-Experts feed-forward block. Each token's router logits go through a
    softmax over all experts; the ``top_k`` largest probabilities pick its experts and,
    where ``norm_topk_prob``, are rescaled to sum to 1 (Mixtral always, Qwen3-MoE's
    released models; OLMoE and Qwen2-MoE not). The output is the weighted sum of those
    experts' gated MLPs, plus, where ``shared_intermediate_size``, a shared expert scaled
    by sigmoid(its own one-output gate) (Qwen2-MoE). ``dense_layers`` use a plain MLP of
    the model's ``intermediate_size`` (Qwen MoE's ``mlp_only_layers`` and
    ``decoder_sparse_step``)."""

    num_experts: int
    top_k: int
    intermediate_size: int
    norm_topk_prob: bool
    shared_intermediate_size: int = 0
    dense_layers: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if not 1 <= self.top_k <= self.num_experts:
            raise ValueError(f"num_experts_per_tok must be in [1, num_experts = "
                             f"{self.num_experts}], got {self.top_k}.")


_MOE_ARCHS = ("MixtralForCausalLM", "Qwen2MoeForCausalLM", "Qwen3MoeForCausalLM",
              "OlmoeForCausalLM")


def _moe_from_hf(arch: str, hf: dict[str, Any]) -> MoEConfig | None:
    if arch not in _MOE_ARCHS:
        return None
    only = set(hf.get("mlp_only_layers") or ())
    if arch == "MixtralForCausalLM":
        return MoEConfig(num_experts=int(hf["num_local_experts"]),
                         top_k=int(hf["num_experts_per_tok"]),
                         intermediate_size=int(hf["intermediate_size"]), norm_topk_prob=True,
                         dense_layers=tuple(sorted(only)))
    if hf.get("clip_qkv") is not None:
        raise ValueError("clip_qkv (OLMoE) is not supported.")
    step = int(hf.get("decoder_sparse_step") or 1)
    shared = int(hf.get("shared_expert_intermediate_size") or 0)
    return MoEConfig(
        num_experts=int(hf.get("num_experts") or hf["num_local_experts"]),
        top_k=int(hf["num_experts_per_tok"]),
        intermediate_size=int(hf.get("moe_intermediate_size") or hf["intermediate_size"]),
        norm_topk_prob=bool(hf.get("norm_topk_prob", False)),
        shared_intermediate_size=shared if arch == "Qwen2MoeForCausalLM" else 0,
        dense_layers=tuple(i for i in range(int(hf["num_hidden_layers"]))
                           if i in only or (i + 1) % step))


def _no_rope_layers(arch: str, hf: dict[str, Any]) -> tuple[int, ...]:
    """SmolLM3's layers without rope: ``no_rope_layers[i] == 0`` (1 means rope is
    used), else every ``no_rope_layer_interval``-th layer (the 4th, 8th, ...)."""
    if arch != "SmolLM3ForCausalLM":
        return ()
    n = int(hf["num_hidden_layers"])
    flags = hf.get("no_rope_layers")
    if flags is None:
        interval = int(hf.get("no_rope_layer_interval") or 4)
        flags = [int((i + 1) % interval != 0) for i in range(n)]
    if len(flags) != n:
        raise ValueError(f"no_rope_layers has {len(flags)} entries for {n} layers.")
    return tuple(i for i, use_rope in enumerate(flags) if not use_rope)


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
    moe: MoEConfig | None = None  # Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE
    no_rope_layers: tuple[int, ...] = ()  # SmolLM3: layers whose attention has no rope
    # Sliding-window attention: per layer, how many of the most recent positions a query
    # attends to (itself included), None for a layer with full attention; () = none.
    layer_windows: tuple[int | None, ...] = ()
    local_rope: RopeConfig | None = None  # rope of the windowed layers, where it differs
    attn_softcap: float | None = None     # logits -> cap * tanh(logits / cap) (Gemma 2)
    final_softcap: float | None = None    # the same on the LM head's output
    query_scale: float | None = None      # attention scale; None: head_dim ** -0.5

    def window(self, layer: int) -> int | None:
        """The sliding window of layer ``layer``, None for full attention."""
        return self.layer_windows[layer] if self.layer_windows else None

    @property
    def uniform_window(self) -> int | None:
        """The window when EVERY layer is windowed (Mistral): older KV is never read
        again by any layer. None when some layer needs the whole history."""
        ws = self.layer_windows
        if not ws or any(w is None for w in ws):
            return None
        return max(ws)

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> ModelConfig:
        archs = hf.get("architectures") or []
        if not archs:
            raise ValueError("config.json has no 'architectures' entry; cannot pick a model.")
        arch = archs[0]
        if arch == "Gemma3ForConditionalGeneration":  # the text model inside it
            hf = {**normalize_text_config(hf["text_config"]), "architectures": [arch]}
        options = _attention_options(arch, hf)
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
            rope=options.pop("rope", None) or _rope_from_hf(hf),
            max_position_embeddings=int(hf.get("max_position_embeddings", 4096)),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            # Qwen2 always has q/k/v biases; Llama-family configs say so with attention_bias.
            qkv_bias=arch in ("Qwen2ForCausalLM", "Qwen2MoeForCausalLM")
            or bool(hf.get("attention_bias", False)),
            # OLMoE's q/k norms span all heads at once (tokenmill.models.moe)
            qk_norm=arch in ("Qwen3ForCausalLM", "Qwen3MoeForCausalLM", "OlmoeForCausalLM")
            or options.pop("qk_norm", False),
            hidden_act=hf.get("hidden_activation") or hf.get("hidden_act", "silu"),
            bos_token_id=hf.get("bos_token_id"),
            eos_token_ids=eos_ids,
            moe=_moe_from_hf(arch, hf),
            no_rope_layers=_no_rope_layers(arch, hf),
            **options,
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
class SpeculativeConfig:
    """Speculative decoding, parsed from vLLM's ``--speculative-config`` JSON shape.

    ``method``: "ngram" (prompt lookup: the longest n-gram, ``prompt_lookup_max`` down to
    ``prompt_lookup_min`` tokens, that ends the sequence and occurred earlier in its prompt
    or output proposes what followed it) or "suffix" (a suffix trie over the request and
    a bounded cache of recent outputs proposes a variable-length continuation by
    frequency) or "draft_model" (``model``: a small model sharing the target's vocabulary
    runs ahead greedily with its own paged KV). ``num_speculative_tokens``: the most
    tokens proposed per step.
    ``max_batch_rows``: proposals are skipped in a step whose running decodes times
    ``num_speculative_tokens + 1`` exceed it (a full batch is already compute-bound).
    ``min_acceptance``: a request whose recent acceptance rate falls below it stops
    proposing, re-probing every ``probe_interval`` steps."""

    method: str
    num_speculative_tokens: int
    model: str | None = None           # draft_model: the draft's checkpoint
    prompt_lookup_min: int = 2
    prompt_lookup_max: int = 4
    suffix_cache_size: int = 32        # suffix: recent outputs of all requests kept
    suffix_min_probability: float = 0.1  # suffix: stop a proposal below this frequency
    max_batch_rows: int = 64
    min_acceptance: float = 0.2
    probe_interval: int = 16

    METHODS = ("ngram", "suffix", "draft_model")

    @classmethod
    def parse(cls, value: str | dict | None) -> SpeculativeConfig | None:
        """A JSON string or dict; None (or "") is off. Raises ValueError naming what is
        wrong: bad JSON, an unknown method or key, or a value out of range."""
        if value is None or value == "":
            return None
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as e:
                raise ValueError(f"speculative_config is not valid JSON: {e}") from None
        if not isinstance(value, dict):
            raise ValueError("speculative_config must be a JSON object.")
        value = dict(value)
        method = value.pop("method", None)
        if method not in cls.METHODS:
            raise ValueError(f"speculative_config method must be one of {cls.METHODS}, "
                             f"got {method!r}.")
        known = {f.name for f in fields(cls)} - {"method"}
        unknown = set(value) - known
        if unknown:
            raise ValueError(f"unknown speculative_config keys: {sorted(unknown)}.")
        if "num_speculative_tokens" not in value:
            raise ValueError("speculative_config needs num_speculative_tokens.")
        cfg = cls(method=method, **value)
        if (method == "draft_model") != isinstance(cfg.model, str):
            raise ValueError("speculative_config model (a checkpoint path) is required for "
                             "method draft_model, and only for it.")
        ints = ("num_speculative_tokens", "prompt_lookup_min", "prompt_lookup_max",
                "suffix_cache_size", "max_batch_rows", "probe_interval")
        for name in ints:
            v = getattr(cfg, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"speculative_config {name} must be an integer >= 1, "
                                 f"got {v!r}.")
        if cfg.prompt_lookup_min > cfg.prompt_lookup_max:
            raise ValueError("speculative_config prompt_lookup_min must not exceed "
                             "prompt_lookup_max.")
        for name in ("min_acceptance", "suffix_min_probability"):
            v = getattr(cfg, name)
            if not isinstance(v, int | float) or not 0 <= v <= 1:
                raise ValueError(f"speculative_config {name} must be in [0, 1], got {v!r}.")
        return cfg


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
    speculative: SpeculativeConfig | None = None  # speculative decoding; None: off

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
            speculative=SpeculativeConfig.parse(args.speculative_config),
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
