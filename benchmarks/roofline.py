"""The memory roofline of single-stream decode on this machine, for a GGUF model.

    python benchmarks/roofline.py MODEL.gguf [--threads 2] [--gib 1] [--decode-tok-s X ...]

One decode step of one stream reads every weight the forward pass uses once: every
tensor of the file except the token embedding (only one row of it is read), plus the
embedding when the output head is tied to it. Decode speed can therefore not exceed

    roofline tok/s = DRAM read bandwidth / weight bytes read per token.

The bandwidth is measured here, with ``--threads`` threads (the threads the servers get),
as the best of several passes of ``torch.sum`` over a buffer of ``--gib`` GiB (far larger
than the caches, so every pass streams from DRAM). KV-cache reads are left out: at the
benchmark's 194 tokens they are under 1% of the weights for these models.

``--decode-tok-s`` takes measured single-stream decode speeds (e.g. 1000 / mean TPOT of
``tokenmill bench serve``) and prints each as a share of the roofline. Run it in the same
session as the speed measurement, on a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from gguf import GGUFReader


def weight_bytes_per_token(path: str) -> dict[str, int]:
    """Bytes of weights one decode step reads, and the file's tensor bytes in all."""
    tensors = {t.name: int(t.n_bytes) for t in GGUFReader(path).tensors}
    total = sum(tensors.values())
    tied = "output.weight" not in tensors
    embd = tensors.get("token_embd.weight", 0)
    return {"tensor_bytes": total, "token_embd_bytes": embd, "tied_output": tied,
            "read_per_token": total if tied else total - embd}


def read_bandwidth(threads: int, gib: float, passes: int = 7) -> float:
    """Best-of-``passes`` read bandwidth in bytes/s of a sum over a ``gib`` GiB buffer."""
    torch.set_num_threads(threads)
    x = torch.ones(int(gib * 2**30) // 4, dtype=torch.float32)
    x.sum()  # first touch and warm-up
    best = float("inf")
    for _ in range(passes):
        t = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - t)
    return x.numel() * 4 / best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--gib", type=float, default=1.0)
    p.add_argument("--decode-tok-s", type=float, nargs="*", default=[])
    a = p.parse_args()
    w = weight_bytes_per_token(a.model)
    bw = read_bandwidth(a.threads, a.gib)
    roof = bw / w["read_per_token"]
    out = {**w, "threads": a.threads, "read_bandwidth_gb_s": round(bw / 1e9, 2),
           "roofline_tok_s": round(roof, 1),
           "share_of_roofline": {str(s): round(s / roof, 3) for s in a.decode_tok_s}}
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
