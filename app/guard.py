"""What every request passes before any route reads it: the API key, the body's size, and
OPTIONS. A pure ASGI middleware, so a refusal never waits for (or parses) a body.

- **API key** (`server.api_key`): checked from the headers before the body is read, so an
  unauthenticated request with a broken body is a 401, not a 422. Public: `/health`,
  `/ready`, the docs, and the operator page's files (every call the page makes carries
  the key).
- **Body size** (`server.max_body_mb`): a declared `Content-Length` above it is a 413 at
  once; a chunked body is counted as it arrives and cut off at the limit.
- **OPTIONS** on a path answers which methods it has (`Allow`), unless it is a CORS
  preflight, which the CORS middleware (outside this one) answers.
"""

from __future__ import annotations

import hmac
import json
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from starlette.exceptions import HTTPException
from starlette.routing import Match

from app.errors import error_body, with_openai_fields

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE")
PUBLIC = ("/health", "/ready", "/docs", "/redoc", "/openapi.json", "/ui")


def is_public(path: str) -> bool:
    return any(path == p or path.startswith(p + "/") for p in PUBLIC)


async def _answer(
    send: Send,
    status: int,
    code: str,
    message: str,
    headers: dict[str, str] | None = None,
    path: str = "",
) -> None:
    body = json.dumps(with_openai_fields(path, status, error_body(code, message))).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


class RequestGuard:
    def __init__(self, app: ASGIApp, *, api_key: str | None, max_body_mb: float) -> None:
        self.app = app
        self.api_key = api_key.encode() if api_key else None
        self.max_bytes = int(max_body_mb * 1024 * 1024)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v for k, v in scope.get("headers", [])}
        path = scope.get("path", "")
        if scope["method"] == "OPTIONS" and b"access-control-request-method" not in headers:
            await self._options(scope, send)
            return
        if self.api_key is not None and not is_public(path) and not self._key_ok(headers):
            await _answer(
                send,
                401,
                "unauthorized",
                "Missing or wrong API key: send Authorization: Bearer <server.api_key>",
                {"WWW-Authenticate": "Bearer"},
                path,
            )
            return
        declared = headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await _answer(send, 413, "payload_too_large", self._too_large(int(declared)), path=path)
            return
        await self.app(scope, self._counting(receive), send)

    def _key_ok(self, headers: dict[str, bytes]) -> bool:
        given = headers.get("authorization", b"")
        scheme, _, token = given.partition(b" ")
        # Why compare_digest: a plain == leaks how many leading characters matched.
        return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self.api_key)

    def _too_large(self, size: int) -> str:
        limit = self.max_bytes / 1024 / 1024
        return f"The request body ({size:,} bytes) is larger than server.max_body_mb ({limit:g} MB)"

    def _counting(self, receive: Receive) -> Receive:
        seen = 0

        async def counted() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    # Raised inside the route's body read: FastAPI passes HTTPExceptions on,
                    # and the error handlers give it the common body.
                    raise HTTPException(413, self._too_large(seen))
            return message

        return counted

    async def _options(self, scope: Scope, send: Send) -> None:
        app = scope.get("app")
        routes = getattr(getattr(app, "router", None), "routes", [])
        methods = {
            m
            for m in METHODS
            if any(route.matches({**scope, "method": m})[0] == Match.FULL for route in routes)
        }
        if not methods:
            await _answer(send, 404, "not_found", "Not Found")
            return
        allow = ", ".join(sorted(methods | {"OPTIONS"}))
        await send(
            {
                "type": "http.response.start",
                "status": 204,
                "headers": [(b"allow", allow.encode())],
            }
        )
        await send({"type": "http.response.body", "body": b""})
