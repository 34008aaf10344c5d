"""OpenAI-compatible chat, proxied to the worker of the tier that answers.

Before a worker sees a request, ``chat_checks`` normalizes it to what the worker takes
(422 naming the field otherwise) and ``max_tokens`` is clamped to what the context leaves
after the prompt, counted by the worker's own tokenizer when its length does not decide.
Streaming responses are passed through chunk by chunk as the worker sends them,
never buffered whole; closing the client's stream closes the upstream request.
A worker's error reaches the client and the log as one capped line: worker messages
can quote the whole request.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import anyio
import httpx

from services.errors import ContextLengthExceeded, UpstreamError, UpstreamRejected
from services.llm.chat_checks import Fit, fit, fit_from_length, prepare_request, prompt_text
from services.llm.images import ImageLimits, check_images, check_urls, image_parts
from services.llm.manager import ModelManager
from services.llm.records import Resolution
from services.llm.worker_command import token_count, tokenize_request

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
    # max_tokens as sent when Edison lowered the request's to what the context leaves
    # after the prompt (or set it, when the request gave none); None: sent as asked.
    max_tokens_clamped_to: int | None = None
    device: str | None = None  # where the answering worker is placed
    residency_wait_s: float | None = None  # waited for a heavy model's min residency


@dataclass(frozen=True)
class ChatCompletion:
    """A finished completion: the worker's OpenAI body (passed through as the worker
    wrote it, ``model`` set to the tier) and Edison's routing."""

    body: dict[str, Any]
    routing: ChatRouting


@dataclass(frozen=True)
class ChatStream:
    """An open streaming completion: the routing, known before the first byte, and the
    SSE bytes as the worker sends them.

    ``close`` ends it (the upstream request and the model's lease); the caller awaits it
    once the response is over however it ended, a client gone before the first chunk
    included (the chunks' own ``finally`` never runs for an iterator never started, and
    is cancelled again in a cancelled task). Idempotent."""

    routing: ChatRouting
    chunks: AsyncIterator[bytes] = field(repr=False)
    close: Callable[[], Awaitable[None]] = field(repr=False)


# Error text from a worker that reaches a client or a log: one line, this long at most
# (a worker's message can quote the whole request).
MAX_ERROR_CHARS = 240
_PYDANTIC_ERR = re.compile(r"'loc': \(([^)]*)\), 'msg': ('([^']*)'|\"([^\"]*)\")")


def one_line(text: str, limit: int = MAX_ERROR_CHARS) -> str:
    """The first non-empty line of ``text``, at most ``limit`` characters."""
    line = next((ln.strip() for ln in text.splitlines() if ln.strip()), "")
    return line if len(line) <= limit else line[: limit - 1] + "…"


def validation_summary(text: str, limit: int = MAX_ERROR_CHARS) -> str | None:
    """``field: message`` of a worker's request-validation error (its pydantic
    ``N validation errors:`` text), never the inputs it quotes; None for other text."""
    if not re.match(r"^\d+ validation errors?:", text.strip()):
        return None
    seen: list[str] = []
    for loc, _, single, double in _PYDANTIC_ERR.findall(text):
        parts = [p.strip().strip("'\"") for p in loc.split(",") if p.strip()]
        item = f"{'.'.join(p for p in parts if p != 'body')}: {single or double}"
        if item not in seen:
            seen.append(item)
    if not seen:
        return one_line(text, limit)
    more = f" (and {len(seen) - 3} more)" if len(seen) > 3 else ""
    return one_line("; ".join(seen[:3]) + more, limit)


def _detail_summary(detail: Any) -> str | None:
    """``field: message`` of FastAPI's 422 ``detail`` list, without the quoted inputs."""
    if not isinstance(detail, list) or not detail:
        return None
    items = []
    for d in detail[:3]:
        if isinstance(d, dict):
            loc = ".".join(str(p) for p in d.get("loc", ()) if p != "body")
            items.append(f"{loc}: {d.get('msg', 'invalid')}")
    return one_line("; ".join(items), MAX_ERROR_CHARS) or None


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
        self.vision = manager.settings.models.vision
        self.image_limits = ImageLimits.from_settings(self.vision)
        # Why no read timeout: a long generation streams for minutes; a dead worker is
        # noticed by its supervisor and the connection then breaks.
        self.client = httpx.AsyncClient(
            timeout=httpx.Timeout(connect=5.0, read=None, write=30.0, pool=30.0),
            limits=httpx.Limits(max_connections=256, max_keepalive_connections=64),
        )

    async def aclose(self) -> None:
        await self.client.aclose()

    async def _checked(self, body: dict[str, Any]) -> dict[str, Any]:
        """The request as the worker takes it (``chat_checks``), its images checked (and
        remote ones fetched, where allowed); InvalidRequest naming the field otherwise."""
        return (await check_images(prepare_request(body), self.image_limits, self.client)).body

    async def check_image_urls(self, urls: list[str], field: str) -> list[str]:
        """Image URLs given apart from messages (the swarm's ``images``), checked as a
        chat's are: the URLs to hand a worker."""
        return await check_urls(urls, field, self.image_limits, self.client)

    def _prepare(self, body: dict[str, Any], res: Resolution) -> dict[str, Any]:
        out = copy.copy(body)
        out["model"] = res.tier
        if res.tier != "vision" and has_images(body.get("messages", [])):
            out["messages"] = strip_images(body["messages"])
        return out

    async def _fit(self, body: dict[str, Any], res: Resolution) -> tuple[dict[str, Any], Fit]:
        """The body for the worker of ``res`` with ``max_tokens`` clamped to what its
        context leaves after the prompt; ContextLengthExceeded when nothing is left.
        The worker's tokenizer counts the prompt unless its length alone decides."""
        out = self._prepare(body, res)
        prompt = prompt_text(out)
        if res.tier == "vision" and self.vision is not None:
            n_images = len(image_parts(out["messages"]))
            prompt = dataclasses.replace(prompt, image_tokens=n_images * self.vision.image_tokens)
        requested = out.get("max_tokens")
        # A llama-server slot holds its share of the context, not all of it.
        n_ctx = res.model.slot_ctx or res.model.n_ctx
        done = fit_from_length(prompt, requested, n_ctx, tier=res.tier)
        if done is None:
            tokens = await self._count_tokens(prompt.text, res)
            done = fit(tokens, prompt.template_tokens, requested, n_ctx, tier=res.tier)
        out["max_tokens"] = done.max_tokens
        return out, done

    async def _count_tokens(self, text: str, res: Resolution) -> int:
        """Tokens of ``text`` by the worker's own tokenizer, BOS included (each backend's
        endpoint: ``worker_command.tokenize_request``)."""
        path, body = tokenize_request(text, res.model.backend)
        try:
            r = await self.client.post(f"{res.model.base_url}{path}", json=body)
        except httpx.HTTPError as exc:
            raise self._broke_off(res, exc) from exc
        await self._raise_for_upstream(r, res)
        return token_count(r.json(), res.model.backend)

    @staticmethod
    def _broke_off(res: Resolution, exc: Exception) -> UpstreamError:
        return UpstreamError(
            f"The {res.tier} worker broke off the request ({type(exc).__name__}); "
            "it will be loaded again on the next request",
            tier=res.tier,
        )

    @staticmethod
    def _routing(route: Route, res: Resolution, done: Fit) -> ChatRouting:
        return ChatRouting(
            res.tier,
            route.requested,
            route.reason,
            res.fallback_reason,
            done.clamped_to,
            "+".join(res.model.devices or (res.model.device,)),
            res.residency_wait_s,
        )

    async def _raise_for_upstream(self, r: httpx.Response, res: Resolution) -> None:
        """Turn a worker's error answer into a typed error whose message is one line
        of at most MAX_ERROR_CHARS: worker messages can quote the whole request."""
        if r.status_code < 400:
            return
        raw = (await r.aread()).decode(errors="replace")
        try:
            parsed = json.loads(raw)
        except ValueError:
            parsed = {}
        err = parsed.get("error", {}) if isinstance(parsed, dict) else {}
        if not isinstance(err, dict):
            err = {"message": str(err)}
        text = str(err.get("message") or "")
        # Prompt text stays below INFO; the full message is for debugging only.
        log.debug("the %s worker answered %d: %.4000s", res.tier, r.status_code, text or raw)
        # llama_cpp.server's code, llama-server's type for the same refusal.
        if (
            err.get("code") == "context_length_exceeded"
            or err.get("type") == "exceed_context_size_error"
        ):
            n_ctx = res.model.slot_ctx or res.model.n_ctx
            raise ContextLengthExceeded(
                one_line(text), tier=res.tier, n_ctx=n_ctx, param=err.get("param")
            )
        detail = parsed.get("detail") if isinstance(parsed, dict) else None
        # The worker's own request validation: FastAPI's 422 detail, or a pydantic
        # ValidationError its route handler answers as a 500. Both are a refusal.
        refused = validation_summary(text) or _detail_summary(detail)
        if refused is not None or 400 <= r.status_code < 500:
            cause = refused or one_line(text) or f"HTTP {r.status_code}"
            log.info("the %s worker refused a request (%d): %s", res.tier, r.status_code, cause)
            raise UpstreamRejected(
                f"The {res.tier} worker refused the request: {cause}",
                tier=res.tier,
                upstream_status=r.status_code,
            )
        cause = one_line(text) or f"HTTP {r.status_code}"
        raise UpstreamError(
            f"The {res.tier} worker failed: {cause}", tier=res.tier, upstream_status=r.status_code
        )

    async def complete(self, body: dict[str, Any]) -> ChatCompletion:
        """A non-streaming chat completion on the tier the request routes to."""
        body = await self._checked(body)
        route = choose_tier(body.get("model"), has_images(body["messages"]))
        async with self.manager.use(route.tier) as res:
            data, done = await self._post(body, res)
        self._after_images(body, res)
        return ChatCompletion(data, self._routing(route, res, done))

    def _after_images(self, body: dict[str, Any], res: Resolution) -> None:
        """A worker's first image loaded its projector (llama-cpp-python does it then):
        measure the worker again in the background (``ModelManager.settle_projector``)."""
        if res.model.projector_pending_mb and has_images(body.get("messages", [])):
            self.manager.spawn(
                self.manager.settle_projector(res.model), f"edison-settle-{res.tier}"
            )

    async def complete_on(self, res: Resolution, body: dict[str, Any]) -> ChatCompletion:
        """A non-streaming completion on a tier the caller already holds in use (the
        swarm holds one per group): no second resolution, no second load."""
        body = await self._checked(body)
        route = Route(body.get("model") or res.requested, res.tier, "held by the caller")
        data, done = await self._post(body, res)
        return ChatCompletion(data, self._routing(route, res, done))

    async def _post(self, body: dict[str, Any], res: Resolution) -> tuple[dict[str, Any], Fit]:
        sent, done = await self._fit(body, res)
        try:
            r = await self.client.post(f"{res.model.base_url}/v1/chat/completions", json=sent)
        except httpx.HTTPError as exc:
            raise self._broke_off(res, exc) from exc
        await self._raise_for_upstream(r, res)
        data = r.json()
        data["model"] = res.tier
        return data, done

    async def stream(self, body: dict[str, Any]) -> ChatStream:
        """Open a streaming completion.

        Errors before the first byte raise here (so the caller can answer with a status);
        errors after it end the stream with an SSE error event.
        """
        body = await self._checked(body)
        route = choose_tier(body.get("model"), has_images(body["messages"]))
        lease = await self.manager.acquire(route.tier)
        res = lease.resolution
        try:
            sent, done = await self._fit(body, res)
            req = self.client.build_request(
                "POST", f"{res.model.base_url}/v1/chat/completions", json=sent
            )
            try:
                upstream = await self.client.send(req, stream=True)
            except httpx.HTTPError as exc:
                raise self._broke_off(res, exc) from exc
            try:
                await self._raise_for_upstream(upstream, res)
            except BaseException:
                await upstream.aclose()
                raise
        except BaseException:
            lease.release()
            raise

        async def close() -> None:
            if lease.released:
                return
            # Why first and synchronous: the lease must end even if this task is being
            # cancelled (a client that went away), where any await below raises again.
            lease.release()
            self._after_images(body, res)
            # Why shielded: closing the upstream response stops the worker generating for
            # nobody; in a cancelled scope the close itself would be cancelled.
            with anyio.CancelScope(shield=True):
                await upstream.aclose()

        async def chunks() -> AsyncIterator[bytes]:
            try:
                async for chunk in upstream.aiter_raw():
                    yield chunk
            except httpx.HTTPError as exc:
                log.warning("the %s worker broke off a stream (%s)", res.tier, type(exc).__name__)
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
                await close()

        return ChatStream(self._routing(route, res, done), chunks(), close)
