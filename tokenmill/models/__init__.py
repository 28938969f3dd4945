"""Model registry: Hugging Face ``architectures`` name -> our implementation."""

from __future__ import annotations

from torch import nn

from tokenmill.config import ModelConfig
from tokenmill.layers.attention import AttentionBackend
from tokenmill.models.llama import LlamaForCausalLM

MODEL_REGISTRY: dict[str, type[nn.Module]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": LlamaForCausalLM,  # full attention: sliding window not applied
    "Qwen2ForCausalLM": LlamaForCausalLM,    # q/k/v biases (ModelConfig.qkv_bias)
    "Qwen3ForCausalLM": LlamaForCausalLM,    # per-head q/k RMSNorm (ModelConfig.qk_norm)
}


def build_model(cfg: ModelConfig, backend: AttentionBackend) -> nn.Module:
    cls = MODEL_REGISTRY.get(cfg.architecture)
    if cls is None and is_encoder({"architectures": [cfg.architecture]}):
        raise ValueError(f"architecture {cfg.architecture!r} is an encoder: it embeds and "
                         "scores but does not generate; load it with --task embed (or auto).")
    if cls is None:
        raise ValueError(f"architecture {cfg.architecture!r} is not supported; supported: "
                         f"{', '.join(sorted(MODEL_REGISTRY))}.")
    return cls(cfg, backend)


def build_encoder(hf_config: dict, backend: AttentionBackend) -> nn.Module:
    """An encoder (embedding or cross-encoder model) from its ``config.json``-shaped dict;
    see ``ENCODER_REGISTRY``."""
    from tokenmill.models.encoders import ENCODER_REGISTRY

    arch = (hf_config.get("architectures") or ["?"])[0]
    build = ENCODER_REGISTRY.get(arch)
    if build is None:
        raise ValueError(f"architecture {arch!r} is not an encoder tokenmill runs; "
                         f"encoders: {', '.join(sorted(ENCODER_REGISTRY))}.")
    return build(hf_config, backend)


def is_encoder(hf_config: dict) -> bool:
    """True for the architectures served with ``--task embed`` (embeddings, scores)."""
    from tokenmill.models.encoders import ENCODER_REGISTRY

    return (hf_config.get("architectures") or ["?"])[0] in ENCODER_REGISTRY
