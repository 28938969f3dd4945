"""Every bound the server puts on a request, in one place.

A request is checked in layers before the engine sees it, each refusal a 4xx in OpenAI's
error shape naming what is wrong (never a 500, never Python's own exception text):

1. the connection (``http_guard``): a request head must arrive within
   ``--request-read-timeout`` seconds, the body too (408), and the body may not exceed
   ``--max-request-body-bytes`` (413); ``--max-connections`` caps open connections; a
   client that stops reading its response for ``--stream-stall-timeout`` seconds is
   dropped (its request aborted);
2. the JSON body (``http_guard``): ``Content-Type: application/json`` (415), a JSON object,
   no ``NaN``/``Infinity`` (nor numbers that overflow to them), no lone surrogates in any
   string, at most ``MAX_JSON_DEPTH`` levels of nesting (400 naming the field);
3. the request models (``protocol``): every count, length and integer bounded with the
   constants below, OpenAI's limits where OpenAI has them (``n``, ``top_logprobs``,
   ``tools``, ``metadata``), and ranges the engine's tensors can hold for the rest;
4. the handlers: served model names only, ``priority`` only when the operator allows it,
   the prompt against the context, and the number of queued sequences (429).

The constants are not flags: the OpenAPI schema states them, so that it describes what
the server accepts. The operator's knobs are in ``ServerLimits``.
"""

from __future__ import annotations

from dataclasses import dataclass

# Shared with SamplingParams, which refuses the same values (ValueError) for the offline API:
# choices per prompt (OpenAI: 128), logprobs / top_logprobs / prompt_logprobs (OpenAI: 20),
# stop strings (OpenAI: 4; vLLM: any) and characters in each, entries in logit_bias,
# stop_token_ids and choice lists, structured_outputs.max_whitespace.
from tokenmill.sampling_params import (
    MAX_CHOICES,
    MAX_LOGIT_BIAS,
    MAX_LOGPROBS,
    MAX_N,
    MAX_STOP_TOKEN_IDS,
)
from tokenmill.sampling_params import MAX_STOP_STRING_LEN as MAX_STOP_CHARS
from tokenmill.sampling_params import MAX_STOP_STRINGS as MAX_STOP
from tokenmill.sampling_params import MAX_WHITESPACE_LIMIT as MAX_WHITESPACE

__all__ = [
    "DEFAULT_MAX_CONNECTIONS", "DEFAULT_MAX_QUEUED_SEQUENCES", "DEFAULT_MAX_REQUEST_BODY_BYTES",
    "DEFAULT_REQUEST_READ_TIMEOUT_S", "DEFAULT_STREAM_STALL_TIMEOUT_S", "INT32_MAX",
    "INT64_MAX", "INT64_MIN", "MAX_CHOICES", "MAX_EMBEDDING_INPUTS", "MAX_SCORE_DOCUMENTS",
    "MAX_JSON_BYTES", "MAX_JSON_DEPTH", "MAX_LOGIT_BIAS", "MAX_LOGPROBS", "MAX_N",
    "MAX_NAME_CHARS", "MAX_PRIORITY", "MAX_PROMPTS", "MAX_STOP", "MAX_STOP_CHARS",
    "MAX_STOP_TOKEN_IDS", "MAX_TEMPLATE_KWARGS_DEPTH", "MAX_TOOLS", "MAX_TOOL_CALLS",
    "MAX_WHITESPACE", "METADATA_KEY_CHARS", "METADATA_PAIRS", "METADATA_VALUE_CHARS",
    "ServerLimits", "DEFAULT_MAX_QUEUED_INPUTS",
]

INT32_MAX = 2**31 - 1
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1

MAX_PROMPTS = 64              # prompts in one /v1/completions request
MAX_TOOLS = 128               # tools in one request (OpenAI: 128)
MAX_TOOL_CALLS = 128          # tool calls in one assistant message
MAX_JSON_BYTES = 64 * 1024    # a schema, a grammar, a tool definition, chat_template_kwargs
MAX_JSON_DEPTH = 64           # nesting of the whole body (and of tool-call arguments)
MAX_TEMPLATE_KWARGS_DEPTH = 16
MAX_NAME_CHARS = 256          # model names, message names, tool-call ids
MAX_PRIORITY = 1000           # |priority|, when the operator allows priorities at all
METADATA_PAIRS, METADATA_KEY_CHARS, METADATA_VALUE_CHARS = 16, 64, 512  # OpenAI's
MAX_EMBEDDING_INPUTS = 2048   # inputs in one /v1/embeddings request (OpenAI: 2048)
MAX_SCORE_DOCUMENTS = 1000    # documents in one /v1/score or /rerank request (Cohere: 1000)
DEFAULT_MAX_QUEUED_INPUTS = 16 * MAX_EMBEDDING_INPUTS  # encoder inputs waiting, else 429

DEFAULT_MAX_REQUEST_BODY_BYTES = 4 * 1024 * 1024
DEFAULT_REQUEST_READ_TIMEOUT_S = 30.0
DEFAULT_MAX_CONNECTIONS = 512
DEFAULT_STREAM_STALL_TIMEOUT_S = 30.0  # a client that reads nothing this long is dropped
DEFAULT_MAX_QUEUED_SEQUENCES = 1024


@dataclass(frozen=True)
class ServerLimits:
    """The operator's bounds (``tokenmill serve`` flags); the defaults are the flags'."""

    max_request_body_bytes: int = DEFAULT_MAX_REQUEST_BODY_BYTES
    request_read_timeout: float = DEFAULT_REQUEST_READ_TIMEOUT_S
    # sequences (prompts x n) waiting for the engine beyond this get 429; None: no bound
    max_queued_sequences: int | None = DEFAULT_MAX_QUEUED_SEQUENCES
    allow_request_priority: bool = False
    # the old behaviour: special-token text in chat messages becomes control tokens
    allow_special_tokens_in_content: bool = False
