"""OpenAI-compatible chat, proxied to the worker of the tier that answers.

Streaming responses are passed through chunk by chunk as the worker sends them,
never buffered whole; closing the client's stream closes the upstream request.
"""

from __future__ import annotations

import copy
import json
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import httpx

from services.errors import ContextLengthExceeded, UpstreamError, UpstreamRejected
from services.llm.manager import ModelManager
from services.llm.records import Resolution

log = logging.getLogger("edison.chat")


def has_images(messages: list[dict[str, Any]]) -> bool:
    """True when any message carries an image part (OpenAI `image_url` content)."""
    for m in messages:
        content = m.get("content")
        if isinstance(content, list) and any(
            isinstance(p, dict) and p.get("type") in ("image_url", "input_image") for p in content
        ):
            return True
    return False


def strip_images(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The messages with image parts removed and text parts joined (for text-only tiers)."""
    out = []
    for m in messages:
        content = m.get("content")
        if isinstance(content, list):
            text = "\n".join(
                p.get("text", "")
                for p in content
                if isinstance(p, dict) and p.get("type") == "text"
            )
            m = {**m, "content": text}
        out.append(m)
    return out


@dataclass(frozen=True)
class Route:
    """Which tier a chat request asks for, before fallbacks."""

    requested: str
    tier: str
    reason: str


@dataclass(frozen=True)
class ChatRouting:
    """Which tier answered a chat request and why: the answer's ``edison`` field."""

    tier: str
    requested: str
    route: str
    fallback_reason: str | None = None


@dataclass(frozen=True)
class ChatCompletion:
    """A finished completion: the worker's OpenAI body (passed through as the worker
    wrote it, ``model`` set to the tier) and Edison's routing."""

    body: dict[str, Any]
    routing: ChatRouting


@dataclass(frozen=True)
class ChatStream:
    """An open streaming completion: the routing, known before the first byte, and the
    SSE bytes as the worker sends them."""

    routing: ChatRouting
    chunks: AsyncIterator[bytes] = field(repr=False)


def choose_tier(model: str | None, images: bool) -> Route:
    """`auto` (or nothing) picks vision when images are present, else fast; images
    always go to vision (vision on demand)."""
    requested = model or "auto"
    if images:
        why = (
            "images present"
            if requested in ("auto", "vision")
            else f"images present, not {requested}"
        )
        return Route(requested, "vision", why)
    if requested == "auto":
        return Route(requested, "fast", "auto: no images, the resident fast tier")
    return Route(requested, requested, "asked")


class ChatProxy:
    """Sends chat requests to workers through one shared HTTP client."""

    def __init__(self, manager: ModelManager) -> None:
        self.manager = manager
        # Why no read timeout: a long generation streams for minutes; a dead worker is
        # noticed by its supervisor and the connection then breaks.
        self.client = httpx.AsyncClient(
            timeout=httpx.Timeout(connect=5.0, read=None, write=30.0, pool=30.0),
            limits=httpx.Limits(max_connections=256, max_keepalive_connections=64),
        )

    async def aclose(self) -> None:
        await self.client.aclose()

    def _prepare(self, body: dict[str, Any], res: Resolution) -> dict[str, Any]:
        out = copy.copy(body)
        out["model"] = res.tier
        if res.tier != "vision" and has_images(body.get("messages", [])):
            out["messages"] = strip_images(body["messages"])
        return out

    @staticmethod
    def _routing(route: Route, res: Resolution) -> ChatRouting:
        return ChatRouting(res.tier, route.requested, route.reason, res.fallback_reason)

    async def _raise_for_upstream(self, r: httpx.Response, res: Resolution) -> None:
        if r.status_code < 400:
            return
        raw = await r.aread()
        try:
            err = json.loads(raw).get("error", {})
        except (ValueError, AttributeError):
            err = {}
        if not isinstance(err, dict):
            err = {"message": str(err)}
        message = err.get("message") or raw.decode(errors="replace")[:500]
        if err.get("code") == "context_length_exceeded":
            raise ContextLengthExceeded(
                message, tier=res.tier, n_ctx=res.model.n_ctx, param=err.get("param")
            )
        if 400 <= r.status_code < 500:
            raise UpstreamRejected(message, tier=res.tier, upstream_status=r.status_code)
        raise UpstreamError(
            f"The {res.tier} worker failed: {message}", tier=res.tier, upstream_status=r.status_code
        )

    async def complete(self, body: dict[str, Any]) -> ChatCompletion:
        """A non-streaming chat completion on the tier the request routes to."""
        route = choose_tier(body.get("model"), has_images(body.get("messages", [])))
        async with self.manager.use(route.tier) as res:
            data = await self._post(body, res)
        return ChatCompletion(data, self._routing(route, res))

    async def complete_on(self, res: Resolution, body: dict[str, Any]) -> ChatCompletion:
        """A non-streaming completion on a tier the caller already holds in use (the
        swarm holds one per group): no second resolution, no second load."""
        route = Route(body.get("model") or res.requested, res.tier, "held by the caller")
        return ChatCompletion(await self._post(body, res), self._routing(route, res))

    async def _post(self, body: dict[str, Any], res: Resolution) -> dict[str, Any]:
        try:
            r = await self.client.post(
                f"{res.model.base_url}/v1/chat/completions", json=self._prepare(body, res)
            )
        except httpx.HTTPError as exc:
            raise UpstreamError(
                f"The {res.tier} worker broke off the request ({type(exc).__name__}); "
                "it will be loaded again on the next request",
                tier=res.tier,
            ) from exc
        await self._raise_for_upstream(r, res)
        data = r.json()
        data["model"] = res.tier
        return data

    async def stream(self, body: dict[str, Any]) -> ChatStream:
        """Open a streaming completion.

        Errors before the first byte raise here (so the caller can answer with a status);
        errors after it end the stream with an SSE error event.
        """
        route = choose_tier(body.get("model"), has_images(body.get("messages", [])))
        use = self.manager.use(route.tier)
        res = await use.__aenter__()
        try:
            req = self.client.build_request(
                "POST", f"{res.model.base_url}/v1/chat/completions", json=self._prepare(body, res)
            )
            try:
                upstream = await self.client.send(req, stream=True)
            except httpx.HTTPError as exc:
                raise UpstreamError(
                    f"The {res.tier} worker broke off the request ({type(exc).__name__})",
                    tier=res.tier,
                ) from exc
            try:
                await self._raise_for_upstream(upstream, res)
            except BaseException:
                await upstream.aclose()
                raise
        except BaseException as exc:
            await use.__aexit__(type(exc), exc, exc.__traceback__)
            raise

        async def chunks() -> AsyncIterator[bytes]:
            try:
                async for chunk in upstream.aiter_raw():
                    yield chunk
            except httpx.HTTPError as exc:
                err = {
                    "error": {
                        "code": "upstream_error",
                        "message": f"The {res.tier} worker "
                        f"broke off the stream ({type(exc).__name__})",
                        "tier": res.tier,
                    }
                }
                yield f"data: {json.dumps(err)}\n\n".encode()
            finally:
                # Why: a client that disconnects cancels this generator; closing the
                # upstream response stops the worker generating for nobody.
                await upstream.aclose()
                await use.__aexit__(None, None, None)

        return ChatStream(self._routing(route, res), chunks())
