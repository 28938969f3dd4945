"""Stored responses (``store: true``), in memory, bounded, least recently used first out.

Each entry is the response object (what ``GET /v1/responses/{id}`` returns) and the
conversation up to and including it as chat messages (what a later request with
``previous_response_id`` continues). Two bounds, whichever is reached first evicts the
least recently used entries: ``max_entries`` responses and ``max_chars`` characters of
stored conversation (an estimate of memory; a chain of responses shares its messages, so
the real footprint is smaller). An evicted or deleted id is unknown: a 404.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from tokenmill.server.errors import APIError

DEFAULT_MAX_STORED_RESPONSES = 1024
DEFAULT_MAX_STORED_CHARS = 64 * 1024 * 1024


@dataclass(frozen=True)
class StoredResponse:
    response: dict[str, Any]        # the response object as JSON
    messages: list[dict[str, Any]]  # the conversation so far, as chat messages
    chars: int


def response_not_found(response_id: str, param: str | None = None) -> APIError:
    shown = response_id if len(response_id) <= 100 else response_id[:100] + "..."
    return APIError(404, f"Response with id '{shown}' not found (it was never stored, "
                         "was deleted, or has expired from this server's memory).",
                    param=param, code="response_not_found")


class ResponseStore:
    def __init__(self, max_entries: int = DEFAULT_MAX_STORED_RESPONSES,
                 max_chars: int = DEFAULT_MAX_STORED_CHARS) -> None:
        if max_entries < 1 or max_chars < 1:
            raise ValueError("the response store needs room for at least one entry")
        self.max_entries, self.max_chars = max_entries, max_chars
        self._entries: OrderedDict[str, StoredResponse] = OrderedDict()
        self._chars = 0

    def __len__(self) -> int:
        return len(self._entries)

    def put(self, response: dict[str, Any], messages: list[dict[str, Any]]) -> None:
        """Stores ``response`` (keyed by its id); evicts the least recently used to fit. A
        response larger than the whole budget is not stored."""
        chars = len(json.dumps(messages, ensure_ascii=False)) + len(json.dumps(response))
        if chars > self.max_chars:
            return
        self.delete(response["id"])
        self._entries[response["id"]] = StoredResponse(response, messages, chars)
        self._chars += chars
        while len(self._entries) > self.max_entries or self._chars > self.max_chars:
            _, old = self._entries.popitem(last=False)
            self._chars -= old.chars

    def get(self, response_id: str, param: str | None = None) -> StoredResponse:
        """The entry (now the most recently used), or a 404 in OpenAI's shape."""
        entry = self._entries.get(response_id)
        if entry is None:
            raise response_not_found(response_id, param)
        self._entries.move_to_end(response_id)
        return entry

    def delete(self, response_id: str) -> bool:
        entry = self._entries.pop(response_id, None)
        if entry is None:
            return False
        self._chars -= entry.chars
        return True
