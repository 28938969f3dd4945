"""Checkpoint loading: HF folders and GGUF files, both presented with HF names and config.

    ckpt = open_checkpoint(path or default_model_path())
    ckpt.hf_config["num_hidden_layers"]
    for name, tensor in ckpt.tensors(): ...
"""

from tokenmill.gguf.reader import GGUFFile, read_gguf
from tokenmill.loader.checkpoint import Checkpoint, open_checkpoint
from tokenmill.loader.default_model import (
    DEFAULT_MODEL_NAME,
    DefaultModelNotFoundError,
    default_model_path,
)

__all__ = [
    "DEFAULT_MODEL_NAME",
    "Checkpoint",
    "DefaultModelNotFoundError",
    "GGUFFile",
    "default_model_path",
    "open_checkpoint",
    "read_gguf",
]
