"""The chat page at ``/``: a few static files shipped in ``tokenmill/server/static/``.

``add_web_ui(app)`` serves them on fixed paths (``PUBLIC_PATHS``), kept out of the
OpenAPI document. They hold no data, so ``--api-key`` does not guard them (the page asks
for the key and sends it on every API call it makes). The page is plain HTML, CSS and
JavaScript, loads nothing from elsewhere (the Content-Security-Policy below forbids it),
and talks only to this server's OpenAI API: ``/v1/models`` and streamed
``/v1/chat/completions``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from importlib.resources import files

from fastapi import FastAPI
from fastapi.responses import Response

# path -> (file in static/, media type)
_ASSETS = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/static/app.js": ("app.js", "text/javascript; charset=utf-8"),
    "/static/markdown.js": ("markdown.js", "text/javascript; charset=utf-8"),
    "/static/style.css": ("style.css", "text/css; charset=utf-8"),
}
PUBLIC_PATHS = frozenset(_ASSETS)

_HEADERS = {
    # same origin only: no CDN, no inline script, nothing framed or posted elsewhere
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
        "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


def add_web_ui(app: FastAPI) -> None:
    """Adds a GET route per page asset (read once, here)."""
    static = files("tokenmill.server") / "static"
    for path, (name, media_type) in _ASSETS.items():
        app.add_api_route(path, _serve((static / name).read_bytes(), media_type),
                          methods=["GET"], include_in_schema=False)


def _serve(body: bytes, media_type: str) -> Callable[[], Awaitable[Response]]:
    async def asset() -> Response:  # no parameters: FastAPI would read them from the query
        return Response(body, media_type=media_type, headers=_HEADERS)

    return asset
