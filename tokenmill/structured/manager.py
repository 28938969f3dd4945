"""Compiling grammars off the engine's step path, and each sequence's grammar state.

``StructuredOutputManager.grammar_for(params)`` is called when a request is made (in the
caller's thread: the server's event loop, or the offline API): it checks the constraint
against the limits (``limits.py``) and *parses* it at once, so an invalid or unboundedly
expensive constraint fails there with ValueError before the request is queued, and hands
the *compile* to a worker thread. It returns a future. Equal constraints
(``params.cache_key``) share one future: a schema used by many requests, or by the n
sequences of one request, is compiled once. Compiled grammars are kept in LRU order under a
budget in bytes (``CACHE_BYTES``, measured by the backend's ``memory_size``; one large
schema can take over 100 MiB) and a count (``CACHE_SIZE``).

Each constrained sequence holds a ``RequestGrammar``: the future, then (once compiled) its
own matcher. The scheduler does not admit a sequence whose grammar is still compiling;
the rest of the batch runs on meanwhile. The backend (xgrammar) is created on first use.

What one sequence's grammar may cost the engine thread is bounded: a compile that runs for
``COMPILE_TIMEOUT_S`` (or waits ``COMPILE_WAIT_TIMEOUT_S`` in all) fails the request, and a
sequence whose bitmask fill plus token accept takes more than ``MASK_STEP_BUDGET_S`` in one
step, or ``MASK_TOTAL_BUDGET_S`` over its life, is ended with an error after that step
(``RequestGrammar.failure``): its neighbours lose at most that one step. A normal fill
takes microseconds; an ambiguous regex that the limits let through can take seconds.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from tokenmill.sampling_params import StructuredOutputsParams
from tokenmill.structured.backend import GrammarBackend, GrammarMatcher
from tokenmill.structured.limits import check_constraint
from tokenmill.tokenizer import Tokenizer

logger = logging.getLogger("tokenmill")

CACHE_SIZE = 256                 # compiled grammars kept, at most
CACHE_BYTES = 256 * 1024 * 1024  # and their total memory_size, at most
COMPILE_TIMEOUT_S = 10.0         # a compile running longer fails its requests
COMPILE_WAIT_TIMEOUT_S = 60.0    # queued behind other compiles, then compiling
MASK_STEP_BUDGET_S = 0.2         # one sequence's grammar work in one step
MASK_TOTAL_BUDGET_S = 5.0        # ... and over its whole life


class _Compile:
    """One compile job: when it started running (None while it waits in the pool)."""

    __slots__ = ("started",)

    def __init__(self) -> None:
        self.started: float | None = None


class RequestGrammar:
    """One sequence's constraint: compiling, then a matcher that follows its tokens."""

    def __init__(self, future: Future, backend: GrammarBackend,
                 job: _Compile | None = None) -> None:
        self.future = future
        self.backend = backend
        self.matcher: GrammarMatcher | None = None
        self.job = job or _Compile()
        self.created = time.monotonic()
        self._error: BaseException | None = None
        self.mask_seconds = 0.0          # grammar work (fills and accepts) so far
        self.failure: str | None = None  # set when a budget is exceeded

    def ready(self) -> bool:
        """True once the grammar is compiled (creates the matcher on the first call)."""
        if self.matcher is None:
            if self._error is not None or not self.future.done():
                return False
            if self.future.exception() is not None:
                return False
            try:
                self.matcher = self.backend.new_matcher(self.future.result())
            except Exception as e:  # reported by error(); the request fails, not the step
                self._error = e
                return False
        return True

    def error(self) -> BaseException | None:
        """Why this grammar cannot be used: the compile failed, or timed out."""
        if self._error is not None:
            return self._error
        if self.future.done():
            return self.future.exception()
        now = time.monotonic()
        started = self.job.started
        if started is not None and now - started > COMPILE_TIMEOUT_S:
            return TimeoutError(f"compiling took more than {COMPILE_TIMEOUT_S:g} s")
        if now - self.created > COMPILE_WAIT_TIMEOUT_S:
            return TimeoutError(f"no compiled grammar after {COMPILE_WAIT_TIMEOUT_S:g} s")
        return None

    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        """Writes the allowed tokens into ``bitmask[row]``, timed against the budgets."""
        start = time.perf_counter()
        try:
            self.backend.fill_bitmask([self.matcher], bitmask, [row])
        finally:
            self._charge(time.perf_counter() - start, "filling its token mask")

    def accept(self, token_id: int) -> bool:
        if self.matcher is None:
            return False
        start = time.perf_counter()
        try:
            return self.matcher.accept_token(token_id)
        finally:
            self._charge(time.perf_counter() - start, "accepting a token")

    def is_terminated(self) -> bool:
        return self.matcher is not None and self.matcher.is_terminated()

    def _charge(self, seconds: float, what: str) -> None:
        self.mask_seconds += seconds
        if self.failure is not None:
            return
        if seconds > MASK_STEP_BUDGET_S:
            self.failure = (f"the grammar is too expensive: {what} took {seconds * 1000:.0f} "
                            f"ms (limit {MASK_STEP_BUDGET_S * 1000:.0f} ms per step)")
        elif self.mask_seconds > MASK_TOTAL_BUDGET_S:
            self.failure = (f"the grammar is too expensive: {self.mask_seconds:.1f} s of "
                            f"grammar work (limit {MASK_TOTAL_BUDGET_S:g} s per sequence)")


def _memory_size(compiled) -> int:
    size = getattr(compiled, "memory_size_bytes", None)
    if callable(size):
        size = size()
    return int(size) if isinstance(size, int) else 0


class StructuredOutputManager:
    def __init__(self, tokenizer: Tokenizer | None, vocab_size: int,
                 backend_factory=None, cache_bytes: int | None = None,
                 cache_size: int | None = None) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self._factory = backend_factory
        self._backend: GrammarBackend | None = None
        self._lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None
        self.cache_bytes = CACHE_BYTES if cache_bytes is None else cache_bytes
        self.cache_size = CACHE_SIZE if cache_size is None else cache_size
        # key -> (future, its compile job, its size in bytes once compiled)
        self._cache: OrderedDict[tuple, tuple[Future, _Compile]] = OrderedDict()
        self._sizes: dict[tuple, int] = {}
        self.cached_bytes = 0

    @property
    def backend(self) -> GrammarBackend:
        """The grammar backend, created (xgrammar imported) on first use."""
        with self._lock:
            if self._backend is None:
                if self.tokenizer is None:
                    raise ValueError("structured outputs need a tokenizer; this engine was "
                                     "started without one.")
                factory = self._factory
                if factory is None:
                    from tokenmill.structured.xgrammar_backend import XGrammarBackend

                    factory = XGrammarBackend
                self._backend = factory(self.tokenizer, self.vocab_size)
                self._pool = ThreadPoolExecutor(1, thread_name_prefix="tokenmill-grammar")
            return self._backend

    def warm_up(self) -> threading.Thread:
        """Creates the backend in a background thread (the server does this at start-up
        so that its first constrained request does not wait for the import)."""
        def run() -> None:
            try:
                _ = self.backend
            except Exception:  # reported again, properly, by the first request
                logger.exception("could not start the structured-output backend")

        thread = threading.Thread(target=run, name="tokenmill-grammar-warmup", daemon=True)
        thread.start()
        return thread

    def grammar_for(self, params: StructuredOutputsParams) -> RequestGrammar:
        """A new sequence's grammar state for ``params``. Raises ValueError at once if the
        constraint is invalid or over the limits; compiling happens in the background."""
        backend = self.backend
        key = params.cache_key
        with self._lock:
            entry = self._cache.get(key)
            if entry is not None:
                self._cache.move_to_end(key)
        if entry is None:
            check_constraint(params)         # ValueError for an unbounded constraint
            grammar = backend.parse(params)  # ValueError for a bad constraint
            submitted = None
            with self._lock:
                entry = self._cache.get(key)
                if entry is None:
                    job = _Compile()
                    entry = submitted = (self._pool.submit(_compile, backend, grammar, job),
                                         job)
                    self._cache[key] = entry
                    self._evict()
            if submitted is not None:  # outside the lock: it may run here and now
                submitted[0].add_done_callback(lambda f: self._compiled(key, f))
        return RequestGrammar(entry[0], backend, entry[1])

    def _compiled(self, key: tuple, future: Future) -> None:
        """Accounts a finished compile in the cache (a failed one is dropped, so that the
        constraint is compiled again next time)."""
        with self._lock:
            entry = self._cache.get(key)
            if entry is None or entry[0] is not future:
                return
            if future.exception() is not None:
                del self._cache[key]
                return
            size = _memory_size(future.result())
            self._sizes[key] = size
            self.cached_bytes += size
            self._evict()

    def _evict(self) -> None:
        """Drops least recently used grammars until the cache fits its budgets (sequences
        that hold one keep it alive; it is only not found again). Call with the lock."""
        for key in list(self._cache):
            if len(self._cache) <= self.cache_size and self.cached_bytes <= self.cache_bytes:
                return
            del self._cache[key]
            self.cached_bytes -= self._sizes.pop(key, 0)


def _compile(backend: GrammarBackend, grammar, job: _Compile):
    job.started = time.monotonic()
    return backend.compile(grammar)
