"""Packed-weight matmul vs float32 F.linear on the default model's shapes.

    python benchmarks/packed_linear.py [--rows 1,4,16,32,64,128,512]

For each matrix of SmolLM2-135M (qkv, o, gate_up, down in Q4_1; the tied LM head in
Q8_0) and each row count M, prints microseconds per call of the C kernel (``tm_gemm``,
the default ``--quantization auto`` path) and of F.linear on a resident float32 weight
(``--quantization none``), and the weight bytes the kernel reads per second.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from tokenmill.kernels.cpu import kernels
from tokenmill.layers.quantization import PACKED_BLOCK_BYTES, regroup_rows

SHAPES = [("qkv", 960, 576, 3), ("o", 576, 576, 3), ("gate_up", 3072, 576, 3),
          ("down", 576, 1536, 3), ("lm_head", 49152, 576, 8)]


def timed(fn, reps: int) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - start) / reps * 1e6


def random_packed(n: int, k: int, qtype: int) -> torch.Tensor:
    blocks = torch.randint(0, 256, (n, k // 32, PACKED_BLOCK_BYTES[qtype]), dtype=torch.uint8)
    blocks[..., :4] = torch.tensor([0.01, -0.05]).half().view(torch.uint8)  # d (and m)
    w = regroup_rows(qtype, blocks.view(n, -1))
    kernels().pack_layout(qtype, w, n, k)
    return w


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", default="1,4,16,32,64,128,512")
    ap.add_argument("--reps", type=int, default=50)
    args = ap.parse_args()
    k = kernels()
    if k is None:
        raise SystemExit("the CPU kernels did not build (no C compiler?)")
    print(f"torch threads: {torch.get_num_threads()}, AVX2 kernels: {k.has_avx2}, "
          f"AVX-512 VNNI kernels: {k.has_vnni}")
    print(f"{'matrix':8} {'M':>4} {'kernel us':>10} {'fp32 BLAS us':>13} {'kernel GB/s':>12}")
    for name, n, kdim, qtype in SHAPES:
        w = random_packed(n, kdim, qtype)
        dense = k.dequant(qtype, w, n, kdim)
        reps = max(3, args.reps // (8 if name == "lm_head" else 1))
        for m in (int(r) for r in args.rows.split(",")):
            x = torch.randn(m, kdim)
            t_kernel = timed(lambda x=x, w=w, n=n, q=qtype: k.gemm(q, x, w, n), reps)
            t_dense = timed(lambda x=x, d=dense: F.linear(x, d), reps)
            print(f"{name:8} {m:>4} {t_kernel:>10.0f} {t_dense:>13.0f} "
                  f"{w.numel() / t_kernel / 1e3:>12.1f}")


if __name__ == "__main__":
    main()
