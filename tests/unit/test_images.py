"""Image checks of chat requests: data URLs, remote URLs, sizes, the context budget."""

from __future__ import annotations

import httpx
import pytest

from services.errors import InvalidRequest
from services.llm.chat_checks import PromptText
from services.llm.images import ImageLimits, check_images, check_urls, image_parts
from services.settings import VisionTierSettings
from tests.images import data_url, image_bytes, image_message

LIMITS = ImageLimits(max_bytes=20_000, max_pixels=10_000, allow_remote=False)
REMOTE = ImageLimits(max_bytes=20_000, max_pixels=10_000, allow_remote=True)
FIELD = "messages.0.content.1.image_url"


def body(url: str) -> dict:
    return {"messages": [image_message(url)]}


def refused(excinfo: pytest.ExceptionInfo[InvalidRequest]) -> tuple[str, str]:
    (problem,) = excinfo.value.details["fields"]
    return problem["field"], problem["message"]


def test_limits_come_from_the_vision_settings_or_their_defaults() -> None:
    mine = VisionTierSettings(path="v.gguf", max_image_mb=2, allow_remote_images=True)
    assert ImageLimits.from_settings(mine) == ImageLimits(2 * 1024 * 1024, 16_777_216, True)
    assert ImageLimits.from_settings(None) == ImageLimits(10 * 1024 * 1024, 16_777_216, False)


@pytest.mark.anyio
@pytest.mark.parametrize(("fmt", "mime"), [("PNG", "image/png"), ("JPEG", "image/jpeg")])
async def test_png_and_jpeg_data_urls_pass_as_they_are(fmt, mime) -> None:
    b = body(data_url(image_bytes(40, 30, fmt), mime))
    out = await check_images(b, LIMITS)
    assert out.body is b
    (image,) = out.images
    assert (image.field, image.format, image.width, image.height) == (FIELD, fmt, 40, 30)
    assert image.remote is False


@pytest.mark.anyio
async def test_no_images_nothing_to_do() -> None:
    b = {"messages": [{"role": "user", "content": "hi"}]}
    assert (await check_images(b, LIMITS)).images == ()


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("data:image/png;base64,iVBOR w0KGgo=", "base64 is corrupt"),
        ("data:image/png;base64,iVBORw0KGgo", "base64 is corrupt"),  # padding missing
        ("data:image/png;base64,\u00e9\u00e9\u00e9\u00e9", "base64 is corrupt"),
        ("data:image/png;base64,", "empty"),
        (data_url(b"GIF89a not really"), "not a PNG or JPEG"),
        (data_url(image_bytes(8, 8, "GIF"), "image/gif"), "not a PNG or JPEG"),
        (data_url(image_bytes(40, 30)[:60]), "damaged"),
        (data_url(image_bytes(120, 120, noise=True)), "about"),  # refused before decoding
        (data_url(image_bytes(101, 100)), "max_image_pixels"),
        ("data:image/png,notbase64", "base64 data URL"),
        ("data:;base64", "base64 data URL"),
        ("http://127.0.0.1/cat.png", "allow_remote_images"),
        ("HTTPS://example.com/cat.png", "allow_remote_images"),
        ("file:///etc/passwd", "must be a data URL"),
        ("/etc/passwd", "must be a data URL"),
    ],
)
async def test_bad_images_are_refused_naming_the_part(url, why) -> None:
    with pytest.raises(InvalidRequest) as exc:
        await check_images(body(url), LIMITS)
    field, message = refused(exc)
    assert field == FIELD
    assert why in message


def test_image_parts_finds_every_image_in_order() -> None:
    png = data_url(image_bytes())
    messages = [
        {"role": "system", "content": "s"},
        image_message(png),
        {"role": "user", "content": [{"type": "image_url", "image_url": png}]},
    ]
    assert image_parts(messages) == [
        ("messages.1.content.1.image_url", png),
        ("messages.2.content.0.image_url", png),
    ]


def serving(routes: dict[str, httpx.Response]) -> httpx.AsyncClient:
    def handler(request: httpx.Request) -> httpx.Response:
        return routes.get(str(request.url), httpx.Response(404))

    return httpx.AsyncClient(transport=httpx.MockTransport(handler))


@pytest.mark.anyio
async def test_allowed_remote_image_is_fetched_and_sent_as_a_data_url() -> None:
    jpeg = image_bytes(30, 20, "JPEG")
    url = "https://images.example/cat.jpg"
    b = body(url)
    async with serving({url: httpx.Response(200, content=jpeg)}) as client:
        out = await check_images(b, REMOTE, client)
    (image,) = out.images
    assert (image.format, image.width, image.height, image.remote) == ("JPEG", 30, 20, True)
    sent = out.body["messages"][0]["content"][1]["image_url"]["url"]
    assert sent == data_url(jpeg, "image/jpeg")
    assert b["messages"][0]["content"][1]["image_url"]["url"] == url  # the caller's is unchanged
    assert out.body["messages"][0]["content"][0] == {"type": "text", "text": "what is this?"}


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("response", "why"),
    [
        (httpx.Response(404), "HTTP 404"),
        (httpx.Response(200, content=b"<html>not an image</html>"), "not a PNG or JPEG"),
        (httpx.Response(200, content=image_bytes(120, 120, noise=True)), "max_image_mb"),
    ],
)
async def test_bad_remote_images_are_refused(response, why) -> None:
    url = "http://images.example/x.png"
    async with serving({url: response}) as client:
        with pytest.raises(InvalidRequest) as exc:
            await check_images(body(url), REMOTE, client)
    field, message = refused(exc)
    assert field == FIELD and why in message


@pytest.mark.anyio
async def test_url_lists_are_checked_naming_each_item() -> None:
    png = data_url(image_bytes())
    assert await check_urls([png, png], "images", LIMITS) == [png, png]
    with pytest.raises(InvalidRequest) as exc:
        await check_urls([png, "http://x.example/a.png"], "images", LIMITS)
    assert refused(exc)[0] == "images.1"


def test_images_count_in_the_context_budget() -> None:
    plain = PromptText("hi", 2, 1)
    with_images = PromptText("hi", 2, 1, image_tokens=2 * 576)
    assert with_images.template_tokens - plain.template_tokens == 1152
