"""How big the paged KV pool is: ``--kv-cache-memory auto`` (the default) or a set size.

Auto, on the CPU (measured once the model is loaded)::

    pool = AUTO_FRACTION * (MemAvailable - weights mapped from the checkpoint file)

capped at what ``max_num_seqs`` requests of ``max_model_len`` tokens (the model's
context when not set) could ever hold. ``MemAvailable`` (``/proc/meminfo``; psutil
elsewhere) already excludes weights the loader copied into process memory, but it
counts the pages of a memory-mapped file as reclaimable cache, and a GGUF file's packed
weights are used in place from such pages, which must stay resident: those mappings'
sizes are taken off. Half of what is left (``AUTO_FRACTION``) leaves room for
activations, the prefix cache's bookkeeping, other processes and the page cache; the
pool's pages are only touched as blocks are first written (``lazy_zeros``), so an
unused pool costs address space, not memory. On a GPU: ``AUTO_FRACTION_GPU`` of the
device memory free after loading.

``KVPoolSize`` records the decision; ``describe`` writes the start-up line (pool size,
how many requests of ``max_model_len`` fit, and vLLM's "maximum concurrency" at the
model's context) that the engine logs and ``tokenmill serve`` prints.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

import torch

__all__ = ["AUTO_FRACTION", "AUTO_FRACTION_GPU", "KVPoolSize", "auto_kv_cache_bytes",
           "format_bytes", "mapped_weight_bytes", "mem_available", "size_kv_pool"]

AUTO_FRACTION = 0.5
AUTO_FRACTION_GPU = 0.8


@dataclass(frozen=True)
class KVPoolSize:
    """The pool's size and where it came from.

    ``auto`` False: the size was set (``nbytes`` is it). ``auto`` True: ``nbytes`` is
    ``fraction * (available - mapped_weights)``, or ``cap`` where that is smaller."""

    nbytes: int
    auto: bool
    available: int = 0
    mapped_weights: int = 0
    fraction: float = AUTO_FRACTION
    cap: int | None = None

    @property
    def capped(self) -> bool:
        return self.auto and self.cap is not None and self.nbytes == self.cap

    def describe(self, pool_bytes: int, pool_tokens: int, kv_dtype: torch.dtype,
                 max_model_len: int, model_context: int, max_num_seqs: int) -> str:
        """One line: the pool as allocated (``pool_bytes``, whole blocks), how it was
        sized, how many requests of ``max_model_len`` tokens fit at once, and the
        maximum concurrency for requests of the model's full context."""
        dtype = str(kv_dtype).removeprefix("torch.")
        how = "set by --kv-cache-memory"
        if self.auto:
            how = (f"auto: {self.fraction:.0%} of {format_bytes(self.available)} available"
                   + (f" less {format_bytes(self.mapped_weights)} of mapped weights"
                      if self.mapped_weights else ""))
            if self.capped:
                how += ", capped at what max_num_seqs requests of full length can use"
        fit = pool_tokens // max_model_len
        return (f"{format_bytes(pool_bytes)} {dtype} = {pool_tokens:,} tokens ({how}); "
                f"{fit:,} requests of max_model_len {max_model_len:,} tokens fit "
                f"(max_num_seqs {max_num_seqs}); maximum concurrency for "
                f"{model_context:,} tokens per request: {pool_tokens / model_context:.2f}x")


def auto_kv_cache_bytes(available: int, mapped_weights: int, cap: int | None,
                        fraction: float = AUTO_FRACTION) -> int:
    """The auto pool size: ``fraction`` of the memory available less the mapped
    weights, at most ``cap`` (None: no cap). A pure function of its arguments."""
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    budget = int(fraction * max(0, available - mapped_weights))
    return budget if cap is None else min(budget, cap)


def size_kv_pool(set_bytes: int | None, model: torch.nn.Module, device: str,
                 bytes_per_token: int, max_tokens: int) -> KVPoolSize:
    """The pool size: ``set_bytes`` if given, else auto (see the module docstring) with
    ``max_tokens`` (max_num_seqs x the longest request) as the cap."""
    if set_bytes is not None:
        return KVPoolSize(nbytes=set_bytes, auto=False)
    cap = max_tokens * bytes_per_token
    if device != "cpu":
        free, _ = torch.cuda.mem_get_info(torch.device(device))
        return KVPoolSize(auto_kv_cache_bytes(free, 0, cap, AUTO_FRACTION_GPU), auto=True,
                          available=free, fraction=AUTO_FRACTION_GPU, cap=cap)
    available, mapped = mem_available(), mapped_weight_bytes(model)
    return KVPoolSize(auto_kv_cache_bytes(available, mapped, cap), auto=True,
                      available=available, mapped_weights=mapped, cap=cap)


def mem_available() -> int:
    """Bytes of memory available to new allocations without swapping (MemAvailable)."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        import psutil
    except ImportError:
        raise RuntimeError("cannot tell how much memory is free (no /proc/meminfo, no "
                           "psutil); set --kv-cache-memory, e.g. 2GiB.") from None
    return int(psutil.virtual_memory().available)


def mapped_weight_bytes(model: torch.nn.Module) -> int:
    """Total size of the file mappings (``/proc/self/maps``) that hold any of the model's
    weights: a GGUF file's packed matrices used in place. 0 where weights live in process
    memory, or where /proc is missing."""
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as f:
            maps = [_file_mapping(line) for line in f]
    except OSError:
        return 0
    ranges = sorted(m for m in maps if m is not None)
    starts = [lo for lo, _ in ranges]
    hit: set[int] = set()
    for t in _weight_tensors(model):
        if t.device.type != "cpu" or t.numel() == 0:
            continue
        i = bisect.bisect_right(starts, t.data_ptr()) - 1
        if i >= 0 and t.data_ptr() < ranges[i][1]:
            hit.add(i)
    return sum(ranges[i][1] - ranges[i][0] for i in hit)


def _file_mapping(line: str) -> tuple[int, int] | None:
    """``lo-hi perms offset dev inode path`` -> (lo, hi) when it maps a regular file."""
    parts = line.split(maxsplit=5)
    if len(parts) < 6 or not parts[5].startswith("/") or parts[4] == "0":
        return None
    lo, hi = (int(x, 16) for x in parts[0].split("-"))
    return lo, hi


def _weight_tensors(model: torch.nn.Module):
    """Every parameter, and the blocks of every packed matrix (``module.packed``)."""
    yield from (p.data for p in model.parameters())
    for module in model.modules():
        packed = getattr(module, "packed", None)
        if packed is None:
            continue
        for part in getattr(packed, "parts", [packed]):
            yield part.data


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"

