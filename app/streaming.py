"""A streaming response that runs its close callback however the response ends."""

from __future__ import annotations

from collections.abc import AsyncIterable, Awaitable, Callable, Mapping

import anyio
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send


class ClosingStreamingResponse(StreamingResponse):
    """StreamingResponse + ``on_close``, awaited (shielded) once the response is over:
    sent, failed, or abandoned by a client that disconnected, before the first chunk too.

    Why not the body iterator's ``finally``: an async generator never started has no
    frame to finalize, and in the task Starlette cancels on a disconnect every await in
    that ``finally`` is cancelled again. A chat stream's model lease must end anyway, and
    so must a proxied stream's upstream connection (a BackgroundTask does not run when the
    client leaves).
    """

    def __init__(
        self,
        content: AsyncIterable[bytes],
        *,
        on_close: Callable[[], Awaitable[None]],
        status_code: int = 200,
        media_type: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(content, status_code, media_type=media_type, headers=headers)
        self.on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            with anyio.CancelScope(shield=True):
                await self.on_close()
