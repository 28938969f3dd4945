"""Quantize a Hugging Face checkpoint's float weights while they are read
(``--quantization q8_0 | q4_0 | q4_k``), so a safetensors folder runs on the packed CPU
kernels that GGUF files use, with no separate convert-and-quantize step.

``QuantizeAtLoad(scheme, tie_word_embeddings).apply(tensors)`` wraps the stream of
``(hf_name, tensor)`` pairs of ``Checkpoint.tensors()``: each matrix it picks comes out
as a ``QuantizedTensor`` (GGUF blocks, ``tokenmill.gguf.quantize``), every other tensor
unchanged. The layers then keep those blocks packed exactly as they keep a GGUF file's.

Which type each tensor gets (``qtype_for``), after llama.cpp's choices:

* the linear layers' weights (``*_proj.weight``: q/k/v/o, gate/up/down) take the
  scheme's type; for q4_k a matrix whose rows are not whole super-blocks of 256 takes
  Q5_0 (as ``llama-quantize`` does), and a row that is not whole blocks of 32 stays float;
* the output head (``lm_head.weight``, or the embedding table when the model ties the
  two, since that table then is the head) takes Q8_0, whatever the scheme: it is the
  largest matrix of a small model and the most sensitive one;
* everything else (an untied embedding table, norms, biases) stays float.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from tokenmill.gguf.quant_types import BLOCK_WEIGHTS
from tokenmill.gguf.quantize import Q4_0, Q4_K, Q5_0, Q8_0, quantize

# --quantization value -> the ggml type of the linear layers' weights
SCHEMES = {"q8_0": Q8_0, "q4_0": Q4_0, "q4_k": Q4_K}
HEAD_QTYPE = Q8_0


@dataclass(frozen=True)
class QuantizeAtLoad:
    """What ``--quantization <scheme>`` does to a float checkpoint's tensors."""

    scheme: str
    tie_word_embeddings: bool

    def __post_init__(self) -> None:
        if self.scheme not in SCHEMES:
            raise ValueError(f"quantization scheme must be one of {', '.join(SCHEMES)}; got "
                             f"{self.scheme!r}.")

    def qtype_for(self, name: str, shape: tuple[int, ...]) -> int | None:
        """The ggml type tensor ``name`` of ``shape`` is quantized to; None: kept float."""
        if len(shape) != 2:
            return None
        head = name == "lm_head.weight" or (
            self.tie_word_embeddings and name.endswith("embed_tokens.weight"))
        if head:
            qtype = HEAD_QTYPE
        elif name.endswith("_proj.weight"):
            qtype = SCHEMES[self.scheme]
            if shape[1] % BLOCK_WEIGHTS[qtype]:
                qtype = Q5_0  # llama.cpp's fallback for K-quant rows of other widths
        else:
            return None
        return qtype if shape[1] % BLOCK_WEIGHTS[qtype] == 0 else None

    def apply(self, tensors: Iterator[tuple[str, Any]]) -> Iterator[tuple[str, Any]]:
        """The checkpoint's tensors, the chosen matrices quantized (one at a time)."""
        for name, tensor in tensors:
            qtype = (self.qtype_for(name, tuple(tensor.shape))
                     if isinstance(tensor, torch.Tensor) and tensor.is_floating_point()
                     else None)
            yield name, tensor if qtype is None else quantize(tensor, qtype)


def quantize_encoder_linears(tensors: Iterator[tuple[str, Any]],
                             scheme: str) -> Iterator[tuple[str, Any]]:
    """``--quantization q8_0|q4_0|q4_k`` for an encoder's float weights: the 2-D weights
    inside the transformer layers (BERT's ``encoder.layer.N.*.weight``: q/k/v, attention
    output, intermediate, output; a GGUF encoder's ``blk.N.*.weight``) take the scheme's
    type (Q5_0 for q4_k rows that are not
    whole super-blocks, float for rows that are not whole blocks); embeddings, norms,
    biases and any classifier head stay float."""
    if scheme not in SCHEMES:
        raise ValueError(f"quantization scheme must be one of {', '.join(SCHEMES)}; got "
                         f"{scheme!r}.")
    for name, tensor in tensors:
        qtype = None
        if (isinstance(tensor, torch.Tensor) and tensor.is_floating_point()
                and tensor.dim() == 2 and name.endswith(".weight")
                and (".layer." in name or name.startswith("blk."))):
            qtype = SCHEMES[scheme]
            if tensor.shape[1] % BLOCK_WEIGHTS[qtype]:
                qtype = Q5_0
            if tensor.shape[1] % BLOCK_WEIGHTS[qtype]:
                qtype = None
        yield name, tensor if qtype is None else quantize(tensor.float(), qtype)
