"""Read a Hugging Face model folder: ``config.json`` plus safetensors weights.

Weights may be one ``model.safetensors`` file or several shards. When
``model.safetensors.index.json`` exists its ``weight_map`` (tensor name -> shard file)
is the source of truth; otherwise every ``*.safetensors`` file in the folder is read.
Files are opened with ``safetensors.safe_open`` (memory-mapped), one at a time, and
tensors are returned in the dtype stored on disk.
"""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Iterator
from typing import Any

import torch
from safetensors import safe_open

from tokenmill.loader.checkpoint import Checkpoint, normalize_hf_config

INDEX_FILE = "model.safetensors.index.json"
# Mixtral's names -> those of the other MoE families (and tokenmill's MoE layer), so
# that every MoE folder reads alike and --quantization finds the experts' *_proj
# matrices: block_sparse_moe.gate -> mlp.gate, experts.E.w1/w3/w2 -> gate/up/down_proj.
_MIXTRAL_NAMES = ((".block_sparse_moe.", ".mlp."), (".w1.", ".gate_proj."),
                  (".w3.", ".up_proj."), (".w2.", ".down_proj."))


def _read_name(name: str) -> str:
    """The name a checkpoint tensor is read under (Mixtral's renamed, see above)."""
    if ".block_sparse_moe." in name:
        for old, new in _MIXTRAL_NAMES:
            name = name.replace(old, new)
    return name


def open_hf_folder(path: str) -> Checkpoint:
    """Read ``config.json`` and the tensor names of every shard (headers only)."""
    config = _read_config(os.path.join(path, "config.json"))
    shards = _shard_plan(path)
    names = tuple(_read_name(name) for _, shard_names in shards for name in shard_names)

    def read(keep_packed=None) -> Iterator[tuple[str, torch.Tensor]]:  # nothing is packed
        for file, shard_names in shards:
            with safe_open(file, framework="pt") as f:
                for name in shard_names:
                    yield _read_name(name), f.get_tensor(name)

    return Checkpoint(
        path=path, format="hf", hf_config=normalize_hf_config(config), tensor_names=names,
        _read=read,
    )


def _read_config(file: str) -> dict[str, Any]:
    try:
        with open(file, encoding="utf-8") as f:
            config = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{file} is not valid JSON ({e}); re-download the model.") from e
    if not isinstance(config, dict):
        raise ValueError(f"{file} must hold a JSON object, got {type(config).__name__}.")
    return config


def _shard_plan(path: str) -> list[tuple[str, list[str]]]:
    """Return ``[(shard_file, [tensor names in it]), ...]`` in reading order."""
    index = os.path.join(path, INDEX_FILE)
    if os.path.isfile(index):
        return _plan_from_index(path, index)
    files = sorted(glob.glob(os.path.join(glob.escape(path), "*.safetensors")))
    if not files:
        others = sorted(
            os.path.basename(f)
            for pattern in ("*.bin", "*.pt", "*.pth", "*.ckpt")
            for f in glob.glob(os.path.join(glob.escape(path), pattern))
        )
        found = f" Found {', '.join(others)}, but" if others else " Note that"
        raise ValueError(
            f"No *.safetensors weights in {path!r}.{found} PyTorch .bin/.pt checkpoints are "
            "not supported (they are pickles); convert the model to safetensors, e.g. "
            "AutoModelForCausalLM.from_pretrained(dir).save_pretrained(dir)."
        )
    plan: list[tuple[str, list[str]]] = []
    seen: dict[str, str] = {}
    for file in files:
        with safe_open(file, framework="pt") as f:
            names = list(f.keys())
        for name in names:
            if name in seen:
                raise ValueError(
                    f"Tensor {name!r} is stored in both {seen[name]} and {file}; remove the "
                    f"stale file or add a {INDEX_FILE} that says which shard to use."
                )
            seen[name] = file
        plan.append((file, names))
    return plan


def _plan_from_index(path: str, index: str) -> list[tuple[str, list[str]]]:
    try:
        with open(index, encoding="utf-8") as f:
            weight_map = json.load(f)["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{index} has no valid 'weight_map' ({e}); re-download it.") from e
    by_file: dict[str, list[str]] = {}
    for name, shard in weight_map.items():
        by_file.setdefault(shard, []).append(name)
    missing = [s for s in by_file if not os.path.isfile(os.path.join(path, s))]
    if missing:
        raise ValueError(
            f"{index} lists shard(s) that are not in the folder: {', '.join(sorted(missing))}; "
            "the download is incomplete."
        )
    return [(os.path.join(path, shard), names) for shard, names in sorted(by_file.items())]
