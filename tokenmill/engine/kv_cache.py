"""The paged KV cache's bookkeeping: which block belongs to whom.

The KV tensors themselves live with the model runner (one ``[num_blocks * block_size,
num_kv_heads, head_dim]`` tensor per layer for K and for V). Here we only hand out block
ids. A request's *block table* is the list of its block ids: token at position ``p`` lives
in block ``block_ids[p // block_size]`` at offset ``p % block_size``, so a request's cache
does not need to be contiguous and never needs copying when it grows.

Invariant: every block is either in the free list (ref count 0) or referenced by at least
one request (ref count > 0), never both. ``check_integrity()`` verifies it.
"""

from __future__ import annotations

from collections import deque

from tokenmill.engine.request import Request


class BlockPool:
    """Fixed-size blocks with reference counts and a FIFO free list."""

    def __init__(self, num_blocks: int) -> None:
        if num_blocks < 1:
            raise ValueError(f"the KV pool needs at least one block, got {num_blocks}.")
        self.num_blocks = num_blocks
        self.ref_counts = [0] * num_blocks
        self._free: deque[int] = deque(range(num_blocks))

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    def allocate(self, n: int) -> list[int]:
        """Takes ``n`` free blocks (ref count 1 each). The caller checks capacity first."""
        if n > len(self._free):
            raise RuntimeError(f"asked for {n} blocks with {len(self._free)} free")
        blocks = [self._free.popleft() for _ in range(n)]
        for b in blocks:
            self.ref_counts[b] = 1
        return blocks

    def free(self, block_ids: list[int]) -> None:
        """Drops one reference from each block; blocks that reach zero become free."""
        for b in block_ids:
            if self.ref_counts[b] <= 0:
                raise RuntimeError(f"block {b} freed while not referenced")
            self.ref_counts[b] -= 1
            if self.ref_counts[b] == 0:
                self._free.append(b)

    def check_integrity(self) -> None:
        free = set(self._free)
        if len(free) != len(self._free):
            raise AssertionError("a block appears twice in the free list")
        for b, rc in enumerate(self.ref_counts):
            if rc < 0 or (rc == 0) != (b in free):
                raise AssertionError(f"block {b}: ref count {rc}, in free list: {b in free}")


class KVCacheManager:
    """Gives requests the blocks they need to hold ``num_computed + num_new`` tokens."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        self.block_size = block_size
        self.pool = BlockPool(num_blocks)

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free_blocks

    @property
    def usage(self) -> float:
        """Fraction of blocks in use, in [0, 1]."""
        return 1.0 - self.pool.num_free_blocks / self.pool.num_blocks

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def allocate_slots(self, request: Request, num_new_tokens: int) -> bool:
        """Grows the request's block table to cover ``num_computed_tokens + num_new_tokens``
        tokens. Returns False, changing nothing, when the pool is too small right now."""
        need = self.blocks_needed(request.num_computed_tokens + num_new_tokens)
        extra = need - len(request.block_ids)
        if extra <= 0:
            return True
        if extra > self.pool.num_free_blocks:
            return False
        request.block_ids.extend(self.pool.allocate(extra))
        return True

    def free(self, request: Request) -> None:
        """Returns all of a request's blocks (on finish, abort or preemption)."""
        self.pool.free(request.block_ids)
        request.block_ids = []

    def check_integrity(self, live_requests: list[Request]) -> None:
        """Pool invariants, plus: the blocks held by live requests are exactly the
        referenced ones, with matching counts."""
        self.pool.check_integrity()
        counts = [0] * self.pool.num_blocks
        for r in live_requests:
            for b in r.block_ids:
                counts[b] += 1
        if counts != self.pool.ref_counts:
            raise AssertionError("block ref counts do not match the requests' block tables")
