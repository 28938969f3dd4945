"""One view of a model checkpoint, whatever it was stored as.

A checkpoint is either a Hugging Face folder (``config.json`` + ``*.safetensors``) or a
single llama.cpp GGUF file. Both are presented in the Hugging Face shape, so model code
only ever sees HF conventions:

* ``hf_config`` is a ``config.json``-shaped dict (HF key names);
* tensor names are HF names (``model.layers.0.self_attn.q_proj.weight``);
* linear weights are ``[out_features, in_features]`` with HF's rotary layout.

Weights are produced lazily by ``Checkpoint.tensors()`` so a loader can copy them into
the model one at a time and peak memory stays near one tensor, not the whole model.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

_EXPECTED = (
    "pass a Hugging Face model folder (containing config.json and *.safetensors) "
    "or a single .gguf file"
)


@dataclass(frozen=True)
class Checkpoint:
    """A checkpoint's config and tensor names, with a lazy reader for the weights.

    Attributes:
        path: the folder (``format == "hf"``) or ``.gguf`` file (``format == "gguf"``).
        format: ``"hf"`` or ``"gguf"``.
        hf_config: ``config.json``-shaped dict. Rope settings are available both in the
            transformers-5 shape (``rope_parameters``) and the older one (``rope_theta``,
            ``rope_scaling``); the dtype both as ``dtype`` and ``torch_dtype``.
        tensor_names: HF names of every tensor ``tensors()`` yields, in yield order.
    """

    path: str
    format: str
    hf_config: dict[str, Any]
    tensor_names: tuple[str, ...]
    _read: Callable[[Callable[[int], bool] | None], Iterator[tuple[str, Any]]] = field(
        repr=False, compare=False)

    def tensors(self, keep_packed: Callable[[int], bool] | None = None
                ) -> Iterator[tuple[str, Any]]:
        """Yield ``(hf_name, tensor)`` pairs, reading one tensor at a time.

        HF folders yield the dtype stored in the file (bf16/fp16/fp32). GGUF files yield
        tensors dequantized to ``torch.float32`` in HF layout, except 2-D tensors whose
        ggml type ``keep_packed(type_id)`` accepts: those come as ``QuantizedTensor``
        (blocks as stored, rows already in HF order). Each call re-reads the file.
        """
        return self._read(keep_packed)


def open_checkpoint(path: str) -> Checkpoint:
    """Open a HF folder or a GGUF file, reading only metadata (weights stay on disk).

    Raises:
        ValueError: the path is missing, or is neither a folder with ``config.json`` nor
            a ``.gguf`` file, or the checkpoint inside it cannot be read.
    """
    # Imported here: both readers build a Checkpoint, so they import this module.
    from tokenmill.loader.gguf_checkpoint import open_gguf
    from tokenmill.loader.hf_folder import open_hf_folder

    path = os.path.expanduser(os.fspath(path))
    if not os.path.exists(path):
        raise ValueError(f"Model path {path!r} does not exist; {_EXPECTED}.")
    if os.path.isdir(path):
        if os.path.isfile(os.path.join(path, "config.json")):
            return open_hf_folder(path)
        ggufs = sorted(f for f in os.listdir(path) if f.lower().endswith(".gguf"))
        hint = f" It contains {ggufs[0]!r}: pass that file's path instead." if ggufs else ""
        raise ValueError(f"Folder {path!r} has no config.json; {_EXPECTED}.{hint}")
    if path.lower().endswith(".gguf"):
        return open_gguf(path)
    if os.path.basename(path) == "config.json":
        raise ValueError(
            f"{path!r} is a config file; pass its folder {os.path.dirname(path) or '.'!r}."
        )
    raise ValueError(f"Cannot tell what kind of checkpoint {path!r} is; {_EXPECTED}.")


def normalize_hf_config(config: dict[str, Any]) -> dict[str, Any]:
    """Add the missing spelling of rope and dtype keys so either convention can be read.

    transformers 5 writes ``rope_parameters = {"rope_type", "rope_theta", ...}`` and
    ``dtype``; older configs (and most published checkpoints) write ``rope_theta``,
    ``rope_scaling`` and ``torch_dtype``. Only absent keys are added; nothing is removed.
    Per-layer-type rope parameters (a dict of dicts, e.g. Gemma 3) are left alone.
    """
    out = dict(config)
    params = out.get("rope_parameters")
    if isinstance(params, dict) and "rope_type" in params:
        out.setdefault("rope_theta", params.get("rope_theta", 10000.0))
        scaled = params["rope_type"] != "default"
        rest = {k: v for k, v in params.items() if k != "rope_theta"}
        out.setdefault("rope_scaling", rest if scaled else None)
    elif params is None:
        theta = out.setdefault("rope_theta", 10000.0)
        scaling = out.get("rope_scaling") or {}
        rope_type = scaling.get("rope_type", scaling.get("type", "default"))
        rest = {k: v for k, v in scaling.items() if k not in ("type", "rope_type")}
        out["rope_parameters"] = {"rope_type": rope_type, "rope_theta": theta, **rest}
        out.setdefault("rope_scaling", None)
    dtype = out.get("dtype") or out.get("torch_dtype")
    if dtype is not None:
        out["dtype"] = out.get("dtype") or dtype
        out["torch_dtype"] = out.get("torch_dtype") or dtype
    return out
