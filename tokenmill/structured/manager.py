"""Compiling grammars off the engine's step path, and each sequence's grammar state.

``StructuredOutputManager.grammar_for(params)`` is called when a request is made (in the
caller's thread: the server's event loop, or the offline API): it *parses* the constraint
at once, so an invalid schema fails there with ValueError before the request is queued,
and hands the *compile* to a worker thread. It returns a future. Equal constraints
(``params.cache_key``) share one future: a schema used by many requests, or by the n
sequences of one request, is compiled once; the last ``CACHE_SIZE`` are kept.

Each constrained sequence holds a ``RequestGrammar``: the future, then (once compiled) its
own matcher. The scheduler does not admit a sequence whose grammar is still compiling;
the rest of the batch runs on meanwhile. The backend (xgrammar) is created on first use.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor

from tokenmill.sampling_params import StructuredOutputsParams
from tokenmill.structured.backend import GrammarBackend, GrammarMatcher
from tokenmill.tokenizer import Tokenizer

logger = logging.getLogger("tokenmill")

CACHE_SIZE = 256


class RequestGrammar:
    """One sequence's constraint: compiling, then a matcher that follows its tokens."""

    def __init__(self, future: Future, backend: GrammarBackend) -> None:
        self.future = future
        self.backend = backend
        self.matcher: GrammarMatcher | None = None

    def ready(self) -> bool:
        """True once the grammar is compiled (creates the matcher on the first call)."""
        if self.matcher is None:
            if not self.future.done() or self.future.exception() is not None:
                return False
            self.matcher = self.backend.new_matcher(self.future.result())
        return True

    def error(self) -> BaseException | None:
        """The compile error, if compiling failed."""
        return self.future.exception() if self.future.done() else None

    def accept(self, token_id: int) -> bool:
        return self.matcher is not None and self.matcher.accept_token(token_id)

    def is_terminated(self) -> bool:
        return self.matcher is not None and self.matcher.is_terminated()


class StructuredOutputManager:
    def __init__(self, tokenizer: Tokenizer | None, vocab_size: int,
                 backend_factory=None) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self._factory = backend_factory
        self._backend: GrammarBackend | None = None
        self._lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None
        self._cache: OrderedDict[tuple, Future] = OrderedDict()

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
        constraint is invalid; compiling happens in the background."""
        backend = self.backend
        key = params.cache_key
        with self._lock:
            future = self._cache.get(key)
            if future is not None:
                self._cache.move_to_end(key)
        if future is None:
            grammar = backend.parse(params)  # ValueError for a bad constraint
            with self._lock:
                future = self._cache.get(key)
                if future is None:
                    future = self._pool.submit(backend.compile, grammar)
                    self._cache[key] = future
                    while len(self._cache) > CACHE_SIZE:
                        self._cache.popitem(last=False)
        return RequestGrammar(future, backend)
