"""A block-granular radix tree: token prefixes -> KV blocks already computed for them.

Each node stands for one *full* KV block: its key is the block's ``block_size`` token ids,
its path from the root spells the whole prefix, so two requests whose prompts start with
the same tokens walk the same nodes and can reuse the same blocks (RadixAttention, at
block granularity like vLLM's hash chains).

Ownership: the tree does not hold references. A cached block is either in use (ref count
> 0, owned by requests) or *evictable*: ref count 0, sitting in the block pool's free list
in least-recently-freed order with its contents intact. When the pool hands such a block
out again, ``evict`` removes its node and the whole subtree below it (a prefix without its
beginning cannot be matched), turning those blocks into plain blocks.
"""

from __future__ import annotations

from dataclasses import dataclass, field

BlockKey = tuple[int, ...]


@dataclass(eq=False)
class Node:
    key: BlockKey
    block_id: int
    parent: Node | None
    children: dict[BlockKey, Node] = field(default_factory=dict)


class PrefixCache:
    def __init__(self, block_size: int) -> None:
        self.block_size = block_size
        self.root = Node((), -1, None)
        self.block_to_node: dict[int, Node] = {}
        self.num_evicted = 0  # blocks forgotten so far (for tests and metrics)

    def __len__(self) -> int:
        return len(self.block_to_node)

    def _keys(self, tokens: list[int], num_blocks: int):
        bs = self.block_size
        for i in range(num_blocks):
            yield tuple(tokens[i * bs: (i + 1) * bs])

    def match(self, tokens: list[int]) -> list[int]:
        """Block ids of the longest cached prefix of ``tokens``, in full blocks."""
        node, blocks = self.root, []
        for key in self._keys(tokens, len(tokens) // self.block_size):
            node = node.children.get(key)
            if node is None:
                break
            blocks.append(node.block_id)
        return blocks

    def insert(self, tokens: list[int], block_ids: list[int]) -> None:
        """Records that ``block_ids[i]`` holds the K/V of block ``i`` of ``tokens`` (for
        every full block). Where another block already caches the same prefix the tree
        keeps that one and the caller's copy stays private; where part of the path was
        evicted, the caller's blocks (valid, since it holds them) take its place."""
        node = self.root
        for key, block_id in zip(self._keys(tokens, len(block_ids)), block_ids, strict=True):
            child = node.children.get(key)
            if child is None:
                if block_id in self.block_to_node:
                    return  # never alias one block under two prefixes
                child = Node(key, block_id, node)
                node.children[key] = child
                self.block_to_node[block_id] = child
            node = child

    def evict(self, block_id: int) -> None:
        """Forgets the block's node and everything below it (no-op if not cached)."""
        node = self.block_to_node.get(block_id)
        if node is None:
            return
        del node.parent.children[node.key]
        stack = [node]
        while stack:
            n = stack.pop()
            del self.block_to_node[n.block_id]
            self.num_evicted += 1
            stack.extend(n.children.values())

    def depth(self, block_id: int) -> int | None:
        """The block's index in the prefixes it caches (0 = first block), or None."""
        node = self.block_to_node.get(block_id)
        if node is None:
            return None
        d = -1
        while node is not self.root:
            node, d = node.parent, d + 1
        return d

    def check_integrity(self) -> None:
        seen: set[int] = set()
        stack = list(self.root.children.values())
        while stack:
            n = stack.pop()
            if n.block_id in seen:
                raise AssertionError(f"block {n.block_id} appears twice in the prefix tree")
            seen.add(n.block_id)
            if self.block_to_node.get(n.block_id) is not n:
                raise AssertionError(f"block {n.block_id}: index does not point at its node")
            if n.parent.children.get(n.key) is not n or len(n.key) != self.block_size:
                raise AssertionError(f"block {n.block_id}: broken parent link or key")
            stack.extend(n.children.values())
        if seen != set(self.block_to_node):
            raise AssertionError("the block index holds blocks that are not in the tree")
