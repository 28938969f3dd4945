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

Stop strings are searched in the new text plus the last ``len(stop) - 1`` characters before it,
so a stop string spanning tokens is found and the search stays O(new text). Text that could still
become a stop string (a suffix equal to a proper prefix of some stop string) is held back from
``text(finished=False)``, so a stop string never appears in streamed output unless
``include_stop_str_in_output`` is set.
"""

from __future__ import annotations

from collections.abc import Sequence

from tokenmill.tokenizer.tokenizer import Tokenizer

__all__ = ["IncrementalDetokenizer"]

_REPLACEMENT_CHAR = "\ufffd"


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
        self._max_stop_len = max((len(s) for s in self._stops), default=0)
        # Every proper prefix of every stop string: a text suffix in here may grow into a stop.
        self._stop_prefixes = {s[:k] for s in self._stops for k in range(1, len(s))}

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
        if not self._advance() or not self._stops:
            return None
        match = self._find_stop(self._text, old_len)
        if match is None:
            return None
        start, end, stop = match
        self._stop_string = stop
        self._final_text = self._text[: end if self._include_stop else start]
        return stop

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
            match = self._find_stop(full, len(self._text)) if self._stops else None
            if match is None:
                return full
            start, end, _ = match
            return full[: end if self._include_stop else start]
        if not self._stops or self._include_stop:
            return self._text
        return self._text[: len(self._text) - self._held_back(self._text)]

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

    def _find_stop(self, text: str, old_len: int) -> tuple[int, int, str] | None:
        """Earliest-ending stop string in ``text`` that ends after ``old_len``.

        Returns ``(start, end, stop)``. Earliest *end* is what a character-by-character stream
        would hit first; ties go to the earlier start (the longer stop string).
        """
        best: tuple[int, int, str] | None = None
        for stop in self._stops:
            start = text.find(stop, max(0, old_len - len(stop) + 1))
            if start == -1:
                continue
            end = start + len(stop)
            if best is None or (end, start) < (best[1], best[0]):
                best = (start, end, stop)
        return best

    def _held_back(self, text: str) -> int:
        """Length of the longest suffix of ``text`` that is a proper prefix of a stop string."""
        for k in range(min(len(text), self._max_stop_len - 1), 0, -1):
            if text[-k:] in self._stop_prefixes:
                return k
        return 0
