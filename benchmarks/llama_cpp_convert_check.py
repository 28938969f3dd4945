"""llama.cpp's own converter on the tiny Phi-3, SmolLM3 and MoE models of
``tests/models_arch``: our engine on its GGUF against transformers on the folder.

    python benchmarks/llama_cpp_convert_check.py --llama-cpp DIR [ARCH ...]

DIR is a llama.cpp checkout (``convert_hf_to_gguf.py``, ``conversion/``, ``gguf-py/``),
e.g. ``vendor/llama.cpp`` of the llama-cpp-python 0.3.36 sdist. The tests write their
GGUFs with their own writer (``tests/models_arch/gguf_files.py``); this script checks
that files as llama.cpp's converter writes them (its tensor names, merged expert
tensors, metadata keys, Q/K permutation, Phi-3's rope factor tensors) read the same.
The tiny models have no tokenizer, so the converter's vocabulary step is replaced by a
list of placeholder tokens. Qwen2-MoE is converted without its dense first layer, which
llama.cpp's qwen2moe does not have. Prints MATCH or FAIL per architecture; exits 1 on
any FAIL.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys
import tempfile

import torch


def _placeholder_vocab(self) -> None:
    n = self.hparams["vocab_size"]
    self.gguf_writer.add_tokenizer_model("gpt2")
    self.gguf_writer.add_tokenizer_pre("default")
    self.gguf_writer.add_token_list([f"t{i}" for i in range(n)])
    self.gguf_writer.add_token_types([1] * n)
    self.gguf_writer.add_token_merges([])


def _load_converter(llama_cpp: str):
    # its gguf-py before the installed gguf; the checkout last (it has a tests/ of its own)
    sys.path.insert(0, f"{llama_cpp}/gguf-py")
    sys.path.append(llama_cpp)
    import conversion
    from conversion import ModelBase

    for module in pkgutil.iter_modules(conversion.__path__):
        try:
            importlib.import_module(f"conversion.{module.name}")
        except Exception:  # noqa: BLE001 - a model family whose extra imports are missing
            pass
    stack = [ModelBase]
    while stack:
        cls = stack.pop()
        if "set_vocab" in cls.__dict__:
            cls.set_vocab = _placeholder_vocab
        stack.extend(cls.__subclasses__())
    import convert_hf_to_gguf

    # gguf stays imported (llama.cpp's); its folder leaves the path, as does the
    # "tests" package it carries, so that ours is found
    sys.path[:] = [p for p in sys.path if not p.endswith("gguf-py")]
    for name in [m for m in sys.modules if m == "tests" or m.startswith("tests.")]:
        del sys.modules[name]
    return convert_hf_to_gguf


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--llama-cpp", required=True)
    ap.add_argument("archs", nargs="*")
    args = ap.parse_args()
    converter = _load_converter(args.llama_cpp)  # first: its gguf-py, not the installed one
    import transformers as tf

    from tests.engine.test_hf_parity import hf_greedy
    from tests.models_arch import test_archs as arch_tests

    failed = False
    for arch in args.archs or arch_tests.ARCHS:
        config = arch_tests.CONFIGS[arch]()
        if arch == "qwen2_moe":
            config.mlp_only_layers = []
        torch.manual_seed(1234)
        folder = tempfile.mkdtemp(prefix=f"convert-{arch}-")
        tf.AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(folder)
        out = f"{folder}/model.gguf"
        sys.argv = ["convert_hf_to_gguf.py", folder, "--outfile", out, "--outtype", "f32"]
        converter.main()
        expected = hf_greedy(folder, arch_tests.PROMPTS, arch_tests.NUM_TOKENS)
        try:
            arch_tests.assert_matches(arch_tests.run_ours(out, kv_cache_dtype="float32"),
                                      expected)
            print(f"{arch}: MATCH", flush=True)
        except AssertionError as e:
            failed = True
            print(f"{arch}: FAIL {e}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
