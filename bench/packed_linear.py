"""Packed-weight matmul vs float32 F.linear on the default model's shapes.

    python bench/packed_linear.py [--rows 1,4,16,32,48,64,128]

For each matrix shape of SmolLM2-135M (qkv, o, gate_up, down in Q4_1; the tied LM head
in Q8_0) and each row count M, prints microseconds per call for: the C kernel
(``tm_gemm``), decode-to-float32 + F.linear (what large batches use), and F.linear on a
resident float32 weight (``--quantization none``); and the effective GB/s of weight bytes
read by the kernel. ``KERNEL_MAX_ROWS`` in tokenmill/layers/quantization.py should sit
where the first two cross.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from tokenmill.kernels.cpu import kernels
from tokenmill.layers.quantization import PACKED_BLOCK_BYTES

SHAPES = [("qkv", 960, 576, 3), ("o", 576, 576, 3), ("gate_up", 3072, 576, 3),
          ("down", 576, 1536, 3), ("lm_head", 49152, 576, 8)]


def timed(fn, reps: int) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - start) / reps * 1e6


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", default="1,4,16,32,48,64,128")
    ap.add_argument("--reps", type=int, default=50)
    args = ap.parse_args()
    k = kernels()
    if k is None:
        raise SystemExit("the CPU kernels did not build (no C compiler?)")
    print(f"torch threads: {torch.get_num_threads()}, AVX2 kernels: {k.has_avx2}")
    print(f"{'matrix':8} {'M':>4} {'kernel us':>10} {'decode+BLAS':>12} {'fp32 BLAS':>10} "
          f"{'kernel GB/s':>11}")
    for name, n, kdim, qtype in SHAPES:
        bb = PACKED_BLOCK_BYTES[qtype]
        w = torch.randint(0, 256, (n, kdim // 32, bb), dtype=torch.uint8)
        w[..., :2] = torch.full((n, kdim // 32), 0.01).half().view(torch.uint8).view(
            n, kdim // 32, 2)
        w = w.view(n, -1)
        dense = k.dequant(qtype, w, n, kdim)
        scratch = torch.empty(n, kdim)
        reps = max(3, args.reps // (8 if name == "lm_head" else 1))
        for m in (int(r) for r in args.rows.split(",")):
            x = torch.randn(m, kdim)
            t_kernel = timed(lambda: k.gemm(qtype, x, w, n), reps)
            t_decode = timed(lambda: F.linear(x, k.dequant(qtype, w, n, kdim, out=scratch)),
                             reps)
            t_dense = timed(lambda: F.linear(x, dense), reps)
            print(f"{name:8} {m:>4} {t_kernel:>10.0f} {t_decode:>12.0f} {t_dense:>10.0f} "
                  f"{w.numel() / t_kernel / 1e3:>11.1f}")


if __name__ == "__main__":
    main()
