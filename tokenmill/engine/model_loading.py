"""Builds the model from a checkpoint (HF folder or GGUF) or with random weights.

With ``--quantization q8_0|q4_0|q4_k`` a Hugging Face folder's float weights are
quantized as they are read (``tokenmill.loader.quantize_at_load``) and stay packed
like a GGUF file's; GGUF files keep their own types (the flag is refused for them)."""

from __future__ import annotations

import json
import logging
import os
import time

import torch
from torch import nn
from tqdm import tqdm

from tokenmill.config import QUANTIZE_AT_LOAD, EngineConfig, ModelConfig
from tokenmill.distributed import per_rank_heads
from tokenmill.layers.attention import AttentionBackend
from tokenmill.layers.quantization import QTYPE_NAMES, packable
from tokenmill.loader import open_checkpoint
from tokenmill.loader.quantize_at_load import SCHEMES, QuantizeAtLoad
from tokenmill.models import build_model

logger = logging.getLogger("tokenmill")


def init_dummy_weights(model: nn.Module, seed: int) -> None:
    """Random weights with sane scales, for benchmarks on shapes we cannot download."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            p.data.fill_(1.0)
        else:
            p.data.copy_(torch.randn(p.shape, generator=gen) * 0.02)


def weight_summary(model: nn.Module) -> str:
    """E.g. ``96.3 MiB (Q4_1 packed x 210, Q8_0 packed x 1, float32 x 61)``."""
    counts: dict[str, int] = {}
    total = 0
    seen: set[int] = set()
    for module in model.modules():
        packed = getattr(module, "packed", None)
        if packed is not None and id(packed) not in seen:
            seen.add(id(packed))
            key = f"{QTYPE_NAMES[packed.qtype]} packed"
            counts[key] = counts.get(key, 0) + 1
            total += packed.nbytes
        for name, p in module.named_parameters(recurse=False):
            if id(p) in seen or (name == "weight" and packed is not None):
                continue
            seen.add(id(p))
            key = str(p.dtype).removeprefix("torch.")
            counts[key] = counts.get(key, 0) + 1
            total += p.numel() * p.element_size()
    parts = ", ".join(f"{k} x {v}" for k, v in counts.items())
    return f"{total / 2**20:.1f} MiB ({parts})"


def _quantized(tensors, config: EngineConfig, ckpt_format: str, model_cfg: ModelConfig):
    """The checkpoint's tensors with its linear weights quantized (``QuantizeAtLoad``)."""
    if ckpt_format != "hf":
        raise ValueError(f"--quantization {config.quantization} quantizes a Hugging Face "
                         f"safetensors folder at load; {config.model} is a "
                         f"{ckpt_format.upper()} checkpoint, already quantized: use "
                         "--quantization auto or none.")
    if not packable(SCHEMES[config.quantization]):
        logger.warning("--quantization %s: the CPU kernels are not built here (no C "
                       "compiler, or TOKENMILL_NO_KERNELS), so weights stay float.",
                       config.quantization)
        return tensors
    return QuantizeAtLoad(config.quantization, model_cfg.tie_word_embeddings).apply(tensors)


def load_model(config: EngineConfig, backend: AttentionBackend,
               show_progress: bool = True) -> tuple[nn.Module, ModelConfig]:
    start = time.perf_counter()
    ckpt = None
    if config.load_format == "dummy" and os.path.isdir(config.model):
        with open(os.path.join(config.model, "config.json")) as f:  # no weights needed
            model_cfg = ModelConfig.from_hf(json.load(f))
    else:
        ckpt = open_checkpoint(config.model)
        model_cfg = ModelConfig.from_hf(ckpt.hf_config)
    # parameters are initialized from a seeded RNG of their own, not the caller's
    with torch.random.fork_rng(devices=[]), torch.device(config.device):
        torch.manual_seed(config.seed)
        prev = torch.get_default_dtype()
        torch.set_default_dtype(config.dtype)
        try:
            model = build_model(model_cfg, backend)
        finally:
            torch.set_default_dtype(prev)
    if config.load_format == "dummy":
        init_dummy_weights(model, config.seed)
    else:
        keep_packed = packable if (config.quantization == "auto"
                                   and config.device == "cpu") else None
        tensors = ckpt.tensors(keep_packed)
        if config.quantization in QUANTIZE_AT_LOAD:
            tensors = _quantized(tensors, config, ckpt.format, model_cfg)
        tensors = tqdm(tensors, total=len(ckpt.tensor_names),
                       desc="Loading weights" if config.quantization not in QUANTIZE_AT_LOAD
                       else f"Loading and quantizing weights to {config.quantization}",
                       unit="tensor", disable=not show_progress, leave=False)
        loaded = model.load_weights(tensors)
        missing = model.required_parameters() - loaded
        if missing:
            raise ValueError(f"checkpoint {config.model} lacks weights: "
                             f"{', '.join(sorted(missing)[:5])}"
                             f"{' ...' if len(missing) > 5 else ''}")
    model.eval()
    logger.info("Loaded %s (%s, %s, %d layers) in %.1f s; weights: %s", config.model,
                model_cfg.architecture, str(config.dtype).removeprefix("torch."),
                model_cfg.num_layers, time.perf_counter() - start, weight_summary(model))
    # tensor parallel: the layers hold their rank's heads; the KV cache is sized by them
    return model, per_rank_heads(model_cfg)
