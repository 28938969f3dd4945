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
    if cls is None:
        raise ValueError(f"architecture {cfg.architecture!r} is not supported; supported: "
                         f"{', '.join(sorted(MODEL_REGISTRY))}.")
    return cls(cfg, backend)
