"""An async OpenAI-compatible client that times every streamed chunk.

One ``RequestRecord`` per request: when it was sent, the arrival time of every chunk
that carried text (relative to the send), and the token counts from the final usage
chunk (``stream_options.include_usage``). From those, TTFT is the first chunk's time,
ITL the gaps between chunks, E2E the time until the stream ended, and TPOT
``(E2E - TTFT) / (output tokens - 1)``. A server that streams several tokens in one
chunk shows one long gap in ITL, as in vLLM's benchmark; TPOT is unaffected.

Making every engine generate the same number of tokens: with ``ban_token_ids`` the
payload carries ``logit_bias`` of -100 for those ids (the model's EOS tokens), which any
OpenAI-compatible server understands; without it, the vLLM extras ``ignore_eos: true``
and ``min_tokens = max_tokens = output_len``, which tokenmill and vLLM honour.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import httpx

ENDPOINTS = {"completions": "/v1/completions", "chat": "/v1/chat/completions"}


def normalize_base_url(url: str) -> str:
    """The server root: accepts ``http://host:port``, with or without a trailing
    ``/`` or ``/v1``."""
    url = url.strip().rstrip("/")
    if not url.startswith(("http://", "https://")):
        raise ValueError(f"--base-url must start with http:// or https://, got {url!r}.")
    return url.removesuffix("/v1")


@dataclass(frozen=True)
class RequestTemplate:
    """Everything in a request's JSON body but its prompt."""

    endpoint: str
    model: str
    output_len: int
    temperature: float = 0.0
    ban_token_ids: tuple[int, ...] | None = None
    extra_body: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.endpoint not in ENDPOINTS:
            raise ValueError(f"--endpoint must be one of {', '.join(ENDPOINTS)}; "
                             f"got {self.endpoint!r}.")

    @property
    def path(self) -> str:
        return ENDPOINTS[self.endpoint]

    def payload(self, messages: list[dict[str, str]], prompt: str, stream: bool = True,
                max_tokens: int | None = None) -> dict[str, Any]:
        """The body for chat (``messages``) or completions (``prompt``)."""
        n = self.output_len if max_tokens is None else max_tokens
        body: dict[str, Any] = {"model": self.model, "max_tokens": n,
                                "temperature": self.temperature, "stream": stream}
        if self.endpoint == "chat":
            body["messages"] = messages
        else:
            body["prompt"] = prompt
        if stream:
            body["stream_options"] = {"include_usage": True}
        if self.ban_token_ids:
            body["logit_bias"] = {str(t): -100 for t in self.ban_token_ids}
        else:
            body["ignore_eos"] = True
            body["min_tokens"] = n
        body.update(self.extra_body)
        return body


@dataclass
class RequestRecord:
    """What one request did. Times are in seconds: ``start`` since the benchmark began,
    ``token_times`` since this request was sent."""

    session: int
    turn: int
    expected_prompt_tokens: int
    group: int | None = None
    start: float = 0.0
    success: bool = False
    error: str = ""
    token_times: list[float] = field(default_factory=list)
    latency: float = 0.0
    prompt_tokens: int | None = None
    completion_tokens: int = 0
    cached_tokens: int | None = None
    text: str = ""

    @property
    def ttft(self) -> float:
        return self.token_times[0] if self.token_times else 0.0

    @property
    def itl(self) -> list[float]:
        t = self.token_times
        return [b - a for a, b in zip(t, t[1:], strict=False)]

    @property
    def tpot(self) -> float:
        if self.completion_tokens < 2:
            return 0.0
        return (self.latency - self.ttft) / (self.completion_tokens - 1)

    @property
    def input_tokens(self) -> int:
        """Measured prompt tokens, or the calibrated estimate if the server sent none."""
        return self.prompt_tokens if self.prompt_tokens is not None else \
            self.expected_prompt_tokens

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(ttft=self.ttft, tpot=self.tpot, itl=self.itl)
        return d


def _chunk_text(chunk: dict[str, Any]) -> str:
    text = ""
    for choice in chunk.get("choices") or []:
        if "text" in choice:
            text += choice.get("text") or ""
        else:
            delta = choice.get("delta") or {}
            text += delta.get("content") or delta.get("reasoning_content") or ""
    return text


def _read_usage(record: RequestRecord, usage: dict[str, Any]) -> None:
    if usage.get("prompt_tokens") is not None:
        record.prompt_tokens = int(usage["prompt_tokens"])
    if usage.get("completion_tokens") is not None:
        record.completion_tokens = int(usage["completion_tokens"])
    details = usage.get("prompt_tokens_details") or {}
    if details.get("cached_tokens") is not None:
        record.cached_tokens = int(details["cached_tokens"])


class BenchClient:
    """An ``httpx.AsyncClient`` bound to one server; use as ``async with``."""

    def __init__(self, base_url: str, api_key: str | None = None,
                 timeout: float = 3600.0) -> None:
        self.base_url = normalize_base_url(base_url)
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.AsyncClient(
            headers=headers, timeout=httpx.Timeout(timeout, connect=10.0),
            limits=httpx.Limits(max_connections=None, max_keepalive_connections=None))

    async def __aenter__(self) -> BenchClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.http.aclose()

    def _unreachable(self, e: Exception) -> ValueError:
        return ValueError(
            f"cannot reach an OpenAI-compatible server at {self.base_url} "
            f"({type(e).__name__}: {e}). Start one (e.g. `tokenmill serve --port 8000`) "
            "or fix --base-url.")

    def _check_status(self, resp: httpx.Response, what: str) -> None:
        if resp.status_code == 401:
            raise ValueError(f"{what} at {self.base_url} was refused (HTTP 401); pass the "
                             "server's key with --api-key.")
        if resp.status_code != 200:
            raise ValueError(f"{what} at {self.base_url} failed with HTTP "
                             f"{resp.status_code}: {resp.text[:500]}")

    async def first_model(self) -> str:
        """The id of the first model in GET /v1/models."""
        try:
            resp = await self.http.get(self.base_url + "/v1/models")
        except httpx.HTTPError as e:
            raise self._unreachable(e) from e
        self._check_status(resp, "GET /v1/models")
        data = resp.json().get("data") or []
        if not data:
            raise ValueError(f"{self.base_url}/v1/models lists no model; pass --model.")
        return str(data[0]["id"])

    async def metrics_text(self) -> str:
        """GET /metrics (the Prometheus exposition), or "" where the server has none."""
        try:
            resp = await self.http.get(self.base_url + "/metrics")
        except httpx.HTTPError:
            return ""
        return resp.text if resp.status_code == 200 else ""

    async def post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        """A non-streaming POST; raises ValueError on any failure."""
        try:
            resp = await self.http.post(self.base_url + path, json=body)
        except httpx.HTTPError as e:
            raise self._unreachable(e) from e
        self._check_status(resp, f"POST {path}")
        return resp.json()

    async def stream(self, path: str, body: dict[str, Any], record: RequestRecord,
                     bench_start: float) -> RequestRecord:
        """Sends one streaming request and fills ``record``; never raises for a failed
        request (the failure goes into ``record.error``)."""
        sent = time.perf_counter()
        record.start = sent - bench_start
        pieces: list[str] = []
        try:
            async with self.http.stream("POST", self.base_url + path, json=body) as resp:
                if resp.status_code != 200:
                    text = (await resp.aread()).decode(errors="replace")
                    record.error = f"HTTP {resp.status_code}: {text[:500]}"
                    return record
                async for line in resp.aiter_lines():
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        break
                    chunk = json.loads(data)
                    if chunk.get("error"):
                        record.error = f"server error: {json.dumps(chunk['error'])[:500]}"
                        return record
                    text = _chunk_text(chunk)
                    if text:
                        record.token_times.append(time.perf_counter() - sent)
                        pieces.append(text)
                    if chunk.get("usage"):
                        _read_usage(record, chunk["usage"])
        except (httpx.HTTPError, json.JSONDecodeError) as e:
            record.error = f"{type(e).__name__}: {e}"
            return record
        record.latency = time.perf_counter() - sent
        record.text = "".join(pieces)
        if not record.completion_tokens:  # no usage chunk: one token per chunk
            record.completion_tokens = len(record.token_times)
        record.success = bool(record.token_times)
        if not record.success:
            record.error = "the stream ended without any generated text"
        return record
