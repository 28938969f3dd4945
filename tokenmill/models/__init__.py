"""Model registry: Hugging Face ``architectures`` name -> our implementation."""

from __future__ import annotations

from torch import nn

from tokenmill.config import ModelConfig
from tokenmill.layers.attention import AttentionBackend
from tokenmill.models.gemma import GemmaForCausalLM
from tokenmill.models.llama import LlamaForCausalLM
from tokenmill.models.moe import MoEForCausalLM
from tokenmill.models.phi3 import Phi3ForCausalLM
from tokenmill.models.smollm3 import SmolLM3ForCausalLM

MODEL_REGISTRY: dict[str, type[nn.Module]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": LlamaForCausalLM,  # sliding_window: every layer windowed
    "Qwen2ForCausalLM": LlamaForCausalLM,    # q/k/v biases (ModelConfig.qkv_bias)
    "Qwen3ForCausalLM": LlamaForCausalLM,    # per-head q/k RMSNorm (ModelConfig.qk_norm)
    "Phi3ForCausalLM": Phi3ForCausalLM,      # fused qkv / gate_up in the checkpoint, longrope
    "SmolLM3ForCausalLM": SmolLM3ForCausalLM,  # no rope in every 4th layer
    # Mixture-of-Experts (ModelConfig.moe)
    "MixtralForCausalLM": MoEForCausalLM,    # full attention: sliding window not applied
    "Qwen2MoeForCausalLM": MoEForCausalLM,   # + q/k/v biases, a sigmoid-gated shared expert
    "Qwen3MoeForCausalLM": MoEForCausalLM,   # + per-head q/k RMSNorm
    "OlmoeForCausalLM": MoEForCausalLM,      # + q/k RMSNorm over all heads
}
MODEL_REGISTRY.update({  # sliding-window + global layers, soft-capping, 4 norms a layer
    "Gemma2ForCausalLM": GemmaForCausalLM,
    "Gemma3ForCausalLM": GemmaForCausalLM,
    "Gemma3ForConditionalGeneration": GemmaForCausalLM,  # its text model only
})


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
