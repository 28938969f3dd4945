"""GGUF encoders (``nomic-bert``) as a ``Checkpoint``: the tensors keep their GGUF names
(the encoder models load those names themselves) and the config is built from the
``<arch>.*`` keys, with ``gguf_arch`` and the pooling keys kept for ``pooling``.

Matrices in a type the CPU kernels read come packed when the caller asks
(``keep_packed``), like the decoders'; F16/F32 tensors come as float32.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

from tokenmill.gguf.dequant import dequantize
from tokenmill.gguf.quant_types import QuantizedTensor
from tokenmill.gguf.reader import GGUFFile
from tokenmill.loader.checkpoint import Checkpoint

# general.architecture -> the encoder's ``architectures`` name
GGUF_ENCODERS = {"nomic-bert": "NomicBertModel"}


def _encoder_config(header: GGUFFile, arch: str) -> dict[str, Any]:
    meta = header.metadata

    def key(name: str, default: Any = None) -> Any:
        value = meta.get(f"{arch}.{name}", default)
        if value is None:
            raise ValueError(f"{header.path} lacks metadata key '{arch}.{name}'.")
        return value

    if meta.get(f"{arch}.attention.causal", False):
        raise ValueError(f"{header.path}: a causal {arch} is not an encoder tokenmill runs.")
    vocab = next((t.shape[0] for t in header.tensors if t.name == "token_embd.weight"), None)
    return {
        "architectures": [GGUF_ENCODERS[arch]], "model_type": arch, "gguf_arch": arch,
        "gguf_metadata": {k: v for k, v in meta.items() if k == f"{arch}.pooling_type"},
        "vocab_size": vocab or len(meta["tokenizer.ggml.tokens"]),
        "hidden_size": int(key("embedding_length")),
        "num_hidden_layers": int(key("block_count")),
        "num_attention_heads": int(key("attention.head_count")),
        "intermediate_size": int(key("feed_forward_length")),
        "max_position_embeddings": int(key("context_length")),
        "layer_norm_eps": float(key("attention.layer_norm_epsilon", 1e-12)),
        "rope_theta": float(key("rope.freq_base", 10000.0)),
        "type_vocab_size": int(meta.get("tokenizer.ggml.token_type_count", 2)),
    }


def open_gguf_encoder(path: str, header: GGUFFile) -> Checkpoint:
    """``header`` is the file's parsed header (``read_gguf``); its architecture is one of
    ``GGUF_ENCODERS``."""
    from tokenmill.loader.gguf_checkpoint import _map_tensor, _refuse_unrunnable

    arch = header.metadata["general.architecture"]
    config = _encoder_config(header, arch)
    tensors = list(header.tensors)
    _refuse_unrunnable(header, tensors)
    data_end = max((t.offset + t.nbytes for t in tensors), default=0)

    def read(keep_packed=None) -> Iterator[tuple[str, Any]]:
        with open(path, "rb") as f:
            if os.fstat(f.fileno()).st_size < data_end:
                raise ValueError(f"{path} is truncated: it became shorter since it was opened.")
            for info in tensors:
                raw = _map_tensor(f, info)
                if len(info.shape) == 2 and keep_packed is not None and keep_packed(info.qtype):
                    yield info.name, QuantizedTensor(int(info.qtype),
                                                     raw.view(info.shape[0], -1),
                                                     tuple(info.shape))
                    continue
                yield info.name, dequantize(raw, info.qtype, info.shape)

    return Checkpoint(path=path, format="gguf", hf_config=config,
                      tensor_names=tuple(t.name for t in tensors), _read=read)
