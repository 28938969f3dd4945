"""Suffix decoding (after Oliaro et al., "SuffixDecoding"): proposals from suffix tries
over the request itself and over the recent outputs of all requests.

Each trie holds every suffix of its token sequences, cut at ``DEPTH`` tokens, with a
count per node (how many indexed suffixes pass through it). A proposal: find the node of
the longest suffix of the request's tokens (up to ``MAX_PATTERN``) present in the trie,
then walk down, each time to the most frequent child, multiplying the path's probability
by ``child.count / node.count``, while it stays at least ``min_probability`` and fewer
than k tokens are taken. So a continuation seen often is proposed long, a doubtful one
short or not at all. Both tries propose; the one whose proposal has the larger expected
accepted length (the sum of its path probabilities) wins.

The request's own trie (prompt + output) grows by O(DEPTH) per new token: the nodes of
the suffixes that start in the last ``DEPTH`` positions are kept and each is extended by
the new token. The global trie holds the outputs of the last ``cache_size`` finished
requests; the oldest is subtracted (its counts decremented, emptied nodes removed) when a
new one comes in. Memory: about DEPTH nodes per indexed token (a Python object and a
dict each, ~150 bytes), so a 4k-token request holds ~10 MB and the global cache of
``cache_size`` outputs of ~500 tokens ~1.2 MB per output.
"""

from __future__ import annotations

from collections import deque

from tokenmill.engine.sequence import Sequence

DEPTH = 16        # longest suffix indexed (pattern + continuation)
MAX_PATTERN = 8   # longest suffix of the request looked up


class _Node:
    __slots__ = ("children", "count")

    def __init__(self) -> None:
        self.children: dict[int, _Node] = {}
        self.count = 0


class _Trie:
    def __init__(self) -> None:
        self.root = _Node()

    def add(self, tokens: list[int], sign: int = 1) -> None:
        """Adds (or with sign -1 removes) every suffix of ``tokens``, cut at DEPTH."""
        for start in range(len(tokens)):
            node = self.root
            for t in tokens[start: start + DEPTH]:
                child = node.children.get(t)
                if child is None:
                    child = node.children[t] = _Node()
                child.count += sign
                if child.count <= 0:
                    del node.children[t]
                    break
                node = child

    def match(self, tokens: list[int]) -> _Node | None:
        """The node of the longest suffix of ``tokens`` (at most MAX_PATTERN) in the
        trie that has a continuation."""
        for m in range(min(MAX_PATTERN, len(tokens)), 0, -1):
            node: _Node | None = self.root
            for t in tokens[len(tokens) - m:]:
                node = node.children.get(t)
                if node is None:
                    break
            if node is not None and node.children:
                return node
        return None

    @staticmethod
    def walk(node: _Node, k: int, min_probability: float) -> tuple[list[int], float]:
        """The most frequent path below ``node``: (tokens, expected accepted length)."""
        out: list[int] = []
        prob, score = 1.0, 0.0
        while len(out) < k and node.children:
            t, child = max(node.children.items(), key=lambda kv: kv[1].count)
            prob *= child.count / max(node.count, child.count)
            if prob < min_probability:
                break
            out.append(t)
            score += prob
            node = child
        return out, score


class _RequestTrie(_Trie):
    """A request's trie, grown as its tokens come."""

    def __init__(self) -> None:
        super().__init__()
        self.root.count = 1
        self.upto = 0
        # the nodes of the open suffixes, deepest (oldest start) first: the suffix that
        # started i tokens ago is at depth i, and is closed once it reaches DEPTH
        self.active: list[_Node] = []

    def extend(self, tokens: list[int]) -> None:
        root = self.root
        active = self.active
        for t in tokens[self.upto:]:
            active.append(root)
            for i, node in enumerate(active):
                child = node.children.get(t)
                if child is None:
                    child = node.children[t] = _Node()
                child.count += 1
                active[i] = child
            if len(active) >= DEPTH:
                del active[0]
            root.count += 1
        self.upto = len(tokens)


class SuffixProposer:
    def __init__(self, cache_size: int, min_probability: float) -> None:
        self.min_probability = min_probability
        self.cache_size = cache_size
        self.global_trie = _Trie()
        self._recent: deque[list[int]] = deque()

    def propose(self, seq: Sequence, k: int) -> list[int]:
        tokens = seq.all_token_ids
        own = seq.spec_state
        if not isinstance(own, _RequestTrie):
            own = seq.spec_state = _RequestTrie()
        own.extend(tokens)
        best: tuple[list[int], float] = ([], 0.0)
        for trie in (own, self.global_trie):
            node = trie.match(tokens)
            if node is not None:
                found = trie.walk(node, k, self.min_probability)
                if found[1] > best[1]:
                    best = found
        return best[0]

    def finished(self, seq: Sequence) -> None:
        """The output joins the global cache; the oldest leaves it when it is full."""
        if not seq.output_token_ids:
            return
        out = list(seq.output_token_ids)
        self._recent.append(out)
        self.global_trie.add(out)
        while len(self._recent) > self.cache_size:
            self.global_trie.add(self._recent.popleft(), sign=-1)
