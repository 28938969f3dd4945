"""The CPU kernels of ``csrc/``: built on first use, loaded with ctypes.

The C sources, one per concern (``matmul.c``: packed-weight matrix products, and
``matmul_stored.c`` for the types read as GGUF stores them;
``attention.c``: paged decode attention; ``elementwise.c``: fused RMSNorm, rotary,
SiLU-and-mul; ``decode_step.c``: all layers of a decode step in one call; ``bitmask.c``:
structured-output token masks; ``abi.c``: what is checked at load; ``common.h``: what they
share), are compiled together by the machine's C compiler (``$CC``, else ``cc``/``gcc``)
into one shared library cached under ``$TOKENMILL_CACHE_DIR`` (default
``~/.cache/tokenmill/kernels``), named by a hash of every source and header, the flags and
the CPU, so it is built once per machine (a few seconds). ``-march=native`` is safe
because the library never leaves the machine that built it; the C code picks AVX-512
VNNI, AVX2 or portable paths from what the compiler targets (``TOKENMILL_KERNEL_ISA=avx2``
holds it to AVX2, ``=avxvnni`` to 256-bit VNNI). It is linked with ``-fopenmp`` and loaded
after torch, so its parallel loops share the OpenMP runtime (and thread count) torch uses.

Without a compiler, or with ``TOKENMILL_NO_KERNELS=1``, ``kernels()`` returns None and
callers take their pure-torch path.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

logger = logging.getLogger("tokenmill")

_SOURCE_DIR = Path(__file__).with_name("csrc")
_FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c11")
_ABI_VERSION = 10  # TM_ABI_VERSION in csrc/common.h


def _sources() -> list[Path]:
    """The C files compiled into the library, in a fixed order."""
    return sorted(_SOURCE_DIR.glob("*.c"))


def _source_digest() -> bytes:
    """Every source and header, by name and content: any change gives a new library."""
    h = hashlib.sha256()
    for path in sorted(_SOURCE_DIR.glob("*.[ch]")):
        h.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return h.digest()


MAX_SEGMENTS = 3  # TM_MAX_SEGMENTS in csrc/common.h


class TmSegment(ctypes.Structure):
    """C ``tm_segment`` (csrc/common.h): rows of a packed matrix in one ggml type."""

    _fields_ = [("qtype", ctypes.c_int64), ("data", ctypes.c_void_p), ("rows", ctypes.c_int64)]


class TmWeight(ctypes.Structure):
    """C ``tm_weight`` (csrc/common.h): a packed matrix as up to ``MAX_SEGMENTS`` row
    ranges stacked in order, each with its own type."""

    _fields_ = [("nseg", ctypes.c_int64), ("seg", TmSegment * MAX_SEGMENTS)]

    @classmethod
    def of(cls, parts: list[tuple[int, torch.Tensor, int]]) -> TmWeight:
        """From ``(qtype, data, rows)`` per segment (the tensors must outlive it)."""
        if not 1 <= len(parts) <= MAX_SEGMENTS:
            raise ValueError(f"a packed matrix has 1 to {MAX_SEGMENTS} segments, not {len(parts)}")
        w = cls(nseg=len(parts))
        for i, (qtype, data, rows) in enumerate(parts):
            w.seg[i] = TmSegment(qtype=qtype, data=data.data_ptr(), rows=rows)
        return w


class TmLayer(ctypes.Structure):
    """C ``tm_layer`` (csrc/common.h): one decoder layer for ``tm_decode_layers``, as
    pointers to float32 tensors (norm weights, the q/k/v bias if any, rotary tables),
    packed weights, and the layer's K/V caches. Field for field the C struct; its size is
    checked at load."""

    _fields_ = [
        ("ln1", ctypes.c_void_p),        # RMSNorm weight before attention
        ("ln2", ctypes.c_void_p),        # RMSNorm weight before the MLP
        ("qkv", TmWeight),
        ("qkv_bias", ctypes.c_void_p),   # float32 [q + k + v rows], or None (NULL)
        ("o", TmWeight),
        ("gate_up", TmWeight),
        ("down", TmWeight),
        ("cos", ctypes.c_void_p),        # rotary tables [max positions, head_dim / 2]
        ("sin", ctypes.c_void_p),
        ("k_cache", ctypes.c_void_p),    # [slots, KV heads, head_dim], float32 or float16
        ("v_cache", ctypes.c_void_p),
    ]


def _cpu_id() -> str:
    """The CPU model and flags, so a cache shared across machines never mixes builds."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    lines = [ln for ln in text.splitlines() if ln.startswith(("model name", "flags"))]
    return "\n".join(sorted(set(lines)))


def _compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return name
    return None


def _build(cc: str, flags: tuple[str, ...], out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        tmp_lib = Path(tmp) / out.name
        subprocess.run([cc, *flags, *map(str, _sources()), "-o", str(tmp_lib), "-lm"],
                       check=True, capture_output=True, text=True)
        os.replace(tmp_lib, out)  # atomic: concurrent builders never see half a file


class CPUKernels:
    """ctypes bindings of the C functions, taking torch tensors."""

    def __init__(self, lib: ctypes.CDLL) -> None:
        self.lib = lib
        i64, ptr = ctypes.c_int64, ctypes.c_void_p
        if lib.tm_abi_version() != _ABI_VERSION:
            raise RuntimeError("stale kernel library")
        lib.tm_layer_size.restype = i64
        if lib.tm_layer_size() != ctypes.sizeof(TmLayer):
            raise RuntimeError(f"TmLayer is {ctypes.sizeof(TmLayer)} bytes, C tm_layer "
                               f"{lib.tm_layer_size()}: update one to match the other")
        lib.tm_gemm.argtypes = [ctypes.c_int, ptr, i64, i64, ptr, i64, ptr]
        lib.tm_gemm_weight.argtypes = [ctypes.POINTER(TmWeight), ptr, i64, i64, ptr]
        lib.tm_dequant.argtypes = [ctypes.c_int, ptr, i64, i64, ptr]
        lib.tm_dequant_rows.argtypes = [ctypes.c_int, ptr, i64, i64, ptr, i64, ptr]
        lib.tm_pack_layout.argtypes = [ctypes.c_int, ptr, i64, i64]
        lib.tm_interleaved.argtypes = [i64]
        lib.tm_round_activations.argtypes = [ptr, i64, i64, ptr]
        lib.tm_paged_decode_attention.argtypes = [ptr, ptr, ptr, ptr, i64, ptr, i64, i64, i64,
                                                  i64, i64, ctypes.c_float, ptr, ctypes.c_int]
        lib.tm_rms_norm.argtypes = [ptr, ptr, ptr, i64, i64, ctypes.c_float, ptr]
        lib.tm_rope.argtypes = [ptr, i64, i64, i64, i64, ptr, ptr, ptr]
        lib.tm_silu_and_mul.argtypes = [ptr, i64, i64, ptr]
        lib.tm_apply_token_bitmask.argtypes = [ptr, i64, ptr, i64, ptr, i64, i64]
        f32, c_int = ctypes.c_float, ctypes.c_int
        lib.tm_decode_layers.argtypes = [
            i64, ctypes.POINTER(TmLayer),            # L, layers
            i64, i64, i64, i64, i64, i64,            # T, H, NH, KVH, D, I
            ptr, ptr, f32,                           # x, residual, eps
            ptr, ptr, ptr, i64, ptr, i64, f32,       # positions, slots, block table, max
            c_int]                                   # blocks, lens, bs, scale; float16 KV
        self.has_avx2 = bool(lib.tm_has_avx2())
        self.has_vnni = bool(lib.tm_has_vnni())  # AVX-512 VNNI
        self.has_avx_vnni = bool(lib.tm_has_avx_vnni())  # AVX-VNNI (256-bit) without AVX-512

    def pack_layout(self, qtype: int, w: torch.Tensor, n: int, k: int) -> None:
        """In place: an [n, K] matrix in the regrouped row layout (``regroup_rows``) -> the
        layout ``gemm`` reads: groups of 16 interleaved rows where the build has VNNI
        (AVX-512's or AVX-VNNI) and n % 16 == 0, else unchanged (see csrc/matmul.c)."""
        if self.lib.tm_pack_layout(qtype, w.data_ptr(), n, k):
            raise RuntimeError(f"tm_pack_layout failed for type {qtype}, K={k}")

    def interleaved(self, n: int) -> bool:
        """Does ``pack_layout`` interleave a matrix of n rows?"""
        return bool(self.lib.tm_interleaved(n))

    def gemm(self, qtype: int, x: torch.Tensor, w: torch.Tensor, n: int) -> torch.Tensor:
        """``x [M, K]`` float32 contiguous, ``w`` an [n, K] matrix in the kernels' layout
        (``pack_layout``); x is rounded to 8 bits per block of 32 on the way (see
        csrc/matmul.c)."""
        m, k = x.shape
        y = torch.empty(m, n, dtype=torch.float32)
        rc = self.lib.tm_gemm(qtype, x.data_ptr(), m, k, w.data_ptr(), n, y.data_ptr())
        if rc:
            raise RuntimeError(f"tm_gemm failed ({rc}) for type {qtype}, K={k}")
        return y

    def gemm_weight(self, w: TmWeight, x: torch.Tensor) -> torch.Tensor:
        """``gemm`` for a matrix held as segments (``TmWeight``): y [M, total rows]; the
        activations are rounded once for all of them."""
        m, k = x.shape
        n = sum(w.seg[i].rows for i in range(w.nseg))
        y = torch.empty(m, n, dtype=torch.float32)
        rc = self.lib.tm_gemm_weight(ctypes.byref(w), x.data_ptr(), m, k, y.data_ptr())
        if rc:
            raise RuntimeError(f"tm_gemm_weight failed ({rc}) for K={k}")
        return y

    def round_activations(self, x: torch.Tensor) -> torch.Tensor:
        """x [M, K] rounded to 8 bits per block of 32, exactly as ``gemm`` rounds it."""
        out = torch.empty_like(x)
        if self.lib.tm_round_activations(x.data_ptr(), x.shape[0], x.shape[1], out.data_ptr()):
            raise RuntimeError("tm_round_activations needs K % 32 == 0")
        return out

    def dequant_rows(self, qtype: int, w: torch.Tensor, n: int, k: int,
                     ids: torch.Tensor) -> torch.Tensor:
        """Rows ``ids`` (int64) of an [n, k] matrix in the kernels' layout, as float32."""
        ids = ids.reshape(-1).to(torch.int64).contiguous()
        out = torch.empty(ids.numel(), k, dtype=torch.float32)
        rc = self.lib.tm_dequant_rows(qtype, w.data_ptr(), n, k, ids.data_ptr(), ids.numel(),
                                      out.data_ptr())
        if rc == -3:
            raise IndexError(f"row index out of range [0, {n})")
        if rc:
            raise RuntimeError(f"tm_dequant_rows failed ({rc}) for type {qtype}, K={k}")
        return out

    def dequant(self, qtype: int, w: torch.Tensor, n: int, k: int,
                out: torch.Tensor | None = None) -> torch.Tensor:
        if out is None:
            out = torch.empty(n, k, dtype=torch.float32)
        rc = self.lib.tm_dequant(qtype, w.data_ptr(), n, k, out.data_ptr())
        if rc:
            raise RuntimeError(f"tm_dequant failed ({rc}) for type {qtype}, K={k}")
        return out

    def paged_decode_attention(self, q: torch.Tensor, k_cache: torch.Tensor,
                               v_cache: torch.Tensor, block_table: torch.Tensor,
                               seq_lens: torch.Tensor, block_size: int,
                               scale: float) -> torch.Tensor:
        """q [n, H, D] float32; caches [slots, KVH, D] (float32 or float16, contiguous);
        block_table [n, max_blocks] and seq_lens [n] int64. Returns [n, H, D]."""
        n, h, d = q.shape
        out = torch.empty_like(q)
        rc = self.lib.tm_paged_decode_attention(
            q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), block_table.data_ptr(),
            block_table.shape[1], seq_lens.data_ptr(), n, h, k_cache.shape[1], d, block_size,
            scale, out.data_ptr(), int(k_cache.dtype == torch.float16))
        if rc:
            raise RuntimeError(f"tm_paged_decode_attention failed ({rc})")
        return out

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float,
                 residual: torch.Tensor | None = None) -> torch.Tensor:
        """norm(x) * weight; with ``residual``: residual += x in place, then
        norm(residual) * weight. All float32, contiguous [T, N]."""
        t, n = x.shape
        out = torch.empty_like(x)
        self.lib.tm_rms_norm(x.data_ptr(), None if residual is None else residual.data_ptr(),
                             weight.data_ptr(), t, n, eps, out.data_ptr())
        return out

    def rope_(self, x: torch.Tensor, heads: int, head_dim: int, positions: torch.Tensor,
              cos: torch.Tensor, sin: torch.Tensor) -> None:
        """Rotates, in place, the first ``heads`` heads of each row of ``x`` [T, W]
        (row-contiguous); cos/sin tables [max_pos, head_dim / 2], positions int64 [T]."""
        self.lib.tm_rope(x.data_ptr(), x.shape[0], x.stride(0), heads, head_dim,
                         positions.data_ptr(), cos.data_ptr(), sin.data_ptr())

    def apply_token_bitmask(self, logits: torch.Tensor, bitmask: torch.Tensor,
                            rows: torch.Tensor, vocab: int) -> None:
        """In place: ``logits[r, t] = -inf`` where bit t of ``bitmask[r]`` is 0, for r in
        ``rows`` (int64). logits float32 [R, >= vocab] with unit column stride; bitmask
        int32 [>= R, ceil(vocab / 32)] contiguous."""
        self.lib.tm_apply_token_bitmask(logits.data_ptr(), logits.stride(0),
                                        bitmask.data_ptr(), bitmask.shape[1], rows.data_ptr(),
                                        rows.numel(), vocab)

    def silu_and_mul(self, x: torch.Tensor) -> torch.Tensor:
        t, w = x.shape
        out = torch.empty(t, w // 2, dtype=x.dtype)
        self.lib.tm_silu_and_mul(x.data_ptr(), t, w // 2, out.data_ptr())
        return out


# TOKENMILL_KERNEL_ISA=avx2 builds without AVX-512 and AVX-VNNI (the AVX2 kernels on a
# newer CPU), =avxvnni without AVX-512 (the 256-bit VNNI kernels of Intel client CPUs):
# for comparisons and tests; anything else, or unset, uses everything the CPU has.
_ISA_FLAGS = {"avx2": ("-mno-avx512f", "-mno-avxvnni"), "avxvnni": ("-mno-avx512f",)}


def build_kernels(extra_flags: tuple[str, ...] = ()) -> CPUKernels:
    """Compiles (once per source, flags and CPU: cached on disk) and loads the kernels.
    Raises OSError / CalledProcessError / RuntimeError when that fails."""
    cc = _compiler()
    if cc is None:
        raise OSError("no C compiler found (install gcc)")
    flags = (*_FLAGS, *extra_flags)
    key = hashlib.sha256(_source_digest() + " ".join((cc, *flags)).encode()
                         + _cpu_id().encode()).hexdigest()[:16]
    cache = Path(os.environ.get("TOKENMILL_CACHE_DIR",
                                Path.home() / ".cache" / "tokenmill")) / "kernels"
    lib_path = cache / f"cpu_kernels-{key}.so"
    if not lib_path.exists():
        _build(cc, flags, lib_path)
    return CPUKernels(ctypes.CDLL(str(lib_path)))


@functools.cache
def kernels() -> CPUKernels | None:
    """The compiled kernels, or None where they cannot be built (reason logged once)."""
    if os.environ.get("TOKENMILL_NO_KERNELS") == "1":
        return None
    if _compiler() is None:
        logger.warning("No C compiler found: quantized weights are dequantized at load "
                       "(slower, more memory). Install gcc for the CPU kernels.")
        return None
    try:
        return build_kernels(_ISA_FLAGS.get(os.environ.get("TOKENMILL_KERNEL_ISA", ""), ()))
    except (OSError, subprocess.CalledProcessError, RuntimeError) as e:
        detail = getattr(e, "stderr", "") or str(e)
        logger.warning("CPU kernels unavailable (%s): quantized weights are dequantized at "
                       "load.", detail.strip().splitlines()[-1] if detail.strip() else e)
        return None


def fused_kernels(*tensors: torch.Tensor | None) -> CPUKernels | None:
    """The kernels, if every given tensor suits the fused C ops (2-D, contiguous, float32,
    on the CPU); else None and the caller takes its torch path."""
    k = kernels()
    if k is None:
        return None
    for t in tensors:
        if t is not None and not (t.dtype == torch.float32 and t.device.type == "cpu"
                                  and t.dim() == 2 and t.is_contiguous()):
            return None
    return k
