"""Mixture-of-Experts decode speed against dense models of the same total and of the
same active parameter count.

    python benchmarks/moe_speed.py [--quantization q8_0] [--batch-sizes 1,32]
        [--experts 32 --top-k 8 --hidden 2048 --expert-size 768 --layers 2]

Three random-weight models that differ only in their feed-forward blocks (Qwen3
attention, 16 query / 4 KV heads of 128, a 1,024-token vocabulary so the head stays
small):

* ``moe``: ``--experts`` experts of Qwen3-30B-A3B's shape (hidden 2048, expert MLP 768),
  ``--top-k`` per token (Qwen3MoeForCausalLM);
* ``dense-total``: one MLP of ``experts * expert-size``: the same parameter count as all
  the experts (it reads every weight for every token);
* ``dense-active``: one MLP of ``top-k * expert-size``: the parameters one token of the
  MoE reads (the MoE's floor: its routing and per-expert calls are the difference).

For each model and batch size it prints decode tokens/s: B prompts of 16 tokens
generate N tokens each (greedy, no EOS), timed once with N = ``--tokens`` and once with
N = 1, so prefill cancels: B * (N - 1) / (t_N - t_1). At batch 1 a MoE token touches
top-k of the experts, so it should run near ``dense-active`` and far above
``dense-total`` (at most experts / top-k times); at batch 32 most experts are chosen
by some token, so every expert's weights are read once per step (grouped by expert)
and the MoE moves toward ``dense-total``'s bytes but with fewer FLOPs per token.
Weights are quantized at load by ``--quantization`` (packed CPU kernels; ``none``:
float32).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import torch
from safetensors.torch import save_file

from tokenmill import LLM, SamplingParams

VOCAB, HEADS, KV_HEADS, HEAD_DIM = 1024, 16, 4, 128


def write_model(path: str, arch: str, args: argparse.Namespace, intermediate: int) -> None:
    """config.json and random float16 weights (std 0.02, norms 1) for one model."""
    h = args.hidden
    config = {"architectures": [arch], "hidden_size": h, "intermediate_size": intermediate,
              "num_hidden_layers": args.layers, "num_attention_heads": HEADS,
              "num_key_value_heads": KV_HEADS, "head_dim": HEAD_DIM, "vocab_size": VOCAB,
              "max_position_embeddings": 4096, "rms_norm_eps": 1e-6, "rope_theta": 1e6,
              "tie_word_embeddings": False, "hidden_act": "silu", "torch_dtype": "float16"}
    shapes = {"model.embed_tokens.weight": (VOCAB, h), "model.norm.weight": (h,),
              "lm_head.weight": (VOCAB, h)}
    if arch == "Qwen3MoeForCausalLM":
        config.update(num_experts=args.experts, num_experts_per_tok=args.top_k,
                      moe_intermediate_size=args.expert_size, norm_topk_prob=True)
    for i in range(args.layers):
        p = f"model.layers.{i}."
        shapes.update({p + "input_layernorm.weight": (h,),
                       p + "post_attention_layernorm.weight": (h,),
                       p + "self_attn.q_proj.weight": (HEADS * HEAD_DIM, h),
                       p + "self_attn.k_proj.weight": (KV_HEADS * HEAD_DIM, h),
                       p + "self_attn.v_proj.weight": (KV_HEADS * HEAD_DIM, h),
                       p + "self_attn.o_proj.weight": (h, HEADS * HEAD_DIM),
                       p + "self_attn.q_norm.weight": (HEAD_DIM,),
                       p + "self_attn.k_norm.weight": (HEAD_DIM,)})
        if arch == "Qwen3MoeForCausalLM":
            shapes[p + "mlp.gate.weight"] = (args.experts, h)
            mlps = [f"{p}mlp.experts.{e}." for e in range(args.experts)]
            size = args.expert_size
        else:
            mlps, size = [p + "mlp."], intermediate
        for m in mlps:
            shapes.update({m + "gate_proj.weight": (size, h), m + "up_proj.weight": (size, h),
                           m + "down_proj.weight": (h, size)})
    gen = torch.Generator().manual_seed(0)
    weights = {name: (torch.ones(shape) if len(shape) == 1
                      else torch.randn(shape, generator=gen) * 0.02).half()
               for name, shape in shapes.items()}
    save_file(weights, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f)


def decode_tokens_per_s(llm: LLM, batch: int, tokens: int) -> float:
    prompts = [torch.randint(3, VOCAB, (16,), generator=torch.Generator().manual_seed(i))
               .tolist() for i in range(batch)]

    def run(n: int) -> float:
        params = SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)
        start = time.perf_counter()
        llm.generate(prompts, params, use_tqdm=False)
        return time.perf_counter() - start

    run(2)  # warm-up
    return batch * (tokens - 1) / (run(tokens) - run(1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quantization", default="q8_0", choices=["none", "q8_0", "q4_0", "q4_k"])
    ap.add_argument("--batch-sizes", default="1,32")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--experts", type=int, default=32)
    ap.add_argument("--top-k", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--expert-size", type=int, default=768)
    ap.add_argument("--layers", type=int, default=2)
    args = ap.parse_args()
    models = {"moe": ("Qwen3MoeForCausalLM", args.expert_size),
              "dense-total": ("Qwen3ForCausalLM", args.experts * args.expert_size),
              "dense-active": ("Qwen3ForCausalLM", args.top_k * args.expert_size)}
    batches = [int(b) for b in args.batch_sizes.split(",")]
    print(f"torch threads: {torch.get_num_threads()}; {args.layers} layers, hidden "
          f"{args.hidden}, {args.experts} experts of {args.expert_size}, top-{args.top_k}, "
          f"--quantization {args.quantization}; decode tokens/s")
    print(f"{'model':14} {'MLP params/layer':>17}" + "".join(f"{f'B={b}':>10}" for b in batches))
    with tempfile.TemporaryDirectory() as tmp:
        for name, (arch, intermediate) in models.items():
            path = os.path.join(tmp, name)
            os.makedirs(path)
            write_model(path, arch, args, intermediate)
            llm = LLM(path, skip_tokenizer_init=True, quantization=args.quantization,
                      kv_cache_memory="512MiB", max_num_seqs=max(batches), show_progress=False)
            mlp = 3 * args.hidden * (args.experts * args.expert_size if name == "moe"
                                     else intermediate)
            speeds = [decode_tokens_per_s(llm, b, args.tokens) for b in batches]
            print(f"{name:14} {mlp / 1e6:>16.1f}M" + "".join(f"{s:>10.1f}" for s in speeds),
                  flush=True)
            del llm


if __name__ == "__main__":
    main()
