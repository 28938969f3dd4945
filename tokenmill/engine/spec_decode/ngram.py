"""N-gram proposals (prompt lookup) over a sequence's own prompt and output.

The proposal for a sequence of tokens ``t[0:L]``: for n from ``max_n`` down to ``min_n``,
find the earlier occurrences of its last n tokens ``t[L-n:L]``; of those, take the most
recent one (ending at ``e < L``) if k tokens follow it, else the first one (the longest
continuation); propose ``t[e:e+k]``. The index of every n-gram's first and latest end is
built incrementally (each token is indexed once per n), so a proposal costs O(max_n - min_n)
dictionary lookups, not a scan of the sequence.
"""

from __future__ import annotations

from tokenmill.engine.sequence import Sequence


class _NgramIndex:
    """For each n: n-gram (as a tuple) -> the ends (exclusive) of its first and latest
    occurrences, over the ends indexed so far."""

    __slots__ = ("ends", "upto")

    def __init__(self, ns: range) -> None:
        self.ends: dict[int, dict[tuple[int, ...], list[int]]] = {n: {} for n in ns}
        self.upto = 0  # ends 1..upto-1 indexed

    def extend(self, tokens: list[int], upto: int) -> None:
        """Indexes the n-grams ending at positions ``self.upto .. upto - 1``."""
        for end in range(max(self.upto, 1), upto):
            for n, table in self.ends.items():
                if end >= n:
                    seen = table.setdefault(tuple(tokens[end - n: end]), [end, end])
                    seen[1] = end
        self.upto = max(self.upto, upto)


class NgramProposer:
    def __init__(self, min_n: int, max_n: int) -> None:
        self.ns = range(max_n, min_n - 1, -1)

    def propose(self, seq: Sequence, k: int) -> list[int]:
        """Up to k tokens that followed an earlier occurrence of the longest matching
        suffix; [] when none matches."""
        tokens = seq.all_token_ids
        length = len(tokens)
        index = seq.spec_state
        if not isinstance(index, _NgramIndex):
            index = seq.spec_state = _NgramIndex(self.ns)
        index.extend(tokens, length)  # every end < length, so a match is never itself
        for n in self.ns:
            if length <= n:
                continue
            ends = index.ends[n].get(tuple(tokens[length - n:]))
            if ends is not None:
                end = ends[1] if length - ends[1] >= k else ends[0]
                return tokens[end: end + k]
        return []

    def finished(self, seq: Sequence) -> None:
        """Nothing is kept across requests."""
