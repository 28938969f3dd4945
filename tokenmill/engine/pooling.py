"""How an encoder's hidden states become one vector per input, read from the model itself.

Sources, first found wins:

* a sentence-transformers folder: ``modules.json`` lists the modules; the ``Pooling``
  module's ``config.json`` picks mean / CLS / last-token / max pooling, a ``Normalize``
  module means unit length;
* a GGUF file: ``<arch>.pooling_type`` (llama.cpp's enum: 1 mean, 2 CLS, 3 last), and
  embeddings are normalized (as llama-server's ``/v1/embeddings`` returns them);
* otherwise the caller's default (CLS for BERT classifiers, mean for encoders, last token
  for decoders served with ``--task embed``).

``pool(hidden, seq_lens, config)`` reduces a flat batch [T, H] (sequences end to end) to
[B, H]; ``finish`` truncates to ``dimensions`` (Matryoshka) and normalizes.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

POOLING_MODES = ("mean", "cls", "last", "max")
_GGUF_POOLING = {1: "mean", 2: "cls", 3: "last"}


@dataclass(frozen=True)
class PoolingConfig:
    """mode: one of ``POOLING_MODES``; normalize: scale each vector to unit length;
    matryoshka: the model was trained so that a prefix of the vector is an embedding too
    (``dimensions`` may truncate it)."""

    mode: str = "mean"
    normalize: bool = True
    matryoshka: bool = False

    def __post_init__(self) -> None:
        if self.mode not in POOLING_MODES:
            raise ValueError(f"pooling mode {self.mode!r}; expected one of {POOLING_MODES}")


def _read_json(path: str) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _st_mode(cfg: dict[str, Any]) -> str:
    if cfg.get("pooling_mode_cls_token"):
        return "cls"
    if cfg.get("pooling_mode_lasttoken"):
        return "last"
    if cfg.get("pooling_mode_max_tokens"):
        return "max"
    if cfg.get("pooling_mode_mean_tokens", True):
        return "mean"
    raise ValueError(f"unsupported sentence-transformers pooling config {cfg}")


def pooling_from_folder(folder: str, default: PoolingConfig) -> PoolingConfig:
    """The pooling a sentence-transformers folder declares, else ``default``."""
    modules_file = os.path.join(folder, "modules.json")
    if not os.path.isfile(modules_file):
        return default
    mode, normalize = default.mode, False
    for module in _read_json(modules_file):
        kind = str(module.get("type", ""))
        if kind.endswith(".Pooling"):
            mode = _st_mode(_read_json(os.path.join(folder, module.get("path", ""),
                                                    "config.json")))
        elif kind.endswith(".Normalize"):
            normalize = True
    return PoolingConfig(mode=mode, normalize=normalize, matryoshka=default.matryoshka)


def pooling_from_gguf(metadata: dict[str, Any], arch: str,
                      default: PoolingConfig) -> PoolingConfig:
    """The pooling ``<arch>.pooling_type`` declares (vectors normalized), else ``default``."""
    kind = metadata.get(f"{arch}.pooling_type")
    if kind is None:
        return default
    if int(kind) not in _GGUF_POOLING:
        raise ValueError(f"{arch}.pooling_type {kind} is not supported (1 mean, 2 CLS, "
                         "3 last)")
    return PoolingConfig(mode=_GGUF_POOLING[int(kind)], normalize=True,
                         matryoshka=default.matryoshka)


def pool(hidden: torch.Tensor, seq_lens: list[int], mode: str) -> torch.Tensor:
    """[T, H] for sequences of ``seq_lens`` tokens laid end to end -> [B, H]."""
    if mode == "cls":
        starts = torch.tensor([0, *seq_lens[:-1]]).cumsum(0)
        return hidden.index_select(0, starts.to(hidden.device))
    if mode == "last":
        ends = torch.tensor(seq_lens).cumsum(0) - 1
        return hidden.index_select(0, ends.to(hidden.device))
    parts = hidden.split(seq_lens)
    if mode == "max":
        return torch.stack([p.max(0).values for p in parts])
    seg = torch.repeat_interleave(torch.arange(len(seq_lens)), torch.tensor(seq_lens))
    sums = hidden.new_zeros(len(seq_lens), hidden.shape[1]).index_add_(
        0, seg.to(hidden.device), hidden)
    return sums / torch.tensor(seq_lens, dtype=hidden.dtype, device=hidden.device)[:, None]


def finish(vectors: torch.Tensor, normalize: bool, dimensions: int | None) -> torch.Tensor:
    """Truncate to the first ``dimensions`` features (Matryoshka), then normalize."""
    if dimensions is not None:
        vectors = vectors[:, :dimensions]
    return F.normalize(vectors, dim=-1) if normalize else vectors
