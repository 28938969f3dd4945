"""The one GGUF header reader, shared by the weight loader and the GGUF tokenizer.

GGUF layout (versions 2 and 3)::

    "GGUF" | version u32 | n_tensors u64 | n_kv u64
    n_kv x (key: string, type: u32, value)          # metadata, e.g. llama.block_count
    n_tensors x (name: string, n_dims: u32, dims: u64[n_dims], ggml_type: u32, offset: u64)
    padding to `general.alignment` (default 32), then the tensor data

A string is ``u64 length + utf-8 bytes``; an array is ``elem_type u32, count u64, elems``.
Numbers are little-endian, except in files written on a big-endian machine, which we detect
by the version field (a little-endian read of a big-endian 3 is ``3 << 24``).

We parse the header ourselves: gguf-py's ``GGUFReader`` builds numpy views for every array
element and needs ~6 s for the 49k-100k tokenizer strings of a small model, while this parser
needs ~0.1 s. Numeric arrays are read with one ``numpy.frombuffer`` call; strings one by one.

* ``read_gguf_metadata(path)``: the key/value metadata only (it stops before the tensor
  table), as plain Python values; enough for the tokenizer.
* ``read_gguf(path)``: metadata plus the tensor directory, validated against the file size.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

__all__ = ["GGUFFile", "GGUFTensorInfo", "read_gguf", "read_gguf_metadata"]

# GGUF value type -> struct format, keyed by plain ints: comparing against IntEnum members
# in the per-string loop made parsing ~1.6x slower.
_SCALAR_FORMAT = {int(t): f for t, f in {
    GGUFValueType.UINT8: "B", GGUFValueType.INT8: "b", GGUFValueType.UINT16: "H",
    GGUFValueType.INT16: "h", GGUFValueType.UINT32: "I", GGUFValueType.INT32: "i",
    GGUFValueType.FLOAT32: "f", GGUFValueType.BOOL: "?", GGUFValueType.UINT64: "Q",
    GGUFValueType.INT64: "q", GGUFValueType.FLOAT64: "d",
}.items()}  # fmt: skip
_STRING, _ARRAY = int(GGUFValueType.STRING), int(GGUFValueType.ARRAY)
_BOOL = int(GGUFValueType.BOOL)
# the fewest bytes a value of each type takes (a string or array: its length or header)
_MIN_SIZE = {**{t: struct.calcsize(f) for t, f in _SCALAR_FORMAT.items()},
             _STRING: 8, _ARRAY: 12}
_MAX_DIMS = 4  # GGML_MAX_DIMS


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
    """Sequential reads of GGUF primitives from a buffer, in the file's byte order."""

    def __init__(self, buf: Any, path: str, order: str) -> None:
        self.buf, self.path, self.order, self.pos = buf, path, order, 0
        self._structs = {f: struct.Struct(order + f) for f in _SCALAR_FORMAT.values()}

    def _truncated(self, why: object) -> ValueError:
        return ValueError(f"{self.path} is truncated or not a GGUF file ({why}).")

    def scalar(self, fmt: str) -> Any:
        unpack = self._structs[fmt]
        try:
            (value,) = unpack.unpack_from(self.buf, self.pos)
        except struct.error as e:
            raise self._truncated(e) from e
        self.pos += unpack.size
        return value

    def string(self) -> str:
        n = self.scalar("Q")
        end = self.pos + n
        if end > len(self.buf):
            raise self._truncated(f"a {n}-byte string at byte {self.pos} ends past the end")
        raw, self.pos = self.buf[self.pos : end], end
        # A few tokenizer vocabularies hold byte strings that are not valid utf-8.
        return raw.decode("utf-8", errors="replace")

    def value(self, vtype: int) -> Any:
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            item_type, count = self.scalar("I"), self.scalar("Q")
            smallest = _MIN_SIZE.get(item_type, 1)  # the least bytes one item can take
            if count * smallest > len(self.buf) - self.pos:
                raise self._truncated(f"an array of {count} items at byte {self.pos} does "
                                      "not fit in the file")
            if item_type == _STRING:  # e.g. the vocabulary: the hot loop
                return [self.string() for _ in range(count)]
            fmt = _SCALAR_FORMAT.get(item_type)
            if fmt is None or item_type == _BOOL:  # nested arrays, bools: one at a time
                return [self.value(item_type) for _ in range(count)]
            dtype = np.dtype(fmt).newbyteorder(self.order)  # numbers: one numpy read
            if self.pos + count * dtype.itemsize > len(self.buf):
                raise self._truncated(f"an array of {count} items at byte {self.pos}")
            out = np.frombuffer(self.buf, dtype=dtype, count=count, offset=self.pos)
            self.pos += count * dtype.itemsize
            return out.tolist()
        fmt = _SCALAR_FORMAT.get(vtype)
        if fmt is None:
            raise ValueError(f"{self.path}: unknown GGUF metadata type {vtype} at byte "
                             f"{self.pos}; the file may be corrupt.")
        return self.scalar(fmt)


def _open_header(path: str, buf: Any) -> tuple[_Cursor, int, int, int]:
    """Check magic and version; return (cursor after the counts, version, n_tensors, n_kv)."""
    if buf[:4] != b"GGUF":
        raise ValueError(f"{path} is not a GGUF file (it does not start with b'GGUF').")
    order = "<"
    version = struct.unpack_from("<I", buf, 4)[0]
    if version & 0xFFFF == 0:  # written on a big-endian machine
        order, version = ">", struct.unpack_from(">I", buf, 4)[0]
    if version not in (2, 3):
        raise ValueError(f"{path}: GGUF version {version} is not supported (only 2 and 3).")
    cur = _Cursor(buf, path, order)
    cur.pos = 8
    n_tensors, n_kv = cur.scalar("Q"), cur.scalar("Q")
    # a key/value takes at least 8 + 4 + 1 bytes, a tensor entry 8 + 4 + 4 + 8
    if n_kv * 13 + n_tensors * 24 > len(buf) - cur.pos:
        raise cur._truncated(f"its header counts {n_tensors} tensors and {n_kv} metadata "
                             "entries, more than the file can hold")
    return cur, version, n_tensors, n_kv


def _read_metadata(cur: _Cursor, n_kv: int) -> dict[str, Any]:
    metadata: dict[str, Any] = {}
    for _ in range(n_kv):
        key = cur.string()
        metadata[key] = cur.value(cur.scalar("I"))
    return metadata


@contextlib.contextmanager
def _mapped(path: str) -> Iterator[mmap.mmap]:
    """The file read-only in memory (pages are read as the parser touches them)."""
    if os.path.getsize(path) < 24:  # mmap cannot map an empty file
        raise ValueError(f"{path} is not a GGUF file (it is too small for a GGUF header).")
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        yield buf


def read_gguf_metadata(path: str) -> dict[str, Any]:
    """Return the key/value metadata of the GGUF file at ``path`` as plain Python values."""
    with _mapped(path) as buf:
        cur, _version, _n_tensors, n_kv = _open_header(path, buf)
        return _read_metadata(cur, n_kv)


def read_gguf(path: str) -> GGUFFile:
    """Parse a GGUF file's metadata and tensor directory (no tensor data is read)."""
    with _mapped(path) as buf:
        size = len(buf)
        cur, version, n_tensors, n_kv = _open_header(path, buf)
        if cur.order != "<":
            raise ValueError(f"{path} is a big-endian GGUF file; tokenmill reads the weights "
                             "of little-endian files only.")
        metadata = _read_metadata(cur, n_kv)
        raw_infos = []
        for _ in range(n_tensors):
            name = cur.string()
            n_dims = cur.scalar("I")
            if n_dims > _MAX_DIMS:
                raise ValueError(f"{path} is corrupt: tensor {name!r} has {n_dims} dimensions "
                                 f"(at most {_MAX_DIMS}).")
            dims = [cur.scalar("Q") for _ in range(n_dims)]
            raw_infos.append((name, dims, cur.scalar("I"), cur.scalar("Q")))
    align = metadata.get("general.alignment", 32)
    if not isinstance(align, int) or isinstance(align, bool) or align <= 0 or align & (align - 1):
        raise ValueError(f"{path} is corrupt: general.alignment is {align!r}, not a power of 2.")
    data_start = (cur.pos + align - 1) // align * align
    tensors = tuple(_tensor_info(path, size, data_start, align, *info) for info in raw_infos)
    names = [t.name for t in tensors]
    if len(set(names)) != len(names):
        twice = next(n for n in names if names.count(n) > 1)
        raise ValueError(f"{path} is corrupt: tensor {twice!r} is listed twice.")
    return GGUFFile(path=path, version=version, metadata=metadata, tensors=tensors)


def _tensor_info(path: str, size: int, data_start: int, align: int, name: str,
                 dims: list[int], type_id: int, off: int) -> GGUFTensorInfo:
    try:
        qtype = GGMLQuantizationType(type_id)
    except ValueError:
        raise ValueError(f"{path}: tensor {name!r} has unknown ggml type {type_id}.") from None
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    if dims and dims[0] % block_size:
        raise ValueError(f"{path}: tensor {name!r} row of {dims[0]} is not whole {qtype.name} "
                         f"blocks of {block_size}.")
    count = 1
    for d in dims:  # Python ints: a corrupt dimension cannot overflow
        count *= d
    nbytes = count // block_size * type_size
    if off % align:
        raise ValueError(f"{path} is corrupt: tensor {name!r} starts at offset {off}, not a "
                         f"multiple of the alignment {align}.")
    if data_start + off + nbytes > size:
        raise ValueError(f"{path} is truncated: tensor {name!r} ends past the end of the file.")
    return GGUFTensorInfo(name, qtype, tuple(reversed(dims)), data_start + off, nbytes)
