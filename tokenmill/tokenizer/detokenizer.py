"""Incremental detokenization: turning a growing list of output token ids into streamable text.

Decoding the whole output after every token costs O(n) per token, O(n^2) per request. Decoding
each token on its own is wrong in two ways: a byte-level BPE token can hold half of a UTF-8
character (an emoji is often split over 2-4 tokens), and SentencePiece decoders drop the leading
space of the *first* token they see (``"▁world"`` alone decodes to ``"world"``).

The algorithm (vLLM's ``detokenize_incrementally``, HF's ``TextStreamer``, tokenizers'
``DecodeStream``) keeps two offsets into the output ids::

    ids:   ... | prefix_offset ........ read_offset ........ | new token(s)
                 `---- already emitted, kept as context ---'

and after each new token decodes only the window ``ids[prefix_offset:]``. The window's text
minus the text of ``ids[prefix_offset:read_offset]`` (cached) is the new text. It is emitted only
if it does not end in U+FFFD, the replacement character an unfinished UTF-8 sequence decodes to;
otherwise we wait for the next token to complete the character. After emitting, the window
slides: ``prefix_offset`` moves to the old ``read_offset`` (one or a few tokens of context) and
``read_offset`` to the end. Each step therefore decodes a handful of tokens, and the emitted
pieces concatenate to exactly ``tokenizer.decode(output_ids)``.

Stop strings are found by one Aho-Corasick automaton over all of them (``StopMatcher``, built
once per distinct list and shared): each new character moves its state once (amortized O(1),
whatever the number or length of the stop strings), so a stop string spanning tokens is found
and matching stays linear in the text. The state is the longest suffix of the text that is a
prefix of some stop string: that suffix, and only that, is held back from
``text(finished=False)``, so a stop string never appears in streamed output unless
``include_stop_str_in_output`` is set.
"""

from __future__ import annotations

import functools
from collections import deque
from collections.abc import Sequence

from tokenmill.tokenizer.tokenizer import Tokenizer

__all__ = ["IncrementalDetokenizer"]

_REPLACEMENT_CHAR = "\ufffd"
_CHAR_BITS = 21  # code points are < 2**21: a transition's key is node << 21 | code point


class StopMatcher:
    """An Aho-Corasick automaton over a set of stop strings.

    State 0 is the empty string; state s stands for ``prefix(s)``, a prefix of some stop
    string of length ``depth[s]``. After a text has been fed, the state is the longest
    suffix of the text that is a prefix of some stop string; ``match[s]`` is the length of
    the longest stop string that is a suffix of ``prefix(s)`` (0: none).
    """

    def __init__(self, stops: Sequence[str]) -> None:
        goto: dict[int, int] = {}
        depth, match = [0], [0]
        children: list[list[tuple[int, int]]] = [[]]
        for stop in stops:
            node = 0
            for ch in stop:
                key = node << _CHAR_BITS | ord(ch)
                nxt = goto.get(key)
                if nxt is None:
                    nxt = goto[key] = len(depth)
                    depth.append(depth[node] + 1)
                    match.append(0)
                    children.append([])
                    children[node].append((ord(ch), nxt))
                node = nxt
            match[node] = len(stop)
        fail = [0] * len(depth)
        queue = deque(child for _, child in children[0])
        while queue:
            node = queue.popleft()
            for code, child in children[node]:
                f = fail[node]
                while f and (f << _CHAR_BITS | code) not in goto:
                    f = fail[f]
                target = goto.get(f << _CHAR_BITS | code, 0)
                fail[child] = target if target != child else 0
                if not match[child]:
                    match[child] = match[fail[child]]
                queue.append(child)
        self._goto, self._fail, self.depth, self.match = goto, fail, depth, match

    def feed(self, state: int, text: str, start: int = 0) -> tuple[int, int]:
        """Feeds ``text[start:]`` from ``state``; returns (state, end) where ``end`` is the
        index just past the first stop string completed, or -1 (then ``state`` is after the
        whole text). The stop string found is ``text[end - match[state]:end]``, the longest
        of those ending there."""
        goto, fail, match = self._goto, self._fail, self.match
        for i in range(start, len(text)):
            code = ord(text[i])
            while True:
                nxt = goto.get(state << _CHAR_BITS | code)
                if nxt is not None:
                    state = nxt
                    break
                if state == 0:
                    break
                state = fail[state]
            if match[state]:
                return state, i + 1
        return state, -1


@functools.lru_cache(maxsize=16)
def stop_matcher(stops: tuple[str, ...]) -> StopMatcher:
    """The automaton for these stop strings, shared by the sequences that use them."""
    return StopMatcher(stops)


class IncrementalDetokenizer:
    """Streams the text of one request's output tokens and detects its stop strings.

    ``prompt_token_ids`` is accepted for interface stability but not needed: the output text is
    defined as ``tokenizer.decode(output_ids)``, which depends on output tokens only.
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        prompt_token_ids: Sequence[int],
        *,
        skip_special_tokens: bool = True,
        stop: Sequence[str] = (),
        include_stop_str_in_output: bool = False,
    ) -> None:
        if isinstance(stop, str):
            raise ValueError("stop must be a list of strings, not a single string")
        if any(not isinstance(s, str) or not s for s in stop):
            raise ValueError(f"stop strings must be non-empty strings, got {list(stop)!r}")
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        self._stops: tuple[str, ...] = tuple(dict.fromkeys(stop))  # dedupe, keep order
        self._include_stop = include_stop_str_in_output
        self._matcher = stop_matcher(self._stops) if self._stops else None
        self._state = 0  # the matcher's state after self._text

        self._ids: list[int] = []
        self._prefix_offset = 0  # window start (context tokens already emitted)
        self._read_offset = 0  # tokens before this are fully emitted
        self._prefix_text = ""  # decode(ids[prefix_offset:read_offset])
        self._text = ""  # decode(ids[:read_offset]), built from emitted pieces
        self._stop_string: str | None = None
        self._final_text: str | None = None

    @property
    def token_count(self) -> int:
        """Number of output tokens added so far."""
        return len(self._ids)

    @property
    def stop_string(self) -> str | None:
        """The stop string that ended the output, or None."""
        return self._stop_string

    def add_token(self, token_id: int) -> str | None:
        """Append one generated token; return the stop string if this token completed one.

        Once a stop string is returned the text is final and no more tokens may be added.
        """
        if self._stop_string is not None:
            raise ValueError(
                f"output already ended at stop string {self._stop_string!r}; "
                "do not add tokens to a finished request"
            )
        self._ids.append(token_id)
        old_len = len(self._text)
        if not self._advance() or self._matcher is None:
            return None
        self._state, end = self._matcher.feed(self._state, self._text, old_len)
        if end == -1:
            return None
        start = end - self._matcher.match[self._state]
        self._stop_string = self._text[start:end]
        self._final_text = self._text[: end if self._include_stop else start]
        return self._stop_string

    def text(self, finished: bool) -> str:
        """The cumulative output text that is safe to show.

        While not finished, a tail that could still grow into a stop string and an unfinished
        UTF-8 character are held back. When finished, everything is returned (an unfinished
        character as U+FFFD); text is cut at a stop string (kept if include_stop_str_in_output).
        """
        if self._final_text is not None:
            return self._final_text
        if finished:
            full = self._text + self._pending_text()
            if self._matcher is None:
                return full
            state, end = self._matcher.feed(self._state, full, len(self._text))
            if end == -1:
                return full
            return full[: end if self._include_stop else end - self._matcher.match[state]]
        if self._matcher is None or self._include_stop:
            return self._text
        # the longest suffix that may still grow into a stop string
        return self._text[: len(self._text) - self._matcher.depth[self._state]]

    # ------------------------------------------------------------------ internals

    def _decode(self, ids: Sequence[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip_special_tokens)

    def _pending_text(self) -> str:
        """Text of the tokens after ``read_offset`` (may end in U+FFFD)."""
        if self._read_offset == len(self._ids):
            return ""
        return self._decode(self._ids[self._prefix_offset :])[len(self._prefix_text) :]

    def _advance(self) -> bool:
        """Decode the window; if it yields complete new text, append it and slide the window."""
        window_text = self._decode(self._ids[self._prefix_offset :])
        if len(window_text) <= len(self._prefix_text) or window_text.endswith(_REPLACEMENT_CHAR):
            return False  # nothing visible yet (skipped special token, or half a character)
        self._text += window_text[len(self._prefix_text) :]
        old_read, self._read_offset = self._read_offset, len(self._ids)
        context_text = self._decode(self._ids[old_read : self._read_offset])
        if context_text:
            self._prefix_offset, self._prefix_text = old_read, context_text
        else:
            # The newly read tokens render as nothing on their own (e.g. a skipped special
            # token followed by an empty piece): keep the older context so decoders that treat
            # the first token specially (SentencePiece's leading space) still see it.
            self._prefix_text = window_text
        return True
