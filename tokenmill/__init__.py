"""tokenmill: a readable LLM inference and serving engine.

``LLM``, ``SamplingParams`` and the output types are imported on first use, so that
``tokenmill --help`` (and anything else that imports a light submodule) loads no torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput", "Logprob"]

_LAZY = {
    "LLM": "tokenmill.entrypoints.llm",
    "SamplingParams": "tokenmill.sampling_params",
    "RequestOutput": "tokenmill.outputs",
    "CompletionOutput": "tokenmill.outputs",
    "Logprob": "tokenmill.outputs",
}

if TYPE_CHECKING:
    from tokenmill.entrypoints.llm import LLM
    from tokenmill.outputs import CompletionOutput, Logprob, RequestOutput
    from tokenmill.sampling_params import SamplingParams


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'tokenmill' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
