"""Read a llama.cpp GGUF file and present it as a Hugging Face checkpoint.

GGUF layout (little-endian, versions 2 and 3)::

    "GGUF" | version u32 | n_tensors u64 | n_kv u64
    n_kv x (key: string, type: u32, value)          # metadata, e.g. llama.block_count
    n_tensors x (name: string, n_dims: u32, dims: u64[n_dims], ggml_type: u32, offset: u64)
    padding to `general.alignment` (default 32), then the tensor data

A string is ``u64 length + utf-8 bytes``; an array is ``elem_type u32, count u64, elems``.
We parse the header ourselves: gguf-py's ``GGUFReader`` builds numpy views for every
array element and needs ~6 s for the 100k tokenizer strings of a small model, while this
parser needs ~0.1 s. The tensor data is memory-mapped and dequantized on demand.

Three translations make a GGUF look like an HF checkpoint:

1. Metadata -> ``config.json`` keys (``_hf_config``).
2. Tensor names ``blk.N.attn_q.weight`` -> ``model.layers.N.self_attn.q_proj.weight``.
3. Layout: ``dims`` list the fastest-varying axis first, so GGUF ``[in, out]`` is the
   row-major HF ``[out, in]``. For ``llama`` files the converter also permuted the rows of
   Q and K (see ``_unpermute_rope``); we undo that.
"""

from __future__ import annotations

import contextlib
import logging
import mmap
import os
import re
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import gguf.quants
import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from tokenmill.loader.checkpoint import Checkpoint, normalize_hf_config

logger = logging.getLogger(__name__)

# ---------------------------------------------------------------- header parsing

_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?",
            10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9


@dataclass(frozen=True)
class GGUFTensorInfo:
    """Where one tensor lives in the file. ``shape`` is in HF (row-major) order."""

    name: str
    qtype: GGMLQuantizationType
    shape: tuple[int, ...]
    offset: int  # absolute byte offset in the file
    nbytes: int


@dataclass(frozen=True)
class GGUFFile:
    """A parsed GGUF header: all metadata (arrays as lists) and the tensor directory."""

    path: str
    version: int
    metadata: dict[str, Any]
    tensors: tuple[GGUFTensorInfo, ...]


class _Cursor:
    """Sequential little-endian reader over a bytes-like buffer."""

    def __init__(self, buf: Any, path: str) -> None:
        self.buf, self.pos, self.path = buf, 0, path

    def scalar(self, fmt: str) -> Any:
        try:
            (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        except struct.error as e:
            raise ValueError(f"{self.path} is truncated or not a GGUF file ({e}).") from e
        self.pos += struct.calcsize(fmt)
        return value

    def string(self) -> str:
        n = self.scalar("<Q")
        raw = self.buf[self.pos : self.pos + n]
        self.pos += n
        # A few tokenizer vocabularies hold byte strings that are not valid utf-8.
        return raw.decode("utf-8", errors="replace")

    def value(self, vtype: int) -> Any:
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            etype, count = self.scalar("<I"), self.scalar("<Q")
            if etype in _SCALARS and etype != 7:  # numeric arrays in one numpy call
                arr = np.frombuffer(self.buf, _SCALARS[etype], count, self.pos)
                self.pos += arr.nbytes
                return arr.tolist()
            return [self.value(etype) for _ in range(count)]
        if vtype not in _SCALARS:
            raise ValueError(f"{self.path}: unknown GGUF metadata type {vtype} at {self.pos}.")
        return self.scalar(_SCALARS[vtype])


def read_gguf(path: str) -> GGUFFile:
    """Parse a GGUF file's metadata and tensor directory (no tensor data is read)."""
    if os.path.getsize(path) < 24:
        raise ValueError(f"{path} is not a GGUF file (it is too small for a GGUF header).")
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        size = len(buf)
        c = _Cursor(buf, path)
        if buf[:4] != b"GGUF":
            raise ValueError(f"{path} is not a GGUF file (it does not start with b'GGUF').")
        c.pos = 4
        version = c.scalar("<I")
        if version not in (2, 3):
            why = "big-endian files are not supported" if version > 0xFFFF else "need 2 or 3"
            raise ValueError(f"{path}: unsupported GGUF version {version} ({why}).")
        n_tensors, n_kv = c.scalar("<Q"), c.scalar("<Q")
        metadata: dict[str, Any] = {}
        for _ in range(n_kv):
            key = c.string()
            metadata[key] = c.value(c.scalar("<I"))
        raw_infos = []
        for _ in range(n_tensors):
            name = c.string()
            dims = [c.scalar("<Q") for _ in range(c.scalar("<I"))]
            raw_infos.append((name, dims, c.scalar("<I"), c.scalar("<Q")))
    align = int(metadata.get("general.alignment", 32))
    data_start = (c.pos + align - 1) // align * align
    tensors = tuple(_tensor_info(path, size, data_start, *info) for info in raw_infos)
    return GGUFFile(path=path, version=version, metadata=metadata, tensors=tensors)


def _tensor_info(
    path: str, size: int, data_start: int, name: str, dims: list[int], type_id: int, off: int
) -> GGUFTensorInfo:
    try:
        qtype = GGMLQuantizationType(type_id)
    except ValueError:
        raise ValueError(f"{path}: tensor {name!r} has unknown ggml type {type_id}.") from None
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    if dims and dims[0] % block_size:
        raise ValueError(f"{path}: tensor {name!r} row of {dims[0]} is not whole {qtype.name} "
                         f"blocks of {block_size}.")
    nbytes = int(np.prod(dims, dtype=np.int64)) // block_size * type_size
    if data_start + off + nbytes > size:
        raise ValueError(f"{path} is truncated: tensor {name!r} ends past the end of the file.")
    return GGUFTensorInfo(name, qtype, tuple(reversed(dims)), data_start + off, nbytes)


# ---------------------------------------------------------------- dequantization
#
# Quantized tensors are rows of fixed-size blocks; each block stores ``block_size``
# weights as small integers plus fp16 scale(s). The torch versions below are
# element-for-element the same float32 arithmetic as gguf-py's numpy reference
# (``gguf.quants``), 5-10x faster on CPU. Other ggml types fall back to gguf-py.

Q = GGMLQuantizationType


def _f16(b: torch.Tensor) -> torch.Tensor:
    """Bytes ``[n, 2k]`` holding k little-endian fp16 values -> float32 ``[n, k]``."""
    return b.contiguous().view(torch.float16).float()


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    """``[n, 16]`` bytes -> ``[n, 32]``: low nibbles are weights 0-15, high are 16-31."""
    return torch.cat([qs & 0x0F, qs >> 4], dim=-1)


def _q8_0(b: torch.Tensor) -> torch.Tensor:  # 34 bytes: d fp16, 32 x int8
    return b[:, 2:].view(torch.int8).float().mul_(_f16(b[:, :2]))


def _q4_0(b: torch.Tensor) -> torch.Tensor:  # 18 bytes: d fp16, 32 x 4-bit; w = d*(q-8)
    return _nibbles(b[:, 2:]).float().sub_(8).mul_(_f16(b[:, :2]))


def _q4_1(b: torch.Tensor) -> torch.Tensor:  # 20 bytes: d, m fp16, 32 x 4-bit; w = d*q+m
    dm = _f16(b[:, :4])
    return _nibbles(b[:, 4:]).float().mul_(dm[:, :1]).add_(dm[:, 1:])


def _k_scales(b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Unpack Q4_K/Q5_K's 12 bytes into 8 six-bit scales and 8 six-bit mins.

    Bytes 0-3 hold scales 0-3 (low 6 bits), bytes 4-7 mins 0-3; scales/mins 4-7 keep
    their low 4 bits in bytes 8-11 and their top 2 bits in the spare bits of bytes 0-7.
    """
    s = b.reshape(-1, 3, 4)
    lo, mid, hi = s[:, 0], s[:, 1], s[:, 2]
    scales = torch.cat([lo & 0x3F, (hi & 0x0F) | ((lo >> 2) & 0x30)], dim=1)
    mins = torch.cat([mid & 0x3F, (hi >> 4) | ((mid >> 2) & 0x30)], dim=1)
    return scales.float(), mins.float()


def _k_quant_4_5(b: torch.Tensor, qh: torch.Tensor | None) -> torch.Tensor:
    """Q4_K/Q5_K super-block of 256 = 8 sub-blocks of 32: w = d*sc[j]*q - dmin*m[j].

    The 128 bytes of 4-bit values come in 4 groups of 32: low nibbles feed sub-block
    2g, high nibbles 2g+1. Q5_K adds bit j of ``qh[i]`` as bit 4 of weight i of sub-block j.
    """
    n = b.shape[0]
    dm = _f16(b[:, :4])
    scales, mins = _k_scales(b[:, 4:16])
    qs = b[:, -128:].reshape(n, 4, 1, 32)
    q = torch.cat([qs & 0x0F, qs >> 4], dim=2).reshape(n, 8, 32)
    if qh is not None:
        bits = torch.arange(8, dtype=torch.uint8).view(1, 8, 1)
        q |= ((qh.reshape(n, 1, 32) >> bits) & 1) << 4
    w = q.float().mul_((dm[:, :1] * scales).unsqueeze(-1))
    return w.sub_((dm[:, 1:] * mins).unsqueeze(-1)).reshape(n, 256)


def _q4_k(b: torch.Tensor) -> torch.Tensor:  # 144 bytes: d, dmin, scales[12], qs[128]
    return _k_quant_4_5(b, None)


def _q5_k(b: torch.Tensor) -> torch.Tensor:  # 176 bytes: d, dmin, scales[12], qh[32], qs[128]
    return _k_quant_4_5(b, b[:, 16:48])


def _q6_k(b: torch.Tensor) -> torch.Tensor:
    """210 bytes: ql[128] low 4 bits, qh[64] high 2 bits, 16 int8 scales, d fp16.

    256 weights = 2 halves of 128; in each half, ql's 64 bytes give weights 0-63 (low
    nibble) and 64-127 (high nibble), qh's 32 bytes give bits 4-5 for four runs of 32
    weights (shifts 0, 2, 4, 6). w = d * scale[i // 16] * (q - 32).
    """
    n = b.shape[0]
    ql = b[:, :128].reshape(n, 2, 1, 64)
    ql = torch.cat([ql & 0x0F, ql >> 4], dim=2).reshape(n, 8, 32)
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8).view(1, 1, 4, 1)
    qh = ((b[:, 128:192].reshape(n, 2, 1, 32) >> shifts) & 3).reshape(n, 8, 32)
    q = (ql | (qh << 4)).float().sub_(32).reshape(n, 16, 16)
    scales = b[:, 192:208].contiguous().view(torch.int8).float()
    return q.mul_((_f16(b[:, 208:]) * scales).unsqueeze(-1)).reshape(n, 256)


_BLOCK_DEQUANT = {Q.Q8_0: _q8_0, Q.Q4_0: _q4_0, Q.Q4_1: _q4_1,
                  Q.Q4_K: _q4_k, Q.Q5_K: _q5_k, Q.Q6_K: _q6_k}
_FLOAT_VIEWS = {Q.F32: torch.float32, Q.F16: torch.float16, Q.BF16: torch.bfloat16}


def dequantize(raw: torch.Tensor, qtype: GGMLQuantizationType,
               shape: tuple[int, ...]) -> torch.Tensor:
    """Turn a tensor's raw bytes (1-D uint8) into a float32 tensor of HF ``shape``."""
    if qtype in _FLOAT_VIEWS:
        out = raw.view(_FLOAT_VIEWS[qtype]).float()
    elif qtype in _BLOCK_DEQUANT:
        out = _BLOCK_DEQUANT[qtype](raw.view(-1, GGML_QUANT_SIZES[qtype][1]))
    else:
        try:
            values = gguf.quants.dequantize(raw.numpy(), qtype)
        except NotImplementedError:
            raise ValueError(f"GGUF tensor type {qtype.name} cannot be dequantized; "
                             "re-quantize the model, e.g. to Q4_K_M or Q8_0.") from None
        out = torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32))
    return out.reshape(shape)


# ---------------------------------------------------------------- GGUF -> HF translation

# general.architecture -> (HF architectures entry, model_type, Q/K rows permuted?)
_ARCHITECTURES = {
    "llama": ("LlamaForCausalLM", "llama", True),
    # llama.cpp has no plain "mistral" arch today (Mistral converts as "llama"); if a
    # file says "mistral" it came through the same Llama converter, so it is permuted.
    "mistral": ("MistralForCausalLM", "mistral", True),
    "qwen2": ("Qwen2ForCausalLM", "qwen2", False),
    "qwen3": ("Qwen3ForCausalLM", "qwen3", False),
}
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLOCK_NAMES = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}
_BLOCK_RE = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")
# rope_freqs.weight: per-frequency divisors that the converter computed from HF's
# rope_scaling={"rope_type": "llama3", ...} (Llama 3.1+); the parameters themselves are
# not in the metadata. Unsupported: we skip the tensor (with a warning) and the model runs
# unscaled rope, so its low-frequency rotary dims differ slightly from the original.
# attn_rot_embd: precomputed rope tables in some old files, never used by llama.cpp.
_SKIPPED = re.compile(r"rope_freqs\.weight|blk\.\d+\.attn_rot_embd\.weight")


def hf_tensor_name(gguf_name: str) -> str | None:
    """Map a GGUF tensor name to its HF name; None for tensors we deliberately skip."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    if _SKIPPED.fullmatch(gguf_name):
        return None
    m = _BLOCK_RE.fullmatch(gguf_name)
    if m is None or m.group(2) not in _BLOCK_NAMES:
        raise ValueError(
            f"GGUF tensor {gguf_name!r} has no Hugging Face equivalent in tokenmill's "
            "Llama/Qwen mapping; this model variant is not supported."
        )
    return f"model.layers.{m.group(1)}.{_BLOCK_NAMES[m.group(2)]}.{m.group(3)}"


def _unpermute_rope(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's Q/K row permutation for ``llama`` GGUFs.

    HF's rotary embedding rotates dimension ``i`` of a head with dimension ``i + d/2``
    (halves); ggml's rope rotates adjacent pairs ``(2i, 2i+1)``. The converter therefore
    reorders each head's ``d`` output rows from ``[0..d/2) ++ [d/2..d)`` to interleaved
    ``0, d/2, 1, d/2+1, ...`` via ``reshape(heads, 2, d/2, ...).swapaxes(1, 2)``. The
    inverse reads the rows as ``(heads, d/2, 2)`` and swaps back. Works for biases too.
    """
    rows = w.shape[0]
    if rows % n_heads or (rows // n_heads) % 2:
        raise ValueError(f"Cannot split {rows} Q/K rows into {n_heads} heads of even size; "
                         "the GGUF head counts do not match its tensors.")
    head_dim = rows // n_heads
    return w.reshape(n_heads, head_dim // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _hf_config(header: GGUFFile, arch: str, shapes: dict[str, tuple[int, ...]]) -> dict[str, Any]:
    """Build a ``config.json``-shaped dict from ``{arch}.*`` and ``tokenizer.ggml.*`` keys.

    ``shapes`` (HF name -> shape) settles what metadata may omit: biases, tied embeddings,
    and the vocabulary size (the embedding's rows; the token list can be shorter).
    """
    meta = header.metadata

    def key(name: str, default: Any = None) -> Any:
        value = meta.get(f"{arch}.{name}", default)
        if value is None:
            raise ValueError(f"{header.path} lacks metadata key '{arch}.{name}'.")
        return value

    hidden, heads = int(key("embedding_length")), int(key("attention.head_count"))
    embed = shapes.get("model.embed_tokens.weight")
    vocab = meta.get(f"{arch}.vocab_size", embed[0] if embed else None)
    if vocab is None:
        raise ValueError(f"{header.path} has no '{arch}.vocab_size' and no token_embd tensor.")
    head_dim = meta.get(f"{arch}.attention.key_length")
    if head_dim is None and _ARCHITECTURES[arch][2]:  # llama: rope dims == head dim
        head_dim = meta.get(f"{arch}.rope.dimension_count")
    hf_arch, model_type, _ = _ARCHITECTURES[arch]
    config: dict[str, Any] = {
        "architectures": [hf_arch],
        "model_type": model_type,
        "hidden_size": hidden,
        "intermediate_size": int(key("feed_forward_length")),
        "num_hidden_layers": int(key("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(key("attention.head_count_kv", heads)),
        "head_dim": int(head_dim) if head_dim is not None else hidden // heads,
        "rms_norm_eps": float(key("attention.layer_norm_rms_epsilon")),
        "rope_theta": float(key("rope.freq_base", 10000.0)),
        "max_position_embeddings": int(key("context_length")),
        "vocab_size": int(vocab),
        "hidden_act": "silu",
        "attention_bias": "model.layers.0.self_attn.q_proj.bias" in shapes,
        "mlp_bias": False,
        "tie_word_embeddings": "lm_head.weight" not in shapes,
        "rope_scaling": _rope_scaling(meta, arch),
        "torch_dtype": "float32",
    }
    for ours in ("bos", "eos", "pad", "unk"):
        if f"tokenizer.ggml.{ours}_token_id" in meta:
            config[f"{ours}_token_id"] = int(meta[f"tokenizer.ggml.{ours}_token_id"])
    return normalize_hf_config(config)


def _rope_scaling(meta: dict[str, Any], arch: str) -> dict[str, Any] | None:
    """HF ``rope_scaling`` from ``{arch}.rope.scaling.*`` (linear / yarn), else None."""
    kind = meta.get(f"{arch}.rope.scaling.type")
    if kind in (None, "none"):
        return None
    scaling: dict[str, Any] = {"rope_type": kind}
    if f"{arch}.rope.scaling.factor" in meta:
        scaling["factor"] = float(meta[f"{arch}.rope.scaling.factor"])
    if f"{arch}.rope.scaling.original_context_length" in meta:
        original = int(meta[f"{arch}.rope.scaling.original_context_length"])
        scaling["original_max_position_embeddings"] = original
    return scaling


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """Run torch ops single-threaded: dequantization is a chain of small memory-bound
    ops, and on a busy 2-core machine each OpenMP barrier can stall for a time slice of
    the other process; measured on the default model: 0.8 s with 1 thread, 2-20 s with 2.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def open_gguf(path: str) -> Checkpoint:
    """Open a single GGUF file as a Checkpoint with HF names, config and layout."""
    header = read_gguf(path)
    arch = header.metadata.get("general.architecture")
    if arch not in _ARCHITECTURES:
        raise ValueError(f"{path}: GGUF architecture {arch!r} is not supported; tokenmill "
                         f"reads {', '.join(sorted(_ARCHITECTURES))}.")
    if int(header.metadata.get("split.count", 1)) > 1:
        raise ValueError(f"{path} is one part of a split GGUF; merge the parts first with "
                         "`llama-gguf-split --merge first-part.gguf merged.gguf`.")
    named = [(hf_tensor_name(t.name), t) for t in header.tensors]
    named = [(n, t) for n, t in named if n is not None]
    if any(t.name == "rope_freqs.weight" for t in header.tensors):
        logger.warning("%s: ignoring rope_freqs.weight (Llama 3.1-style rope scaling is "
                       "not supported for GGUF); outputs will differ slightly from the "
                       "original model. Use its Hugging Face folder for exact results.", path)
    hf_config = _hf_config(header, arch, {n: t.shape for n, t in named})
    permuted = _ARCHITECTURES[arch][2]
    heads = {"q_proj": hf_config["num_attention_heads"],
             "k_proj": hf_config["num_key_value_heads"]}

    def read() -> Iterator[tuple[str, torch.Tensor]]:
        # ACCESS_COPY gives a writable (copy-on-write) view, so torch.frombuffer needs no
        # copy and does not warn; nothing is ever written back to the file.
        with open(path, "rb") as f:
            buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        for hf_name, info in named:
            raw = torch.frombuffer(buf, dtype=torch.uint8, count=info.nbytes,
                                   offset=info.offset)
            with _one_thread():
                tensor = dequantize(raw, info.qtype, info.shape)
                proj = hf_name.split(".")[-2]
                if permuted and proj in heads:
                    tensor = _unpermute_rope(tensor, heads[proj])
            yield hf_name, tensor

    return Checkpoint(
        path=path, format="gguf", hf_config=hf_config,
        tensor_names=tuple(n for n, _ in named), _read=read,
    )
