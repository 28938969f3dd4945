"""The engine's flags, written once: ``EngineArgs``.

Each field carries its type, default and help. From it come the command-line flags of
``tokenmill generate | chat | serve | bench`` (``add_cli_args`` / ``from_cli_args``), the
keyword arguments of ``LLM(...)`` and ``AsyncEngine.from_flags(...)`` (the same names),
and the README's table of engine flags (``markdown_table``; a test keeps the README equal
to it). Values are checked where they are turned into the typed configs
(``tokenmill.config.EngineConfig.from_args``), so a bad value fails the same way from
every front.

A leaf module: it imports nothing of tokenmill and no torch, so ``tokenmill --help``
stays fast.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from typing import Any


def _flag(default: Any, help: str, *, choices: tuple[str, ...] | None = None,
          cli: str | None = None, shown: str | None = None, on_cli: bool = True) -> Any:
    """A field with its help text; ``cli`` names a negating flag for a True-by-default
    bool (``--no-...``); ``shown`` is the default as the docs show it."""
    return field(default=default, metadata=dict(help=help, choices=choices, cli=cli,
                                                shown=shown, on_cli=on_cli))


@dataclass(frozen=True)
class EngineArgs:
    """Every engine flag, with the defaults a user gets when it is not given."""

    model: str | None = _flag(
        None, "HF folder (config.json + safetensors + tokenizer.json) or .gguf file",
        shown="embedded SmolLM2-135M-Instruct")
    tokenizer: str | None = _flag(None, "tokenizer folder or GGUF", shown="the model")
    dtype: str = _flag("auto", "float32, bfloat16, float16; auto: float32 on CPU, "
                               "bfloat16 on GPU")
    load_format: str = _flag("auto", "dummy: random weights from config.json alone, for "
                                     "benchmarks", choices=("auto", "dummy"))
    quantization: str = _flag(
        "auto", "auto: on CPU, GGUF matrices in Q4_0/Q4_1/Q5_0/Q5_1/Q8_0, the K-quants "
                "(Q2_K..Q6_K) and IQ4_NL/IQ4_XS stay packed and C kernels multiply them "
                "(activations rounded to 8 bits per block of 32, as llama.cpp does); none: "
                "dequantize every weight to --dtype at load (float32 math, matches "
                "transformers); q8_0, q4_0, q4_k: quantize a Hugging Face folder's linear "
                "weights at load (q4_k: Q5_0 for rows not whole blocks of 256; the output "
                "head, or an embedding table tied to it, Q8_0; other embeddings and norms "
                "stay float) and run them on those kernels",
        choices=("auto", "none", "q8_0", "q4_0", "q4_k"))
    kv_cache_memory: str = _flag(
        "auto", "size of the paged KV pool, e.g. 2GiB or 512MiB; auto: half the memory "
                "available once the model is loaded (less a GGUF file's mapped weights; "
                "on a GPU 80% of the free memory), at most what --max-num-seqs requests "
                "of full length use; the start-up line says how many fit")
    kv_cache_dtype: str = _flag(
        "auto", "auto: float16 where the weights stay packed on CPU (a GGUF, as llama.cpp "
                "caches, or --quantization q8_0/q4_0/q4_k), else the model dtype; float16 / "
                "float32 (CPU)",
        choices=("auto", "float16", "float32"))
    block_size: int = _flag(16, "tokens per KV block")
    max_model_len: int | None = _flag(None, "longest prompt + output",
                                      shown="model's context, capped by the pool")
    max_num_seqs: int = _flag(128, "requests running at once")
    max_num_batched_tokens: int = _flag(512, "token budget per step (prefill chunk size)")
    enable_chunked_prefill: bool = _flag(True, "admit prompts whole instead of in chunks",
                                         cli="--no-chunked-prefill", shown="off")
    enable_prefix_caching: bool = _flag(True, "turn off the radix prefix cache",
                                        cli="--no-prefix-caching", shown="off")
    scheduling_policy: str = _flag(
        "fcfs", "lpm: longest cached prefix first among equal priorities (with a "
                "starvation guard)", choices=("fcfs", "lpm"))
    seed: int = _flag(0, "engine seed for unseeded sampling")
    device: str = _flag("cpu", "cpu, cuda or cuda:N (the GPU path: Triton attention)")
    task: str = _flag(
        "auto", "what the model is served for: generate (completions, chat) or embed "
                "(/v1/embeddings, /v1/score, /rerank; encoders such as BERT); auto: embed "
                "for encoder architectures, else generate",
        choices=("auto", "generate", "embed"))
    skip_tokenizer_init: bool = _flag(False, "run without a tokenizer (token ids only)",
                                      on_cli=False)
    speculative_config: str | dict | None = _flag(
        None, 'speculative decoding, as JSON in vLLM\'s shape: {"method": "ngram", '
              '"num_speculative_tokens": 4, "prompt_lookup_min": 2, "prompt_lookup_max": 4} '
              'or {"method": "suffix", "num_speculative_tokens": 8} or {"method": "draft_model", '
              '"model": PATH, "num_speculative_tokens": 4}; greedy and sampled '
              'outputs keep the target\'s distribution exactly', shown="off")
    # ---- scale-out (tokenmill.replicas) -------------------------------------------------
    data_parallel_size: int = _flag(
        1, "engine replicas, each in its own process pinned to its share of the cores, "
           "behind one server and a router (tokenmill serve only)")
    distributed_executor_backend: str = _flag(
        "mp", "where the replicas run: mp (local processes) or ray (actors on the Ray "
              "cluster found by ray.init(); pip install 'tokenmill[ray]')",
        choices=("mp", "ray"))
    tensor_parallel_size: int = _flag(
        1, "processes one replica's model is sharded over (attention heads and MLP "
           "columns; gloo all-reduce), in lockstep (tokenmill serve only)")

    # ---- the command line -------------------------------------------------------------
    @classmethod
    def add_cli_args(cls, parser: argparse.ArgumentParser) -> None:
        """Adds one ``--flag`` per field to an ``engine`` argument group."""
        group = parser.add_argument_group("engine")
        for f in dataclasses.fields(cls):
            meta = f.metadata
            if not meta["on_cli"]:
                continue
            text = meta["help"].replace("%", "%%")  # argparse %-formats help strings
            if meta["cli"]:  # a negating flag for a True-by-default bool
                group.add_argument(meta["cli"], dest=f.name, action="store_false",
                                   default=f.default, help=text)
                continue
            kind = int if f.type in ("int", "int | None") else str
            group.add_argument(cls.flag_name(f.name), dest=f.name, type=kind,
                               default=f.default, choices=meta["choices"],
                               help=f"{text} (default: {cls._shown(f)})")

    @classmethod
    def from_cli_args(cls, ns: argparse.Namespace) -> EngineArgs:
        return cls(**{f.name: getattr(ns, f.name) for f in dataclasses.fields(cls)
                      if f.metadata["on_cli"]})

    def replace(self, **changes: Any) -> EngineArgs:
        return dataclasses.replace(self, **changes)

    # ---- documentation ----------------------------------------------------------------
    @staticmethod
    def flag_name(name: str) -> str:
        return "--" + name.replace("_", "-")

    @staticmethod
    def _shown(f: dataclasses.Field) -> str:
        return f.metadata["shown"] or str(f.default)

    @classmethod
    def markdown_table(cls) -> str:
        """The README's table of engine flags."""
        lines = ["| flag | default | meaning |", "|---|---|---|"]
        for f in dataclasses.fields(cls):
            meta = f.metadata
            if not meta["on_cli"]:
                continue
            flag = meta["cli"] or cls.flag_name(f.name)
            lines.append(f"| `{flag}` | {cls._shown(f)} | {meta['help']} |")
        return "\n".join(lines)
