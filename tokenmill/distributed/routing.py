"""Request routing over replicas (workers): an approximate prefix tree and three policies.

Pure Python, no I/O: the data-parallel front end (``tokenmill.replicas``) routes prompts
as token ids, the standalone router (``tokenmill.router``) routes request text.

``PrefixTree`` remembers which prompts each *tenant* (a replica or worker) has served, at
chunk granularity: a prompt is cut into chunks of ``chunk`` items (tokens or characters)
and walked down a trie whose edges are whole chunks. A replica's prefix cache also works
in whole KV blocks, so with ``chunk`` = the block size a match in the tree is the part of
the prompt the replica can have cached. Every node records, per tenant, when the tenant
last used it. Inserting a prompt for a tenant touches the path leaf first, root last, so a
tenant's marks are never newer below a node than at it; each tenant's marks are kept in
LRU order and, when the tenant holds more than ``max_chunks_per_tenant`` of them, the
oldest are dropped, which are always the deepest of their path. A tenant's marks therefore
always form a set closed under "parent of" and a tenant's match is the deepest node on the
prompt's path that carries its mark. Nodes no tenant marks are unlinked. It is
*approximate*: the replica's own cache may have evicted what the tree still lists, or
hold what the tree has dropped.

Policies (``make_policy``):

- ``round_robin``: tenants in turn.
- ``least_load``: the tenant with the fewest requests in flight (ties: the one whose
  tree holds the fewest chunks, then the first).
- ``cache_aware`` (SGLang's router): when the load is imbalanced, i.e. the busiest tenant
  has more than ``balance_abs_threshold`` requests more than the idlest *and* more than
  ``balance_rel_threshold`` times as many, route to the least loaded (the cache cannot
  pay for a queue). Otherwise the tenant with the longest prefix match wins (ties: the
  less loaded); when even the best match is under ``cache_threshold`` of the prompt, the
  prompt is new to everyone and goes to the least loaded tenant, which also spreads new
  prefixes over the tenants. The chosen tenant's marks are then updated with the prompt.

Load is what the caller reports: ``Router.started(tenant)`` / ``Router.finished(tenant)``
around each request (the router counts them).
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field

POLICIES = ("cache_aware", "least_load", "round_robin")


@dataclass(eq=False)
class _Node:
    key: tuple | str | None
    parent: _Node | None
    children: dict = field(default_factory=dict)
    tenants: set = field(default_factory=set)


class PrefixTree:
    """Which tenant has served which prompt prefixes, in chunks (see the module doc)."""

    def __init__(self, chunk: int = 16, max_chunks_per_tenant: int = 65536) -> None:
        if chunk < 1 or max_chunks_per_tenant < 1:
            raise ValueError("chunk and max_chunks_per_tenant must be >= 1")
        self.chunk = chunk
        self.max_chunks = max_chunks_per_tenant
        self.root = _Node(None, None)
        self._lru: dict[Hashable, OrderedDict[int, _Node]] = {}

    def _chunks(self, prompt: Sequence) -> list:
        c = self.chunk
        whole = len(prompt) - len(prompt) % c
        if isinstance(prompt, str):
            return [prompt[i:i + c] for i in range(0, whole, c)]
        return [tuple(prompt[i:i + c]) for i in range(0, whole, c)]

    def match(self, prompt: Sequence) -> dict[Hashable, int]:
        """Per tenant, how many leading items of ``prompt`` it has served (whole chunks)."""
        best: dict[Hashable, int] = {}
        node = self.root
        for depth, key in enumerate(self._chunks(prompt), 1):
            node = node.children.get(key)
            if node is None:
                break
            for t in node.tenants:
                best[t] = depth * self.chunk
        return best

    def insert(self, prompt: Sequence, tenant: Hashable) -> None:
        """Marks every whole chunk of ``prompt`` as served by ``tenant``."""
        lru = self._lru.setdefault(tenant, OrderedDict())
        path = []
        node = self.root
        for key in self._chunks(prompt):
            child = node.children.get(key)
            if child is None:
                child = node.children[key] = _Node(key, node)
            path.append(child)
            node = child
        for n in reversed(path):  # leaf first: ancestors end up more recent
            n.tenants.add(tenant)
            lru[id(n)] = n
            lru.move_to_end(id(n))
        while len(lru) > self.max_chunks:
            _, oldest = lru.popitem(last=False)
            self._unmark(oldest, tenant)

    def remove_tenant(self, tenant: Hashable) -> None:
        """Forgets everything ``tenant`` served (its cache is gone)."""
        lru = self._lru.pop(tenant, OrderedDict())
        for n in lru.values():  # oldest (deepest) first
            self._unmark(n, tenant)

    def size(self, tenant: Hashable) -> int:
        """Chunks marked for ``tenant``."""
        return len(self._lru.get(tenant, ()))

    def num_nodes(self) -> int:
        count, stack = 0, [self.root]
        while stack:
            n = stack.pop()
            count += 1
            stack.extend(n.children.values())
        return count - 1

    @staticmethod
    def _unmark(node: _Node, tenant: Hashable) -> None:
        node.tenants.discard(tenant)
        while node.parent is not None and not node.tenants and not node.children:
            del node.parent.children[node.key]
            node = node.parent


@dataclass(frozen=True)
class RouterConfig:
    """The router's knobs; the defaults are SGLang router's."""

    policy: str = "cache_aware"
    chunk: int = 16                   # tokens (or characters) per tree edge
    max_chunks_per_tenant: int = 65536
    cache_threshold: float = 0.3      # a match under this share of the prompt is no match
    balance_abs_threshold: int = 32   # in-flight requests
    balance_rel_threshold: float = 1.5

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ValueError(f"unknown routing policy {self.policy!r}; choose one of "
                             f"{', '.join(POLICIES)}.")


class Router:
    """Picks a tenant for each prompt among the tenants currently admitted."""

    def __init__(self, config: RouterConfig = RouterConfig()) -> None:
        self.config = config
        self.tree = PrefixTree(config.chunk, config.max_chunks_per_tenant)
        self.load: dict[Hashable, int] = {}
        self._turn = itertools.count()
        self.routed = 0
        self.matched_items = 0  # prompt items routed to a tenant that had served them

    # ---- tenants ----------------------------------------------------------------------
    def add_tenant(self, tenant: Hashable) -> None:
        self.load.setdefault(tenant, 0)

    def remove_tenant(self, tenant: Hashable) -> None:
        """Stops routing to ``tenant`` and forgets its cache (it died or left)."""
        self.load.pop(tenant, None)
        self.tree.remove_tenant(tenant)

    @property
    def tenants(self) -> list[Hashable]:
        return list(self.load)

    def started(self, tenant: Hashable) -> None:
        if tenant in self.load:
            self.load[tenant] += 1

    def finished(self, tenant: Hashable) -> None:
        if tenant in self.load and self.load[tenant] > 0:
            self.load[tenant] -= 1

    # ---- routing ----------------------------------------------------------------------
    def route(self, prompt: Sequence, exclude: frozenset = frozenset()) -> Hashable:
        """The tenant for ``prompt`` (ids or text); raises LookupError when none is left."""
        tenants = [t for t in self.load if t not in exclude]
        if not tenants:
            raise LookupError("no replica or worker is available")
        policy = self.config.policy
        if policy == "round_robin":
            choice = tenants[next(self._turn) % len(tenants)]
        elif policy == "least_load":
            choice = self._least_loaded(tenants)
        else:
            choice = self._cache_aware(prompt, tenants)
        self.routed += 1
        if policy != "cache_aware":  # the others do not walk the tree on the way
            self.matched_items += self.tree.match(prompt).get(choice, 0)
        self.tree.insert(prompt, choice)
        return choice

    def _least_loaded(self, tenants: list[Hashable]) -> Hashable:
        # ties: the tenant holding the least, so new prefixes spread over the tenants
        return min(tenants, key=lambda t: (self.load[t], self.tree.size(t)))

    def _cache_aware(self, prompt: Sequence, tenants: list[Hashable]) -> Hashable:
        c = self.config
        loads = [self.load[t] for t in tenants]
        hi, lo = max(loads), min(loads)
        matches = self.tree.match(prompt)
        if hi - lo > c.balance_abs_threshold and hi > c.balance_rel_threshold * lo:
            choice = self._least_loaded(tenants)
        else:
            best = max(tenants, key=lambda t: (matches.get(t, 0), -self.load[t]))
            if matches.get(best, 0) < c.cache_threshold * len(prompt):
                best = self._least_loaded(tenants)
            choice = best
        self.matched_items += matches.get(choice, 0)
        return choice
