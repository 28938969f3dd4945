"""Float matrices -> GGUF blocks (``QuantizedTensor``), for quantizing a model at load.

``quantize(w, qtype)`` takes a 2-D float tensor ``[rows, cols]`` and returns its rows as
blocks of ``qtype``, byte for byte the layout a GGUF file stores, so everything that
reads GGUF blocks (the packed C kernels, ``dequantize``, gguf-py) reads them.

* Q8_0, Q4_0, Q5_0: gguf-py's quantizers (``gguf.quants.quantize``; numpy, written to
  give the same bytes as llama.cpp's reference ``quantize_row_*_ref``): Q8_0 is
  ``d = max|x| / 127``, ``q = round(x / d)``; Q4_0/Q5_0 take ``d = x_absmax / -8``
  (``/ -16``), ``q = trunc(x / d + 8.5)`` clipped to 4 (5) bits.
* Q4_K: gguf-py has no quantizer for it, so it is written here in torch, vectorized
  over all sub-blocks at once: llama.cpp's ``quantize_row_q4_K_ref`` (what
  ``llama-quantize`` runs without an importance matrix). Per sub-block of 32 weights,
  ``make_qkx2_quants`` searches a scale and a min: weights ``w_i = rms(x) + |x_i|``,
  21 candidate scales ``(15 + -1 + 0.1 s) / (max - min)``, s = 0..20, each followed by
  the weighted least-squares scale and min for its rounded levels; the candidate with the
  smallest weighted squared error wins (min clamped to <= 0). The 8 scales and 8 mins of a
  super-block of 256 are then stored as 6-bit multiples of fp16 ``d = max scale / 63``
  and ``dmin = max min / 63``, and the weights re-rounded against those stored values:
  ``x ~ d * sc_j * q - dmin * m_j``, q in 0..15. Differences from llama.cpp's C: float
  sums run in another order, so a near-tie between two candidates may fall the other way.

Measured error (relative RMS, ``|deq(q(x)) - x| / |x|``, for Gaussian weights; the tests
hold these bounds): Q8_0 about 0.4%, Q4_0 about 11%, Q5_0 about 5.5%, Q4_K about 9%.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from tokenmill.gguf.quant_types import BLOCK_WEIGHTS, QTYPE_NAMES, QuantizedTensor, row_bytes

__all__ = ["Q4_0", "Q4_K", "Q5_0", "Q8_0", "QUANTIZABLE", "quantize"]

Q4_0, Q5_0, Q8_0, Q4_K = 2, 6, 8, 12
QUANTIZABLE = frozenset({Q4_0, Q5_0, Q8_0, Q4_K})

# Q4_K super-blocks quantized per torch call (temporaries of a few MiB each)
_Q4_K_CHUNK = 2048
# the scale search of a Q4_K sub-block: llama.cpp's is rmin=-1, rdelta=0.1, nstep=20 (21
# candidates from 14 to 16 levels); ours tries 6 (14, 14.4, ..., 16): 3x faster, its RMS
# error about 1% larger (0.0713 against 0.0706 of the weights' RMS before the 6-bit
# scales, Gaussian weights; tests/loader/test_quantize.py compares the two)
Q4_K_SEARCH = dict(rmin=-1.0, rdelta=0.4, nstep=5)
LLAMA_CPP_Q4_K_SEARCH = dict(rmin=-1.0, rdelta=0.1, nstep=20)


def quantize(w: torch.Tensor, qtype: int) -> QuantizedTensor:
    """``w`` ([rows, cols], any float dtype; cols a multiple of the block size) as GGUF
    blocks of ``qtype`` (one of ``QUANTIZABLE``)."""
    if qtype not in QUANTIZABLE:
        raise ValueError(f"cannot quantize to ggml type {QTYPE_NAMES.get(qtype, qtype)}; "
                         f"one of {', '.join(QTYPE_NAMES[q] for q in sorted(QUANTIZABLE))}")
    if w.dim() != 2:
        raise ValueError(f"quantize takes a matrix, got shape {tuple(w.shape)}")
    rows, cols = w.shape
    if cols % BLOCK_WEIGHTS[qtype]:
        raise ValueError(f"a {QTYPE_NAMES[qtype]} row of {cols} weights is not whole blocks "
                         f"of {BLOCK_WEIGHTS[qtype]}")
    x = w.detach().to(torch.float32).contiguous()
    if qtype == Q4_K:
        data = _q4_k(x.view(-1, 256)).view(rows, row_bytes(qtype, cols))
    else:
        data = torch.from_numpy(np.ascontiguousarray(_gguf_quantize(x.numpy(), qtype)))
    return QuantizedTensor(qtype, data.view(rows, row_bytes(qtype, cols)), (rows, cols))


def _gguf_quantize(x: np.ndarray, qtype: int) -> np.ndarray:
    import gguf.quants
    from gguf import GGMLQuantizationType

    return gguf.quants.quantize(x, GGMLQuantizationType(qtype))


# ---- Q4_K -----------------------------------------------------------------------------
def _q4_k(x: torch.Tensor) -> torch.Tensor:
    """Super-blocks ``[n, 256]`` float32 -> Q4_K blocks ``[n, 144]`` uint8.

    Chunks of ``_Q4_K_CHUNK`` super-blocks are quantized by a pool of as many Python
    threads as torch has (torch ops release the GIL), each op single-threaded: the ops
    are small, and on a busy machine an OpenMP barrier per op stalled for other
    processes' time slices (10x slower with 2 threads than with 1, measured)."""
    out = torch.empty(x.shape[0], 144, dtype=torch.uint8)
    starts = range(0, x.shape[0], _Q4_K_CHUNK)

    def run(start: int) -> None:
        stop = min(start + _Q4_K_CHUNK, x.shape[0])
        out[start:stop] = _q4_k_chunk(x[start:stop])

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with ThreadPoolExecutor(max_workers=max(1, min(threads, len(starts)))) as pool:
            list(pool.map(run, starts))
    finally:
        torch.set_num_threads(threads)
    return out


def _q4_k_chunk(x: torch.Tensor) -> torch.Tensor:
    n = x.shape[0]
    sub = x.view(n, 8, 32)
    weights = sub.pow(2).mean(-1, keepdim=True).sqrt() + sub.abs()
    scales, mins, levels = make_qkx2_quants(sub, weights, nmax=15, **Q4_K_SEARCH)
    max_scale, max_min = scales.amax(-1, keepdim=True), mins.amax(-1, keepdim=True)
    inv_scale = torch.where(max_scale > 0, 63.0 / max_scale, torch.zeros_like(max_scale))
    inv_min = torch.where(max_min > 0, 63.0 / max_min, torch.zeros_like(max_min))
    ls = torch.round(inv_scale * scales).clamp(0, 63).to(torch.uint8)  # [n, 8]
    lm = torch.round(inv_min * mins).clamp(0, 63).to(torch.uint8)
    d = (max_scale / 63).to(torch.float16)  # [n, 1]
    dmin = (max_min / 63).to(torch.float16)
    # re-round every weight against the scale and min as stored
    sd = (d.float() * ls.float()).unsqueeze(-1)  # [n, 8, 1]
    sm = (dmin.float() * lm.float()).unsqueeze(-1)
    safe = torch.where(sd != 0, sd, torch.ones_like(sd))
    requant = torch.round((sub + sm) / safe).clamp_(0, 15).to(torch.uint8)
    q = torch.where(sd != 0, requant, levels)  # llama.cpp keeps the search's levels there
    return _pack_q4_k(d, dmin, ls, lm, q)


def make_qkx2_quants(x: torch.Tensor, w: torch.Tensor, nmax: int, rmin: float,
                     rdelta: float, nstep: int
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """llama.cpp's ``make_qkx2_quants`` for every sub-block ``x [..., 32]`` at once, with
    weights ``w``: returns (scale, -min, levels uint8) with ``x ~ scale * levels + min``,
    min <= 0. Candidate k = nmax + rmin + rdelta * s (s = 0..nstep) rounds
    ``k (x - min) / (max - min)``; each candidate's least-squares scale and min and its
    weighted squared error come from five weighted sums (the error expanded in them), and
    the levels of the best candidate are rounded again once at the end."""
    mn = x.amin(-1, keepdim=True).clamp(max=0)
    mx = x.amax(-1, keepdim=True)
    flat = mx == mn
    span = torch.where(flat, torch.ones_like(mx), mx - mn)
    t = (x - mn) / span
    wx = w * x
    sum_w, sum_x = w.sum(-1, keepdim=True), wx.sum(-1, keepdim=True)
    sum_x2 = (wx * x).sum(-1, keepdim=True)

    def level_sums(k: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        c = torch.round(t * k).clamp_(0, nmax)
        wc = w * c
        return (wc.sum(-1, keepdim=True), (wc * c).sum(-1, keepdim=True),
                (wx * c).sum(-1, keepdim=True))

    def error(s: torch.Tensor, m: torch.Tensor, sum_l: torch.Tensor, sum_l2: torch.Tensor,
              sum_xl: torch.Tensor) -> torch.Tensor:  # sum w (s l + m - x)^2
        return (s * s * sum_l2 + 2 * s * m * sum_l - 2 * s * sum_xl + m * m * sum_w
                - 2 * m * sum_x + sum_x2)

    scale, the_min = span / nmax, mn
    best = error(scale, mn, *level_sums(float(nmax)))
    best_k = torch.full_like(mn, float(nmax))
    for step in range(nstep + 1):
        k = rmin + rdelta * step + nmax
        sum_l, sum_l2, sum_xl = level_sums(k)
        det = sum_w * sum_l2 - sum_l * sum_l
        ok = det > 0
        safe_det = torch.where(ok, det, torch.ones_like(det))
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / safe_det
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / safe_det
        positive = this_min > 0  # then the min is pinned to 0: scale = sum_xl / sum_l2
        this_scale = torch.where(positive, sum_xl / torch.where(ok, sum_l2, 1.0),
                                 this_scale)
        this_min = torch.where(positive, torch.zeros_like(this_min), this_min)
        err = error(this_scale, this_min, sum_l, sum_l2, sum_xl)
        better = ok & (err < best)
        best = torch.where(better, err, best)
        scale = torch.where(better, this_scale, scale)
        the_min = torch.where(better, this_min, the_min)
        best_k = torch.where(better, k, best_k)
    levels = torch.round(t * best_k).clamp_(0, nmax)
    # all-equal sub-blocks: scale 0, levels 0, the value carried by the min alone
    scale = torch.where(flat, torch.zeros_like(scale), scale)
    levels = torch.where(flat, torch.zeros_like(levels), levels)
    the_min = torch.where(flat, mn, the_min)
    return scale.squeeze(-1), -the_min.squeeze(-1), levels.to(torch.uint8)


def _pack_q4_k(d: torch.Tensor, dmin: torch.Tensor, ls: torch.Tensor, lm: torch.Tensor,
               q: torch.Tensor) -> torch.Tensor:
    """Q4_K block bytes: d, dmin (fp16), 12 bytes of 6-bit scales/mins, 128 of nibbles.

    Scales and mins 0-3 take the low 6 bits of bytes 0-3 and 4-7; for j = 4..7 the low
    4 bits go to byte 8 + (j - 4) (scale low nibble, min high nibble) and the top 2 bits
    to bits 6-7 of bytes j - 4 (scale) and j (min). Nibbles: 4 groups of 32 bytes, the
    low nibble from sub-block 2g, the high one from 2g + 1."""
    n = q.shape[0]
    lo_s, hi_s, lo_m, hi_m = ls[:, :4], ls[:, 4:], lm[:, :4], lm[:, 4:]
    packed_scales = torch.cat([lo_s | ((hi_s >> 4) << 6), lo_m | ((hi_m >> 4) << 6),
                               (hi_s & 0x0F) | ((hi_m & 0x0F) << 4)], dim=1)
    pairs = q.view(n, 4, 2, 32)
    qs = (pairs[:, :, 0] | (pairs[:, :, 1] << 4)).reshape(n, 128)
    return torch.cat([d.view(torch.uint8), dmin.view(torch.uint8), packed_scales, qs], dim=1)
