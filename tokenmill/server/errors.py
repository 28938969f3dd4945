"""Errors in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}``.

Every failure a client can cause becomes a 4xx with that body, so the official client
raises the matching exception (BadRequestError, AuthenticationError, NotFoundError,
RateLimitError). The mapping:

========================================  ======  =====================  =======================
cause                                     status  type                   code
========================================  ======  =====================  =======================
malformed, out-of-range or unknown field   400    invalid_request_error  None (param names it)
prompt (+ max_tokens) over the context     400    invalid_request_error  context_length_exceeded
unknown model name                         404    invalid_request_error  model_not_found
missing or wrong API key                   401    authentication_error   invalid_api_key
body not sent within the read time-out     408    invalid_request_error  request_timeout
body larger than --max-request-body-bytes  413    invalid_request_error  request_too_large
Content-Type other than application/json   415    invalid_request_error  unsupported_media_type
request queue full, or shutting down       429    rate_limit_exceeded    rate_limit_exceeded
its constraint cost too much at run time   400    invalid_request_error  constraint_too_expensive
more than --max-connections open           503    server_error           too_many_connections
the engine failed on this request alone    500    server_error           None
engine loop crashed, unexpected bug        500    server_error           None
========================================  ======  =====================  =======================

Pydantic's 422 validation errors are rewritten as 400s whose ``param`` is the dotted
path of the offending field (``messages[0].content``), like OpenAI's. A 500 says only that
something failed (the exception goes to the log, not to the client).
"""

from __future__ import annotations

import dataclasses
import logging
import re
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from tokenmill.engine.async_engine import EngineDeadError, QueueFullError, RequestFailedError
from tokenmill.sampling_params import SamplingParams

logger = logging.getLogger("tokenmill.server")


class APIError(Exception):
    """An error to send to the client as is."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type = status, message, type
        self.param, self.code = param, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}

    def response(self) -> JSONResponse:
        headers = {"Retry-After": "1"} if self.status == 429 else None
        return JSONResponse(self.body(), status_code=self.status, headers=headers)


class ClientDisconnected(Exception):
    """The client went away before its response was ready; its request was aborted."""


def invalid_request(message: str, param: str | None = None) -> APIError:
    return APIError(400, message, param=param)


def context_length_exceeded(max_model_len: int, prompt_len: int, max_tokens: int | None,
                            param: str) -> APIError:
    if max_tokens is None:
        msg = (f"This model's maximum context length is {max_model_len} tokens, but the "
               f"prompt is {prompt_len} tokens long, which leaves no room to generate. "
               f"Please reduce the length of the {param}.")
    else:
        msg = (f"This model's maximum context length is {max_model_len} tokens. However, you "
               f"requested {prompt_len + max_tokens} tokens ({prompt_len} in the {param}, "
               f"{max_tokens} in the completion). Please reduce the length of the {param} "
               "or completion.")
    return APIError(400, msg, param=param, code="context_length_exceeded")


def model_not_found(name: str) -> APIError:
    shown = name if len(name) <= 200 else name[:200] + "..."
    return APIError(404, f"The model `{shown}` does not exist.", param="model",
                    code="model_not_found")


def request_too_large(limit: int) -> APIError:
    return APIError(413, f"The request body is larger than this server accepts ({limit} "
                         "bytes; see --max-request-body-bytes).", code="request_too_large")


def request_timeout(seconds: float) -> APIError:
    return APIError(408, f"The request body was not received within {seconds:g} seconds.",
                    code="request_timeout")


def unsupported_media_type(content_type: str | None) -> APIError:
    got = f"got {content_type[:100]!r}" if content_type else "none was given"
    return APIError(415, f"Content-Type must be application/json ({got}); the request body "
                         "must be a JSON object.", code="unsupported_media_type")


def authentication_failed(header_present: bool) -> APIError:
    msg = ("Incorrect API key provided." if header_present
           else "You didn't provide an API key.")
    return APIError(401, msg + " Send it in the header 'Authorization: Bearer YOUR_KEY'.",
                    type="authentication_error", code="invalid_api_key")


# ---- pydantic errors -> param + message ---------------------------------------------

_TYPE_TAGS = {"str", "int", "float", "bool", "none", "dict", "list", "[key]"}


def _param_path(loc: tuple[Any, ...]) -> str | None:
    """``("body", "messages", 0, "content", "list[dict[str,any]]")`` ->
    ``"messages[0].content"``: drops the "body" prefix and pydantic's union tags."""
    path = ""
    for i, part in enumerate(loc):
        if i == 0 and part == "body":
            continue
        if isinstance(part, int):
            path += f"[{part}]"
        elif part in _TYPE_TAGS or "[" in part or "-" in part:
            continue
        else:
            path += f".{part}" if path else part
    return path or None


def validation_error(errors: list[dict[str, Any]]) -> APIError:
    """One 400 for a list of pydantic errors: the first field's errors, merged (a union
    such as ``stop: str | list[str]`` reports one error per member)."""
    first = errors[0]
    if first["type"] == "json_invalid":
        detail = first.get("ctx", {}).get("error", "")
        return invalid_request(f"We could not parse the JSON body of your request: {detail}")
    param = _param_path(tuple(first["loc"]))
    if param is None and first["type"] in ("missing", "dict_type", "model_type"):
        return invalid_request("The request body must be a JSON object ({...}).")
    if first["type"] == "extra_forbidden":
        return invalid_request(f"Unrecognized request argument supplied: {param}", param)
    if first["type"] == "missing":
        return invalid_request(f"Missing required parameter: '{param}'.", param)
    msgs = []
    for e in errors:
        if _param_path(tuple(e["loc"])) == param:
            msg = e["msg"].removeprefix("Value error, ")
            if msg not in msgs:
                msgs.append(msg)
    if param is None:
        return invalid_request("Invalid request body: " + "; or ".join(msgs))
    return invalid_request(f"Invalid value for '{param}': " + "; or ".join(msgs), param)


# ---- ValueError from the engine / SamplingParams -> 400 ------------------------------

_SAMPLING_FIELDS = {f.name for f in dataclasses.fields(SamplingParams)}
_LEADING_FIELD = re.compile(r"^\s*(\w+)\b")


def from_value_error(e: ValueError) -> APIError:
    """SamplingParams and the engine start their messages with the field at fault
    ("top_p must be in (0, 1], got 2"); that field becomes ``param``."""
    msg = str(e)
    m = _LEADING_FIELD.match(msg)
    param = m.group(1) if m and m.group(1) in _SAMPLING_FIELDS else None
    if "context" in msg and "max_model_len" in msg:
        return APIError(400, msg, param="prompt", code="context_length_exceeded")
    return invalid_request(msg, param)


# ---- handlers ------------------------------------------------------------------------


def to_api_error(exc: BaseException) -> APIError:
    """The OpenAI error for any exception (also used for errors in the middle of a
    stream, sent as a ``data: {"error": ...}`` frame)."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, RequestValidationError | ValidationError):
        return validation_error(list(exc.errors()))
    if isinstance(exc, QueueFullError):
        return APIError(429, f"The server is busy: {exc}.", type="rate_limit_exceeded",
                        code="rate_limit_exceeded")
    if isinstance(exc, RequestFailedError) and (why := _too_expensive(exc)):
        return APIError(400, f"The request's constraint (structured output or tools) was "
                             f"too expensive to follow and the request was ended: {why}. "
                             "Simplify the schema, regex or grammar.",
                        code="constraint_too_expensive")
    if isinstance(exc, RequestFailedError):  # the engine logged why, with the request id
        return APIError(500, "The engine failed on this request and ended it (other "
                             "requests are not affected); it has been logged.",
                        type="server_error")
    if isinstance(exc, EngineDeadError):  # what killed it is in the log
        return APIError(500, "The inference engine has stopped; this server cannot serve "
                             "requests until it is restarted.", type="server_error")
    if isinstance(exc, RecursionError):
        return invalid_request("The request is nested too deeply to process.")
    if isinstance(exc, UnicodeError):
        return invalid_request("The request contains invalid Unicode text (a lone "
                               "surrogate such as \\ud800).")
    if isinstance(exc, ValueError):
        return from_value_error(exc)
    # the exception itself is logged by whoever catches it (uvicorn, or the stream)
    return APIError(500, "The server had an error while processing your request; it has "
                         "been logged.", type="server_error")


# How the engine words a failure that the request's own constraint caused by its cost
# (``structured.manager``: the per-step and per-life mask budgets, the compile time-outs).
_TOO_EXPENSIVE = ("the grammar is too expensive", "grammar compilation failed: compiling took",
                  "grammar compilation failed: no compiled grammar after")


def _too_expensive(exc: RequestFailedError) -> str | None:
    """The engine's reason if the request failed because its constraint cost too much."""
    out = exc.output
    for o in out.outputs if out is not None else ():
        if o.finish_reason == "error" and isinstance(o.stop_reason, str) and (
                o.stop_reason.startswith(_TOO_EXPENSIVE)):
            return o.stop_reason
    return None


def install_exception_handlers(app: FastAPI) -> None:
    async def handle(request: Request, exc: Exception) -> Response:
        if isinstance(exc, ClientDisconnected):
            return Response(status_code=499)  # nobody is listening any more
        return to_api_error(exc).response()

    async def handle_http(request: Request, exc: StarletteHTTPException) -> Response:
        type_ = "invalid_request_error" if exc.status_code < 500 else "server_error"
        return APIError(exc.status_code, f"{exc.detail}: {request.method} {request.url.path}",
                        type=type_).response()

    for cls in (APIError, ClientDisconnected, RequestValidationError, ValidationError,
                QueueFullError, EngineDeadError, RequestFailedError, ValueError, Exception):
        app.add_exception_handler(cls, handle)
    app.add_exception_handler(StarletteHTTPException, handle_http)
