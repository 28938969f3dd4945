"""Present a llama.cpp GGUF file as a Hugging Face checkpoint.

The header is parsed by ``tokenmill.gguf.reader`` and the tensors are dequantized by
``tokenmill.gguf.dequant``. Each tensor's bytes are memory-mapped on their own (a private,
copy-on-write mapping of its pages) as the reader reaches it: a matrix the model keeps
packed as stored stays a view of the file (its pages shared with the page cache, read
when first used), and one it converts or copies is unmapped once dropped. So loading a
GGUF needs about the memory of what the model keeps, not a copy of the file. A tensor of
a type tokenmill cannot run is refused when the file is opened, by name and type. Four
translations make a GGUF look like an HF checkpoint:

1. Metadata -> ``config.json`` keys (``_hf_config``).
2. Tensor names ``blk.N.attn_q.weight`` -> ``model.layers.N.self_attn.q_proj.weight``.
3. Layout: ``dims`` list the fastest-varying axis first, so GGUF ``[in, out]`` is the
   row-major HF ``[out, in]``. For ``llama`` files the converter also permuted the rows of
   Q and K (see ``_unpermute_rope``); we undo that.
4. Llama 3.x rope scaling, which the converter bakes into a ``rope_freqs.weight`` tensor,
   becomes HF ``rope_scaling`` again (``_llama3_rope_scaling``); so do Phi-3's longrope
   factor tensors (``_more_config``).

A Mixture-of-Experts file merges each layer's experts into one 3-D tensor per matrix
(``ffn_{gate,up,down}_exps``, ``[experts, rows, cols]``); it is yielded as one HF-named
matrix per expert (``mlp.experts.E.*_proj``), packed ones as row ranges of the mapped
file (``_expert_slices``).
"""

from __future__ import annotations

import contextlib
import mmap
import os
import re
from collections.abc import Iterator
from typing import Any

import torch

from tokenmill.config import RopeConfig
from tokenmill.gguf.dequant import can_dequantize, dequantize
from tokenmill.gguf.quant_types import PACKED_BLOCKS, QuantizedTensor
from tokenmill.gguf.reader import GGUFFile, GGUFTensorInfo, read_gguf
from tokenmill.layers.rotary import inverse_frequencies
from tokenmill.loader.checkpoint import Checkpoint, normalize_hf_config
from tokenmill.loader.gguf_encoder import GGUF_ENCODERS, open_gguf_encoder

# Phi-3, SmolLM3 and the Mixture-of-Experts families: general.architecture ->
# ((HF architectures entry, model_type, Q/K rows permuted?), whether the experts'
# top-k probabilities are renormalized, as llama.cpp's graph for the arch does).
# A "llama" file with an expert count is Mixtral (see _more_config).
_MORE_ARCHITECTURES = {
    "phi3": (("Phi3ForCausalLM", "phi3", False), None),
    "smollm3": (("SmolLM3ForCausalLM", "smollm3", True), None),
    "qwen2moe": (("Qwen2MoeForCausalLM", "qwen2_moe", False), False),
    "qwen3moe": (("Qwen3MoeForCausalLM", "qwen3_moe", False), True),
    "olmoe": (("OlmoeForCausalLM", "olmoe", False), False),
}
# general.architecture -> (HF architectures entry, model_type, Q/K rows permuted?)
_ARCHITECTURES = {
    "llama": ("LlamaForCausalLM", "llama", True),
    # llama.cpp has no plain "mistral" arch today (Mistral converts as "llama"); if a
    # file says "mistral" it came through the same Llama converter, so it is permuted.
    "mistral": ("MistralForCausalLM", "mistral", True),
    "qwen2": ("Qwen2ForCausalLM", "qwen2", False),
    "qwen3": ("Qwen3ForCausalLM", "qwen3", False),
    **{arch: entry for arch, (entry, _) in _MORE_ARCHITECTURES.items()},
    "gemma2": ("Gemma2ForCausalLM", "gemma2", False),
    "gemma3": ("Gemma3ForCausalLM", "gemma3_text", False),
}
_GEMMA_ARCHS = ("gemma2", "gemma3")
# Gemma's four norms a layer: ffn_norm is the one before the MLP, not after attention
_GEMMA_BLOCK_NAMES = {
    "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
}
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLOCK_NAMES = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
    # Phi-3's fused q/k/v (its ffn_up is the fused gate_up: _ARCH_BLOCK_NAMES)
    "attn_qkv": "self_attn.qkv_proj",
    # Mixture-of-Experts: the router, the experts' merged 3-D tensors (one expert per
    # slice of the outer axis, yielded one by one as mlp.experts.E.*: EXPERT below) and
    # Qwen2-MoE's shared expert with its one-output sigmoid gate
    "ffn_gate_inp": "mlp.gate",
    "ffn_gate_exps": "mlp.experts.{expert}.gate_proj",
    "ffn_up_exps": "mlp.experts.{expert}.up_proj",
    "ffn_down_exps": "mlp.experts.{expert}.down_proj",
    "ffn_gate_shexp": "mlp.shared_expert.gate_proj",
    "ffn_up_shexp": "mlp.shared_expert.up_proj",
    "ffn_down_shexp": "mlp.shared_expert.down_proj",
    "ffn_gate_inp_shexp": "mlp.shared_expert_gate",
}
_ARCH_BLOCK_NAMES = {"phi3": {"ffn_up": "mlp.gate_up_proj"}}
EXPERT = "{expert}"
_BLOCK_RE = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")
# Not weights: rope_freqs.weight is Llama 3.x rope scaling, turned back into the config's
# rope_scaling (see _llama3_rope_scaling); attn_rot_embd holds precomputed rope tables in
# some old files, never used by llama.cpp.
# rope_factors_{long,short}.weight are Phi-3's longrope factors, turned back into its
# rope_scaling (_more_config).
_SKIPPED = re.compile(r"rope_freqs\.weight|blk\.\d+\.attn_rot_embd\.weight"
                      r"|(blk\.\d+\.)?rope_factors_(long|short)\.weight")


def hf_tensor_name(gguf_name: str, arch: str | None = None) -> str | None:
    """Map a GGUF tensor name to its HF name; None for tensors we deliberately skip. An
    expert tensor's name holds ``{expert}`` (``EXPERT``), one name per expert."""
    if arch in _GEMMA_ARCHS:
        m = _BLOCK_RE.fullmatch(gguf_name)
        if m is not None and m.group(2) in _GEMMA_BLOCK_NAMES:
            return f"model.layers.{m.group(1)}.{_GEMMA_BLOCK_NAMES[m.group(2)]}.{m.group(3)}"
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    if _SKIPPED.fullmatch(gguf_name):
        return None
    m = _BLOCK_RE.fullmatch(gguf_name)
    names = {**_BLOCK_NAMES, **_ARCH_BLOCK_NAMES.get(arch, {})}
    if m is None or m.group(2) not in names:
        raise ValueError(
            f"GGUF tensor {gguf_name!r} has no Hugging Face equivalent in tokenmill's "
            "mapping; this model variant is not supported."
        )
    return f"model.layers.{m.group(1)}.{names[m.group(2)]}.{m.group(3)}"


def _unpermute_rope(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's Q/K row permutation for ``llama`` GGUFs.

    HF's rotary embedding rotates dimension ``i`` of a head with dimension ``i + d/2``
    (halves); ggml's rope rotates adjacent pairs ``(2i, 2i+1)``. The converter therefore
    reorders each head's ``d`` output rows from ``[0..d/2) ++ [d/2..d)`` to interleaved
    ``0, d/2, 1, d/2+1, ...`` via ``reshape(heads, 2, d/2, ...).swapaxes(1, 2)``. The
    inverse reads the rows as ``(heads, d/2, 2)`` and swaps back. Works for biases too.
    """
    rows = w.shape[0]
    if rows % n_heads or (rows // n_heads) % 2:
        raise ValueError(f"Cannot split {rows} Q/K rows into {n_heads} heads of even size; "
                         "the GGUF head counts do not match its tensors.")
    head_dim = rows // n_heads
    return w.reshape(n_heads, head_dim // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _hf_config(header: GGUFFile, arch: str, shapes: dict[str, tuple[int, ...]],
               rope_freqs: torch.Tensor | None = None,
               rope_factors: dict[str, torch.Tensor] | None = None) -> dict[str, Any]:
    """Build a ``config.json``-shaped dict from ``{arch}.*`` and ``tokenizer.ggml.*`` keys.

    ``shapes`` (HF name -> shape) settles what metadata may omit: biases, tied embeddings,
    and the vocabulary size (the embedding's rows; the token list can be shorter).
    ``rope_freqs`` is the file's ``rope_freqs.weight`` tensor, if it has one;
    ``rope_factors`` its ``rope_factors_{long,short}.weight`` (Phi-3), by kind.
    """
    meta = header.metadata

    def key(name: str, default: Any = None) -> Any:
        value = meta.get(f"{arch}.{name}", default)
        if value is None:
            raise ValueError(f"{header.path} lacks metadata key '{arch}.{name}'.")
        return value

    hidden, heads = int(key("embedding_length")), int(key("attention.head_count"))
    embed = shapes.get("model.embed_tokens.weight")
    vocab = meta.get(f"{arch}.vocab_size", embed[0] if embed else None)
    if vocab is None:
        raise ValueError(f"{header.path} has no '{arch}.vocab_size' and no token_embd tensor.")
    head_dim = meta.get(f"{arch}.attention.key_length")
    if head_dim is None and _ARCHITECTURES[arch][2]:  # llama: rope dims == head dim
        head_dim = meta.get(f"{arch}.rope.dimension_count")
    head_dim = int(head_dim) if head_dim is not None else hidden // heads
    theta = float(key("rope.freq_base", 10000.0))
    if rope_freqs is None:
        rope_scaling = _rope_scaling(meta, arch)
    else:
        rope_scaling = _llama3_rope_scaling(header, arch, rope_freqs, theta, head_dim)
    hf_arch, model_type, _ = _ARCHITECTURES[arch]
    config: dict[str, Any] = {
        "architectures": [hf_arch],
        "model_type": model_type,
        "hidden_size": hidden,
        "intermediate_size": int(key("feed_forward_length")),
        "num_hidden_layers": int(key("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(key("attention.head_count_kv", heads)),
        "head_dim": head_dim,
        "rms_norm_eps": float(key("attention.layer_norm_rms_epsilon")),
        "rope_theta": theta,
        "max_position_embeddings": int(key("context_length")),
        "vocab_size": int(vocab),
        "hidden_act": "silu",
        "attention_bias": "model.layers.0.self_attn.q_proj.bias" in shapes,
        "mlp_bias": False,
        "tie_word_embeddings": "lm_head.weight" not in shapes,
        "rope_scaling": rope_scaling,
        "torch_dtype": "float32",
    }
    config.update(_more_config(header, arch, shapes, rope_factors or {}))
    for ours in ("bos", "eos", "pad", "unk"):
        if f"tokenizer.ggml.{ours}_token_id" in meta:
            config[f"{ours}_token_id"] = int(meta[f"tokenizer.ggml.{ours}_token_id"])
    if arch in _GEMMA_ARCHS:
        config.update(_gemma_config(meta, arch, config))
    return normalize_hf_config(config)


def _more_config(header: GGUFFile, arch: str, shapes: dict[str, tuple[int, ...]],
                 rope_factors: dict[str, torch.Tensor]) -> dict[str, Any]:
    """The config keys of Phi-3, SmolLM3 and the Mixture-of-Experts families: the expert
    counts and sizes; the layers without a router (a plain MLP); whether top-k
    probabilities are renormalized (llama.cpp's choice for the arch unless
    ``{arch}.expert_weights_norm`` says); Phi-3's longrope from its factor tensors;
    SmolLM3's rope-less every fourth layer (llama.cpp's fixed step)."""
    meta, out = header.metadata, {}
    experts = int(meta.get(f"{arch}.expert_count") or 0)
    if experts:
        used = meta.get(f"{arch}.expert_used_count")
        if used is None:
            raise ValueError(f"{header.path} lacks metadata key '{arch}.expert_used_count'.")
        out["num_experts_per_tok"] = int(used)
        out["mlp_only_layers"] = [i for i in range(int(meta[f"{arch}.block_count"]))
                                  if f"model.layers.{i}.mlp.gate.weight" not in shapes]
    if arch == "llama" and experts:
        out.update(architectures=["MixtralForCausalLM"], model_type="mixtral",
                   num_local_experts=experts)
    elif arch in ("qwen2moe", "qwen3moe", "olmoe"):
        ffn = meta.get(f"{arch}.expert_feed_forward_length",
                       meta.get(f"{arch}.feed_forward_length"))
        norm = meta.get(f"{arch}.expert_weights_norm", _MORE_ARCHITECTURES[arch][1])
        out.update(num_experts=experts, moe_intermediate_size=int(ffn),
                   norm_topk_prob=bool(norm),
                   shared_expert_intermediate_size=int(
                       meta.get(f"{arch}.expert_shared_feed_forward_length") or 0))
    if arch == "phi3" and rope_factors:
        if set(rope_factors) != {"long", "short"}:
            raise ValueError(f"{header.path} has rope_factors_{set(rope_factors).pop()} "
                             "without its long/short counterpart.")
        original = meta.get(f"{arch}.rope.scaling.original_context_length")
        if original is None:
            raise ValueError(f"{header.path} has longrope factors but no "
                             f"'{arch}.rope.scaling.original_context_length'.")
        out["rope_scaling"] = {
            "rope_type": "longrope", "original_max_position_embeddings": int(original),
            "long_factor": rope_factors["long"].reshape(-1).tolist(),
            "short_factor": rope_factors["short"].reshape(-1).tolist()}
        if f"{arch}.rope.scaling.attn_factor" in meta:
            out["rope_scaling"]["attention_factor"] = float(
                meta[f"{arch}.rope.scaling.attn_factor"])
    if arch == "smollm3":
        out["no_rope_layer_interval"] = 4
    rope_dims = meta.get(f"{arch}.rope.dimension_count")
    if arch == "phi3" and rope_dims is not None:
        head_dim = int(meta.get(f"{arch}.attention.key_length") or (
            meta[f"{arch}.embedding_length"] // meta[f"{arch}.attention.head_count"]))
        if int(rope_dims) != head_dim:  # Phi-4-mini: refused by ModelConfig
            out["partial_rotary_factor"] = int(rope_dims) / head_dim
    return out


def _expert_slices(hf_name: str, info: GGUFTensorInfo, raw: torch.Tensor,
                   keep_packed) -> Iterator[tuple[str, Any]]:
    """A merged expert tensor ``[experts, rows, cols]`` as one ``[rows, cols]`` matrix
    per expert (``hf_name`` with ``{expert}`` filled in): rows of blocks of the mapped
    file where ``keep_packed`` takes the type, else slices of the dequantized tensor."""
    n, rows, cols = info.shape  # checked in open_gguf
    if keep_packed is not None and keep_packed(info.qtype):
        blocks = raw.view(n * rows, -1)
        for e in range(n):
            yield (hf_name.format(expert=e),
                   QuantizedTensor(int(info.qtype), blocks[e * rows:(e + 1) * rows],
                                   (rows, cols)))
        return
    with _one_thread():
        tensor = dequantize(raw, info.qtype, info.shape)
    for e in range(n):
        yield hf_name.format(expert=e), tensor[e]


def _gemma_config(meta: dict[str, Any], arch: str, config: dict[str, Any]) -> dict[str, Any]:
    """The Gemma 2/3 keys of ``config.json`` from ``{arch}.*`` metadata, as llama.cpp reads
    them: every 6th layer global for Gemma 3 (local rope base 10k), alternating for
    Gemma 2; the query scale ``1/sqrt(head_dim)`` except Gemma 3 27B's
    ``1/sqrt(hidden / heads)`` (62 layers); soft-caps where the file has them."""
    n, hidden = config["num_hidden_layers"], config["hidden_size"]
    pattern = int(meta.get(f"{arch}.attention.sliding_window_pattern",
                           6 if arch == "gemma3" else 2))
    out: dict[str, Any] = {
        "hidden_act": "gelu_pytorch_tanh", "hidden_activation": "gelu_pytorch_tanh",
        "sliding_window": int(meta.get(f"{arch}.attention.sliding_window", 4096)),
        "layer_types": ["full_attention" if (i + 1) % pattern == 0 else "sliding_attention"
                        for i in range(n)],
        "query_pre_attn_scalar": (hidden // config["num_attention_heads"]
                                  if arch == "gemma3" and n == 62 else config["head_dim"]),
        "tie_word_embeddings": True,
    }
    if arch == "gemma3":
        out["rope_local_base_freq"] = 10000.0
    for key in ("attn_logit_softcapping", "final_logit_softcapping"):
        if f"{arch}.{key}" in meta:
            out[key] = float(meta[f"{arch}.{key}"])
    return out


def _rope_scaling(meta: dict[str, Any], arch: str) -> dict[str, Any] | None:
    """HF ``rope_scaling`` from ``{arch}.rope.scaling.*`` (linear / yarn), else None."""
    kind = meta.get(f"{arch}.rope.scaling.type")
    if kind in (None, "none"):
        return None
    scaling: dict[str, Any] = {"rope_type": kind}
    if f"{arch}.rope.scaling.factor" in meta:
        scaling["factor"] = float(meta[f"{arch}.rope.scaling.factor"])
    if f"{arch}.rope.scaling.original_context_length" in meta:
        original = int(meta[f"{arch}.rope.scaling.original_context_length"])
        scaling["original_max_position_embeddings"] = original
    return scaling


def _llama3_rope_scaling(header: GGUFFile, arch: str, divisors: torch.Tensor, theta: float,
                         head_dim: int) -> dict[str, Any]:
    """Recover HF's ``rope_scaling={"rope_type": "llama3", ...}`` from ``rope_freqs.weight``.

    For Llama 3.x, llama.cpp's converter does not store the scaling parameters; it stores,
    per rotary frequency, the divisor that ggml's rope applies: ``inv_freq / llama3_inv_freq``
    = 1 for high frequencies, ``factor`` for low ones and ``1 / ((1 - s) / factor + s)`` in
    the smooth band between. We take the parameters from ``{arch}.rope.scaling.*`` where the
    file has them, else Llama 3.1's (low 1, high 4, original context 8192) with ``factor``
    read off the largest divisor (8 for Llama 3.1, 32 for 3.2), recompute the divisors with
    our own rotary code and accept them only if they match the tensor.
    """
    meta, prefix = header.metadata, f"{arch}.rope.scaling."
    kind = meta.get(prefix + "type")
    if kind not in (None, "none", "llama3"):
        raise ValueError(f"{header.path} has both rope_freqs.weight and rope scaling type "
                         f"{kind!r}; tokenmill does not support combining them.")
    divisors = divisors.float().reshape(-1)
    if 2 * divisors.numel() != head_dim:
        raise ValueError(f"{header.path}: rope_freqs.weight has {divisors.numel()} entries but "
                         f"a head dim of {head_dim} needs {head_dim // 2}; partial rotary "
                         "embeddings are not supported.")
    params = {
        "factor": float(meta.get(prefix + "factor", divisors.max().item())),
        "low_freq_factor": float(meta.get(prefix + "low_freq_factor", 1.0)),
        "high_freq_factor": float(meta.get(prefix + "high_freq_factor", 4.0)),
        "original_max_position_embeddings": int(
            meta.get(prefix + "original_context_length", 8192)),
    }
    scaled = RopeConfig(theta=theta, scaling_type="llama3", **params)
    expected = (inverse_frequencies(RopeConfig(theta=theta), head_dim)
                / inverse_frequencies(scaled, head_dim))
    if not torch.allclose(divisors, expected, rtol=1e-3, atol=0.0):
        worst = int((divisors - expected).abs().argmax())
        raise ValueError(
            f"{header.path}: this rope_freqs.weight layout is unsupported: it is not llama3 rope "
            f"scaling with {params} (entry {worst}: {divisors[worst].item():.6g} in the file, "
            f"{expected[worst].item():.6g} expected). If the original model's rope_scaling is "
            f"llama3, write its values into the GGUF as '{prefix}factor', 'low_freq_factor', "
            "'high_freq_factor' and 'original_context_length'; or load its Hugging Face folder.")
    return {"rope_type": "llama3", **params}


def _read_tensor(path: str, info: GGUFTensorInfo) -> torch.Tensor:
    """Read and dequantize one (small) tensor outside the streaming ``read()``."""
    with open(path, "rb") as f:
        f.seek(info.offset)
        raw = torch.frombuffer(bytearray(f.read(info.nbytes)), dtype=torch.uint8)
    return dequantize(raw, info.qtype, info.shape)


def _map_tensor(f, info: GGUFTensorInfo) -> torch.Tensor:
    """The tensor's bytes (uint8) over a private, copy-on-write mapping of just its pages
    (``ACCESS_COPY``: writable for ``torch.frombuffer``, never written back). The mapping
    lives as long as a view of it does."""
    if info.nbytes == 0:
        return torch.empty(0, dtype=torch.uint8)
    start = info.offset - info.offset % mmap.ALLOCATIONGRANULARITY
    buf = mmap.mmap(f.fileno(), info.offset + info.nbytes - start, offset=start,
                    access=mmap.ACCESS_COPY)
    return torch.frombuffer(buf, dtype=torch.uint8, count=info.nbytes,
                            offset=info.offset - start)


def _refuse_unrunnable(header: GGUFFile, tensors: list[GGUFTensorInfo]) -> None:
    """A tensor type neither the kernels nor a dequantizer reads is refused now, not
    halfway through loading."""
    for info in tensors:
        if int(info.qtype) not in PACKED_BLOCKS and not can_dequantize(info.qtype):
            raise ValueError(
                f"{header.path}: tensor {info.name!r} is stored as {info.qtype.name}, a type "
                "tokenmill cannot run (it reads F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, "
                "Q2_K-Q6_K, IQ4_NL, IQ4_XS, and dequantizes the other types gguf-py can). "
                "Re-quantize the model, e.g. to Q4_K_M or Q8_0.")


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """Run torch ops single-threaded: dequantization is a chain of small memory-bound
    ops, and on a busy machine each OpenMP barrier can stall for a time slice of another
    process, which costs more than a second thread gains.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def open_gguf(path: str) -> Checkpoint:
    """Open a single GGUF file as a Checkpoint with HF names, config and layout."""
    header = read_gguf(path)
    arch = header.metadata.get("general.architecture")
    if arch in GGUF_ENCODERS:  # encoders keep their GGUF names (gguf_encoder)
        return open_gguf_encoder(path, header)
    if arch not in _ARCHITECTURES:
        raise ValueError(f"{path}: GGUF architecture {arch!r} is not supported; tokenmill "
                         f"reads {', '.join(sorted(_ARCHITECTURES))}.")
    if int(header.metadata.get("split.count", 1)) > 1:
        raise ValueError(f"{path} is one part of a split GGUF; merge the parts first with "
                         "`llama-gguf-split --merge first-part.gguf merged.gguf`.")
    named = [(hf_tensor_name(t.name, arch), t) for t in header.tensors]
    named = [(n, t) for n, t in named if n is not None]
    rope_factors = {t.name.split("rope_factors_")[1].split(".")[0]: _read_tensor(path, t)
                    for t in header.tensors if "rope_factors_" in t.name}
    _refuse_unrunnable(header, [t for _, t in named])
    data_end = max((t.offset + t.nbytes for t in header.tensors), default=0)
    rope_freqs = next((_read_tensor(path, t) for t in header.tensors
                       if t.name == "rope_freqs.weight"), None)
    hf_config = _hf_config(header, arch, {n: t.shape for n, t in named}, rope_freqs,
                           rope_factors)
    experts = int(header.metadata.get(f"{arch}.expert_count") or 0)
    for n, t in named:
        if EXPERT in n and (len(t.shape) != 3 or t.shape[0] != experts):
            raise ValueError(f"{path}: expert tensor {t.name!r} of shape {t.shape} does not "
                             f"hold '{arch}.expert_count' = {experts} experts; this model "
                             "variant is not supported.")
    permuted = _ARCHITECTURES[arch][2]
    heads = {"q_proj": hf_config["num_attention_heads"],
             "k_proj": hf_config["num_key_value_heads"]}

    def read(keep_packed=None) -> Iterator[tuple[str, Any]]:
        with open(path, "rb") as f:
            if os.fstat(f.fileno()).st_size < data_end:
                raise ValueError(f"{path} is truncated: it became shorter since it was opened.")
            for hf_name, info in named:
                raw = _map_tensor(f, info)
                if EXPERT in hf_name:
                    yield from _expert_slices(hf_name, info, raw, keep_packed)
                    continue
                proj = hf_name.split(".")[-2]
                if (len(info.shape) == 2 and keep_packed is not None
                        and keep_packed(info.qtype)):
                    rows = raw.view(info.shape[0], -1)  # rows of blocks, HF [out, in] order
                    if permuted and proj in heads:
                        rows = _unpermute_rope(rows, heads[proj])
                    yield hf_name, QuantizedTensor(int(info.qtype), rows, tuple(info.shape))
                    continue
                with _one_thread():
                    tensor = dequantize(raw, info.qtype, info.shape)
                    if permuted and proj in heads:
                        tensor = _unpermute_rope(tensor, heads[proj])
                del raw
                if arch in _GEMMA_ARCHS and hf_name.endswith("norm.weight"):
                    tensor = tensor - 1.0  # llama.cpp stored 1 + w; HF's convention is w
                yield hf_name, tensor

    return Checkpoint(
        path=path, format="gguf", hf_config=hf_config,
        tensor_names=tuple(n.format(expert=e) for n, t in named
                           for e in (range(t.shape[0]) if EXPERT in n else (0,))),
        _read=read,
    )
