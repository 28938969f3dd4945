"""The paged KV cache's bookkeeping: which block belongs to whom.

The KV tensors themselves live with the model runner (one ``[num_blocks * block_size,
num_kv_heads, head_dim]`` tensor per layer for K and for V). Here we only hand out block
ids. A request's *block table* is the list of its block ids: token at position ``p`` lives
in block ``block_ids[p // block_size]`` at offset ``p % block_size``, so a request's cache
does not need to be contiguous and never needs copying when it grows.

With prefix caching, a block whose ref count drops to 0 keeps its contents and stays
findable through the prefix tree while it waits in the free list; the free list is in
least-recently-freed order, so the pool reuses (and the tree evicts) the coldest first.

Which free block is handed out next, in order: (1) a used block that holds nothing
cached (a request's partial last block, or any block without prefix caching), most
recently freed first; (2) a block never used before; (3) the least recently freed cached
block, evicted from the tree. On CPU the pool is mapped lazily and a block's pages become
resident when first written, so (1) before (2) keeps RSS at what the cache and the
running requests hold, and (2) before (3) lets the prefix cache use the whole pool.

Invariant: every block is either free (ref count 0; in exactly one of the three free
lists; maybe cached, then evictable) or referenced by at least one request (ref count
> 0), never both. ``check_integrity()`` verifies it, with the tree's own invariants.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable

from tokenmill.engine.prefix_cache import PrefixCache
from tokenmill.engine.sequence import Sequence

logger = logging.getLogger("tokenmill")


class BlockPool:
    """Fixed-size blocks with reference counts and three free lists (see the module
    docstring for the order they are used in)."""

    def __init__(self, num_blocks: int,
                 on_reuse: Callable[[int], None] | None = None,
                 is_cached: Callable[[int], bool] | None = None) -> None:
        if num_blocks < 1:
            raise ValueError(f"the KV pool needs at least one block, got {num_blocks}.")
        self.num_blocks = num_blocks
        self.ref_counts = [0] * num_blocks
        self._spare: OrderedDict[int, None] = OrderedDict()  # used, nothing cached
        self._fresh: list[int] = list(range(num_blocks - 1, -1, -1))  # never used; pop()
        # used and cached when freed (LRU first; evicting a block evicts the blocks
        # cached below it too, so a few here may no longer be cached: still reusable)
        self._free: OrderedDict[int, None] = OrderedDict()
        self._on_reuse = on_reuse  # told when a free (maybe cached) block is handed out
        self._is_cached = is_cached  # None: no prefix cache, nothing is ever cached
        # blocks handed out at least once: on CPU the pool's pages become resident only
        # when first written, so this is the share of the pool that RSS holds
        self.num_touched_blocks = 0

    @property
    def num_free_blocks(self) -> int:
        return len(self._spare) + len(self._fresh) + len(self._free)

    def _take(self) -> int:
        if self._spare:
            return self._spare.popitem(last=True)[0]
        if self._fresh:
            self.num_touched_blocks += 1
            return self._fresh.pop()
        b, _ = self._free.popitem(last=False)
        if self._on_reuse is not None:
            self._on_reuse(b)
        return b

    def allocate(self, n: int) -> list[int]:
        """Takes ``n`` free blocks (ref count 1 each) in the module's order. The caller
        checks capacity first."""
        if n > self.num_free_blocks:
            raise RuntimeError(f"asked for {n} blocks with {self.num_free_blocks} free")
        blocks = []
        for _ in range(n):
            b = self._take()
            self.ref_counts[b] = 1
            blocks.append(b)
        return blocks

    def touch(self, block_ids: list[int]) -> None:
        """Adds a reference to each block (a prefix-cache hit), taking free ones out of
        the free list so they cannot be reused under the new owner."""
        for b in block_ids:
            if self.ref_counts[b] == 0:
                del self._free[b]
            self.ref_counts[b] += 1

    def free(self, block_ids: list[int]) -> None:
        """Drops one reference from each block; blocks that reach zero become free (most
        recently freed last, so callers free a request's tail blocks first)."""
        for b in block_ids:
            if self.ref_counts[b] <= 0:
                raise RuntimeError(f"block {b} freed while not referenced")
            self.ref_counts[b] -= 1
            if self.ref_counts[b] == 0:
                if self._is_cached is not None and self._is_cached(b):
                    self._free[b] = None
                else:
                    self._spare[b] = None

    def check_integrity(self) -> None:
        fresh = set(self._fresh)
        for b, rc in enumerate(self.ref_counts):
            lists = (b in self._spare) + (b in fresh) + (b in self._free)
            if rc < 0 or lists > 1 or (rc == 0) != (lists == 1):
                raise AssertionError(f"block {b}: ref count {rc}, in {lists} free lists")


class BlockManager:
    """Gives requests the blocks they need to hold ``num_computed + num_new`` tokens, and
    with prefix caching, the blocks other requests already computed for their prefix."""

    def __init__(self, num_blocks: int, block_size: int,
                 enable_prefix_caching: bool = False) -> None:
        self.block_size = block_size
        self.prefix_cache = PrefixCache(block_size) if enable_prefix_caching else None
        pc = self.prefix_cache
        self.pool = BlockPool(num_blocks, None if pc is None else pc.evict,
                              None if pc is None else pc.block_to_node.__contains__)
        self.num_queried_tokens = 0  # prompt tokens looked up in the cache
        self.num_hit_tokens = 0      # of which found

    def match_prefix(self, request: Sequence) -> list[int]:
        """Cached blocks for the start of the request's tokens. Never covers the last
        token: its logits must be computed to sample the next one."""
        if self.prefix_cache is None or request.prompt_logprobs is not None:
            return []
        return self.prefix_cache.match(request.all_token_ids[: request.num_tokens - 1])

    def record_admission(self, request: Sequence, num_hit_tokens: int) -> None:
        """Counts a request's lookup once, when it is admitted (hit-rate metrics)."""
        if self.prefix_cache is None:
            return
        self.num_queried_tokens += request.num_tokens
        self.num_hit_tokens += num_hit_tokens
        if request.num_cached_tokens is None:
            request.num_cached_tokens = num_hit_tokens
        logger.debug("prefix cache: %s hit %d of %d tokens", request.request_id,
                     num_hit_tokens, request.num_tokens)

    def cache_full_blocks(self, request: Sequence) -> None:
        """Publishes the request's blocks whose every token is computed."""
        if self.prefix_cache is None:
            return
        full = request.num_computed_tokens // self.block_size
        if full > request.num_published_blocks:
            self.prefix_cache.insert(request.all_token_ids[: full * self.block_size],
                                     request.block_ids[:full])
            request.num_published_blocks = full

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free_blocks

    @property
    def usage(self) -> float:
        """Fraction of blocks in use, in [0, 1]."""
        return 1.0 - self.pool.num_free_blocks / self.pool.num_blocks

    @property
    def touched(self) -> float:
        """Fraction of blocks ever handed out, in [0, 1]: the resident share of a lazily
        mapped pool (it only grows; a full prefix cache brings it to 1)."""
        return self.pool.num_touched_blocks / self.pool.num_blocks

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def allocate_slots(self, request: Sequence, num_new_tokens: int,
                       prefix_blocks: list[int] | None = None) -> bool:
        """Grows the request's block table to cover ``num_computed_tokens + num_new_tokens``
        tokens (after ``prefix_blocks``, cache hits for a request that holds no block yet,
        which then count as computed). Returns False, changing nothing, when the pool is
        too small right now."""
        prefix_blocks = prefix_blocks or []
        computed = request.num_computed_tokens + len(prefix_blocks) * self.block_size
        need = self.blocks_needed(computed + num_new_tokens)
        extra = need - len(request.block_ids) - len(prefix_blocks)
        # hits on evictable blocks leave the free list: they are not free for us too
        reclaimed = sum(1 for b in prefix_blocks if self.pool.ref_counts[b] == 0)
        if extra > self.pool.num_free_blocks - reclaimed:
            return False
        if prefix_blocks:
            self.pool.touch(prefix_blocks)
            request.block_ids = list(prefix_blocks)
            request.num_computed_tokens = computed
            request.num_published_blocks = len(prefix_blocks)
        if extra > 0:
            request.block_ids.extend(self.pool.allocate(extra))
        return True

    def trim(self, request: Sequence, num_tokens: int) -> None:
        """Frees the request's blocks past those that ``num_tokens`` tokens need (blocks
        that held only rejected speculative tokens), tail first. They were never
        published: only computed (verified) tokens reach the prefix cache."""
        keep = max(self.blocks_needed(num_tokens), request.num_published_blocks)
        if len(request.block_ids) > keep:
            self.pool.free(request.block_ids[keep:][::-1])
            del request.block_ids[keep:]

    def free(self, request: Sequence) -> None:
        """Returns all of a request's blocks (on finish, abort or preemption), tail first
        so that a cached prefix outlives its extensions in the LRU order."""
        self.pool.free(request.block_ids[::-1])
        request.block_ids = []
        request.num_published_blocks = 0

    def check_integrity(self, live_requests: list[Sequence]) -> None:
        """Pool and tree invariants, plus: the blocks held by live requests are exactly
        the referenced ones, with matching counts, and a cached block a request holds sits
        at the same depth in the tree as in the request's block table."""
        self.pool.check_integrity()
        counts = [0] * self.pool.num_blocks
        for r in live_requests:
            for b in r.block_ids:
                counts[b] += 1
        if counts != self.pool.ref_counts:
            raise AssertionError("block ref counts do not match the requests' block tables")
        if self.prefix_cache is None:
            return
        self.prefix_cache.check_integrity()
        for r in live_requests:
            for i, b in enumerate(r.block_ids):
                depth = self.prefix_cache.depth(b)
                if depth is not None and depth != i:
                    raise AssertionError(f"block {b} is block {i} of {r.request_id} but "
                                         f"cached at depth {depth}")
