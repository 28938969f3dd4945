"""Write a tiny Hugging Face folder as a llama.cpp GGUF: llama.cpp's tensor names
(written out here from its ``gguf-py`` constants, not taken from tokenmill's loader),
merged ``ffn_*_exps`` expert tensors ``[experts, rows, cols]``, Phi-3's fused
``attn_qkv`` / ``ffn_up`` and longrope factor tensors, Q/K rows permuted for ``llama``
files (Mixtral), and the metadata keys llama.cpp's converter writes."""

from __future__ import annotations

import json
import os
import re

import numpy as np
import torch
from gguf import GGMLQuantizationType as Q
from safetensors.numpy import load_file

from tests.loader.test_loader_gguf import llama_cpp_permute, write_gguf
from tokenmill.gguf.quantize import quantize
from tokenmill.loader.quantize_at_load import QuantizeAtLoad

# HF architecture -> GGUF general.architecture
GGUF_ARCH = {"Phi3ForCausalLM": "phi3", "MixtralForCausalLM": "llama",
             "Qwen2MoeForCausalLM": "qwen2moe", "Qwen3MoeForCausalLM": "qwen3moe",
             "OlmoeForCausalLM": "olmoe", "SmolLM3ForCausalLM": "smollm3"}
GLOBAL = {"model.embed_tokens.weight": "token_embd.weight",
          "model.norm.weight": "output_norm.weight", "lm_head.weight": "output.weight"}
BLOCK = {
    "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "self_attn.qkv_proj": "attn_qkv",
    "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
    "mlp.gate_up_proj": "ffn_up",  # Phi-3: [gate; up] rows in one matrix
    "mlp.gate": "ffn_gate_inp", "block_sparse_moe.gate": "ffn_gate_inp",
    "mlp.shared_expert.gate_proj": "ffn_gate_shexp", "mlp.shared_expert.up_proj": "ffn_up_shexp",
    "mlp.shared_expert.down_proj": "ffn_down_shexp",
    "mlp.shared_expert_gate": "ffn_gate_inp_shexp",
}
EXPERT_RE = re.compile(r"model\.layers\.(\d+)\.(?:mlp|block_sparse_moe)\.experts\.(\d+)\."
                       r"(gate_proj|up_proj|down_proj|w1|w3|w2)\.weight")
EXPERT_PART = {"gate_proj": "gate", "w1": "gate", "up_proj": "up", "w3": "up",
               "down_proj": "down", "w2": "down"}


def gguf_from_folder(folder: str, out: str, scheme: str | None = None) -> str:
    """The folder's weights as a GGUF at ``out``: float32, or with ``scheme`` each
    matrix in the type ``--quantization <scheme>`` gives it (``QuantizeAtLoad``), as
    the same blocks."""
    with open(os.path.join(folder, "config.json")) as f:
        cfg = json.load(f)
    hf_arch = cfg["architectures"][0]
    arch = GGUF_ARCH[hf_arch]
    weights = load_file(os.path.join(folder, "model.safetensors"))
    heads, kv_heads = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    tensors: dict[str, tuple[np.ndarray, Q]] = {}
    experts: dict[tuple[int, str], dict[int, np.ndarray]] = {}
    plan = QuantizeAtLoad(scheme or "q8_0", bool(cfg.get("tie_word_embeddings")))

    def put(name: str, w: np.ndarray, hf_name: str) -> None:
        """``w`` (a matrix, or experts' matrices stacked) in ``hf_name``'s type."""
        qtype = scheme and plan.qtype_for(hf_name, w.shape[-2:]) if w.ndim > 1 else None
        if qtype is None:
            tensors[name] = (w, Q.F32)
            return
        blocks = [quantize(torch.from_numpy(m), qtype).data.numpy() for m in w.reshape(
            -1, *w.shape[-2:])]
        tensors[name] = (np.stack(blocks).reshape(*w.shape[:-1], -1), Q(qtype))

    for name, w in weights.items():
        w = np.ascontiguousarray(w, dtype=np.float32)
        m = EXPERT_RE.fullmatch(name)
        if m:
            experts.setdefault((int(m.group(1)), EXPERT_PART[m.group(3)]), {})[
                int(m.group(2))] = w
            continue
        if name in GLOBAL:
            put(GLOBAL[name], w, name)
            continue
        layer, rest, kind = re.fullmatch(r"model\.layers\.(\d+)\.(.+)\.(weight|bias)",
                                         name).groups()
        if arch in ("llama", "smollm3") and rest in ("self_attn.q_proj", "self_attn.k_proj"):
            w = llama_cpp_permute(w, heads if rest.endswith("q_proj") else kv_heads)
        if BLOCK[rest] == "ffn_gate_inp_shexp":
            w = w.reshape(-1)  # a vector, as some files store it (the converter: [1, n])
        put(f"blk.{layer}.{BLOCK[rest]}.{kind}", w, name)
    for (layer, part), by_expert in experts.items():
        stacked = np.stack([by_expert[e] for e in sorted(by_expert)])
        put(f"blk.{layer}.ffn_{part}_exps.weight", stacked,
            f"model.layers.{layer}.mlp.experts.0.{part}_proj.weight")

    meta = {
        f"{arch}.embedding_length": cfg["hidden_size"],
        f"{arch}.feed_forward_length": cfg["intermediate_size"],
        f"{arch}.block_count": cfg["num_hidden_layers"],
        f"{arch}.attention.head_count": heads, f"{arch}.attention.head_count_kv": kv_heads,
        f"{arch}.context_length": cfg["max_position_embeddings"],
        f"{arch}.attention.layer_norm_rms_epsilon": float(cfg["rms_norm_eps"]),
        f"{arch}.rope.freq_base": float(cfg.get("rope_theta")
                                        or cfg["rope_parameters"]["rope_theta"]),
        f"{arch}.attention.key_length": cfg.get("head_dim") or cfg["hidden_size"] // heads,
        "tokenizer.ggml.tokens": [f"t{i}" for i in range(cfg["vocab_size"])],
    }
    n_experts = cfg.get("num_local_experts") or cfg.get("num_experts")
    if n_experts:
        meta[f"{arch}.expert_count"] = n_experts
        meta[f"{arch}.expert_used_count"] = cfg["num_experts_per_tok"]
    if cfg.get("moe_intermediate_size"):
        meta[f"{arch}.expert_feed_forward_length"] = cfg["moe_intermediate_size"]
    if cfg.get("shared_expert_intermediate_size"):
        meta[f"{arch}.expert_shared_feed_forward_length"] = cfg["shared_expert_intermediate_size"]
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    if rope.get("long_factor"):
        original = rope.get("original_max_position_embeddings") or cfg[
            "original_max_position_embeddings"]
        scale = cfg["max_position_embeddings"] / original
        meta[f"{arch}.rope.scaling.original_context_length"] = original
        meta[f"{arch}.rope.scaling.attn_factor"] = float(
            np.sqrt(1 + np.log(scale) / np.log(original)))
        for kind in ("long", "short"):
            tensors[f"rope_factors_{kind}.weight"] = (
                np.asarray(rope[f"{kind}_factor"], dtype=np.float32), Q.F32)
    return write_gguf(out, arch, tensors, meta)
