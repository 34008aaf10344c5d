"""The images of a chat request, checked before any worker sees them.

A llama_cpp.server vision worker takes an ``image_url`` part as it comes: it
base64-decodes a data URL without a check and fetches anything else with
``urllib.request.urlopen`` (``file://`` included), unbounded. So Edison takes only data
URLs of PNG or JPEG images up to ``models.vision.max_image_mb`` and
``max_image_pixels``; an http(s) URL only with ``allow_remote_images``, fetched here
(bounded) and handed on as a data URL; anything else is refused, 422 naming the part.

The checks decode base64 and read the image header with Pillow, never the pixels;
they run in a worker thread, since a request may carry megabytes.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import io
import re
from dataclasses import dataclass
from typing import Any

import anyio
import httpx

from services.errors import InvalidRequest
from services.settings import VisionTierSettings

FORMATS = ("PNG", "JPEG")
MIME = {"PNG": "image/png", "JPEG": "image/jpeg"}
REMOTE_TIMEOUT_S = 10.0
_DATA_URL = re.compile(r"^data:([\w.+-]+/[\w.+-]+)?((?:;[\w.+-]+=[\w.+-]+)*)(;base64)?,", re.ASCII)


@dataclass(frozen=True)
class ImageLimits:
    """What an image may be, from ``models.vision`` (its defaults when vision is unset)."""

    max_bytes: int
    max_pixels: int
    allow_remote: bool
    formats: tuple[str, ...] = FORMATS
    settings: str = "models.vision"  # where the limits are configured, named in refusals

    @classmethod
    def from_settings(cls, vision: VisionTierSettings | None) -> ImageLimits:
        v = vision or VisionTierSettings.model_construct()
        return cls(int(v.max_image_mb * 1024 * 1024), v.max_image_pixels, v.allow_remote_images)


@dataclass(frozen=True)
class CheckedImage:
    """One image part that passed: where it is in the request and what it is."""

    field: str
    format: str
    width: int
    height: int
    n_bytes: int
    remote: bool = False


@dataclass(frozen=True)
class CheckedImages:
    """A request's images, checked; ``body`` is the request with every remote image
    replaced by a data URL of the fetched bytes (the same object when there was none)."""

    body: dict[str, Any]
    images: tuple[CheckedImage, ...] = ()


def image_parts(messages: list[Any]) -> list[tuple[str, str]]:
    """(field, url) of every image part of prepared messages, in order."""
    out = []
    for i, m in enumerate(messages):
        content = m.get("content") if isinstance(m, dict) else None
        if not isinstance(content, list):
            continue
        for k, part in enumerate(content):
            if isinstance(part, dict) and part.get("type") == "image_url":
                url = part.get("image_url")
                url = url.get("url") if isinstance(url, dict) else url
                out.append((f"messages.{i}.content.{k}.image_url", url))
    return out


def _mb(n: int) -> str:
    return f"{n / (1024 * 1024):g} MB"


def decode_data_url(url: str, field: str, limits: ImageLimits) -> bytes:
    """The bytes of a base64 data URL; InvalidRequest naming ``field`` otherwise. The
    size is checked from the text's length before anything is decoded."""
    m = _DATA_URL.match(url)
    if m is None or not m.group(3):
        raise InvalidRequest(field, "must be a base64 data URL (data:image/png;base64,...)")
    payload = url[m.end() :].strip()
    if len(payload) * 3 // 4 > limits.max_bytes + 2:
        raise InvalidRequest(
            field,
            f"the image is about {_mb(len(payload) * 3 // 4)}; "
            f"at most {_mb(limits.max_bytes)} ({limits.settings}.max_image_mb)",
        )
    try:
        data = base64.b64decode(payload.encode("ascii"), validate=True)
    except (binascii.Error, ValueError) as exc:  # UnicodeEncodeError is a ValueError
        raise InvalidRequest(field, "the data URL's base64 is corrupt") from exc
    if len(data) > limits.max_bytes:
        raise InvalidRequest(
            field,
            f"the image is {_mb(len(data))}; at most {_mb(limits.max_bytes)} "
            f"({limits.settings}.max_image_mb)",
        )
    return data


def inspect_image(data: bytes, field: str, limits: ImageLimits) -> tuple[str, int, int]:
    """(format, width, height) of an image in one of ``limits.formats`` from its header;
    InvalidRequest for anything else, a damaged header, or more than ``max_pixels``."""
    from PIL import Image, UnidentifiedImageError

    if not data:
        raise InvalidRequest(field, "the image is empty")
    try:
        with Image.open(io.BytesIO(data), formats=limits.formats) as img:
            fmt, (w, h) = img.format, img.size
            img.verify()
    except UnidentifiedImageError as exc:
        raise InvalidRequest(field, f"is not a {' or '.join(limits.formats)} image") from exc
    except Exception as exc:  # Pillow raises many kinds for a damaged file
        raise InvalidRequest(field, f"the image is damaged ({type(exc).__name__})") from exc
    if w * h > limits.max_pixels:
        raise InvalidRequest(
            field,
            f"the image is {w}x{h} pixels; at most {limits.max_pixels} "
            f"({limits.settings}.max_image_pixels)",
        )
    return str(fmt), w, h


def check_data_url(url: str, field: str, limits: ImageLimits) -> CheckedImage:
    """Decode and inspect one data URL (blocking: call it in a thread)."""
    data = decode_data_url(url, field, limits)
    fmt, w, h = inspect_image(data, field, limits)
    return CheckedImage(field, fmt, w, h, len(data))


def _scheme(url: str) -> str:
    head, sep, _ = url.partition(":")
    return head.lower() if sep else ""


async def _fetch(
    url: str, field: str, limits: ImageLimits, client: httpx.AsyncClient
) -> tuple[CheckedImage, str]:
    """Fetch a remote image, bounded in time and size; (image, its data URL)."""
    chunks: list[bytes] = []
    n = 0
    try:
        async with client.stream("GET", url, timeout=REMOTE_TIMEOUT_S, follow_redirects=True) as r:
            if r.status_code != 200:
                raise InvalidRequest(field, f"fetching the image answered HTTP {r.status_code}")
            async for chunk in r.aiter_bytes():
                n += len(chunk)
                if n > limits.max_bytes:
                    raise InvalidRequest(
                        field,
                        f"the image is over {_mb(limits.max_bytes)} (models.vision.max_image_mb)",
                    )
                chunks.append(chunk)
    except httpx.HTTPError as exc:
        why = f"the image could not be fetched ({type(exc).__name__})"
        raise InvalidRequest(field, why) from exc
    data = b"".join(chunks)
    fmt, w, h = await anyio.to_thread.run_sync(inspect_image, data, field, limits)
    data_url = f"data:{MIME[fmt]};base64,{base64.b64encode(data).decode('ascii')}"
    return CheckedImage(field, fmt, w, h, len(data), remote=True), data_url


def _replace_url(body: dict[str, Any], field: str, url: str) -> dict[str, Any]:
    """A copy of ``body`` whose image part at ``field`` (messages.i.content.k.image_url)
    points at ``url``; the messages and parts on the way are copied, nothing else."""
    _, i, _, k, _ = field.split(".")
    messages = list(body["messages"])
    content = list(messages[int(i)]["content"])
    content[int(k)] = {"type": "image_url", "image_url": {"url": url}}
    messages[int(i)] = {**messages[int(i)], "content": content}
    return {**body, "messages": messages}


async def check_parts(
    parts: list[tuple[str, str]], limits: ImageLimits, client: httpx.AsyncClient | None = None
) -> list[tuple[CheckedImage, str]]:
    """Check (field, url) pairs: each image with the URL a worker gets (a data URL)."""
    local: list[tuple[str, str]] = []
    remote: list[tuple[str, str]] = []
    for field, url in parts:
        scheme = _scheme(url)
        if scheme == "data":
            local.append((field, url))
        elif scheme in ("http", "https"):
            if not limits.allow_remote:
                raise InvalidRequest(
                    field,
                    "remote image URLs are refused (models.vision.allow_remote_images is off); "
                    "send the image as a data URL",
                )
            remote.append((field, url))
        else:
            raise InvalidRequest(field, "must be a data URL (or http(s) where allowed)")

    def check_local() -> dict[str, tuple[CheckedImage, str]]:
        return {field: (check_data_url(url, field, limits), url) for field, url in local}

    done = await anyio.to_thread.run_sync(check_local)
    if remote:
        async with contextlib.AsyncExitStack() as stack:
            if client is None:
                client = await stack.enter_async_context(httpx.AsyncClient())
            for field, url in remote:
                done[field] = await _fetch(url, field, limits, client)
    return [done[field] for field, _ in parts]


async def check_images(
    body: dict[str, Any], limits: ImageLimits, client: httpx.AsyncClient | None = None
) -> CheckedImages:
    """Check every image of a prepared chat request (see the module's docstring)."""
    parts = image_parts(body.get("messages", []))
    if not parts:
        return CheckedImages(body)
    checked = await check_parts(parts, limits, client)
    for (field, url), (_, sent) in zip(parts, checked, strict=True):
        if sent != url:
            body = _replace_url(body, field, sent)
    return CheckedImages(body, tuple(image for image, _ in checked))


async def check_urls(
    urls: list[str], field: str, limits: ImageLimits, client: httpx.AsyncClient | None = None
) -> list[str]:
    """Check a list of image URLs (``field.0``, ``field.1``, ...): the URLs a worker gets."""
    parts = [(f"{field}.{k}", url) for k, url in enumerate(urls)]
    return [sent for _, sent in await check_parts(parts, limits, client)]
