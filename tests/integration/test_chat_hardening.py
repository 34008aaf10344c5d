"""What the chat schema accepts, a real llama.cpp worker takes; 5xx only for a broken one.

One app with a real tiny worker (the demo fast model, n_ctx 256, on the CPU) serves the
whole module over HTTP.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from app.main import create_app
from services.llm.chat import MAX_ERROR_CHARS, ChatProxy
from services.llm.chat_checks import (
    TEMPLATE_FIXED_TOKENS,
    TEMPLATE_TOKENS_PER_MESSAGE,
    UTF8_SLACK_TOKENS,
)
from services.settings import Settings
from tests.helpers import wait_ready

N_CTX = 256
URL = "/v1/chat/completions"


@pytest.fixture(scope="module")
def client(tiny_dir, tmp_path_factory) -> Iterator[TestClient]:
    tmp = tmp_path_factory.mktemp("hardening")
    settings = Settings(
        server={"outputs_dir": str(tmp / "outputs"), "log_level": "debug"},
        memory={"reserve_ram_mb": 0, "state_dir": str(tmp / "state")},
        models={"fast": {"path": str(tiny_dir / "fast.gguf"), "n_ctx": N_CTX}, "n_threads": 1},
    )
    with TestClient(create_app(settings)) as c:
        wait_ready(c)
        yield c


@pytest.fixture
def token_counts(monkeypatch) -> list[int]:
    """The prompt counts asked of the worker's tokenizer during a test, in order."""
    seen: list[int] = []
    real = ChatProxy._count_tokens

    async def counting(self, text, res):  # noqa: ANN001, ANN202
        n = await real(self, text, res)
        seen.append(n)
        return n

    monkeypatch.setattr(ChatProxy, "_count_tokens", counting)
    return seen


def chat(client: TestClient, messages: list[dict[str, Any]], **params: Any) -> httpx.Response:
    return client.post(URL, json={"model": "fast", "messages": messages, **params})


def user(text: str = "hello") -> list[dict[str, Any]]:
    return [{"role": "user", "content": text}]


def fields(r: httpx.Response) -> list[str]:
    assert r.status_code == 422, r.text
    assert r.json()["error"]["code"] == "invalid_request"
    return [f["field"] for f in r.json()["error"]["fields"]]


# ---- messages ------------------------------------------------------------------------


def test_developer_role_and_system_text_parts_reach_the_worker_as_system(client) -> None:
    as_system = chat(client, [{"role": "system", "content": "be brief\nbe kind"}, *user()],
                     max_tokens=2, temperature=0)  # fmt: skip
    as_developer = chat(client, [{"role": "developer", "content": "be brief\nbe kind"}, *user()],
                        max_tokens=2, temperature=0)  # fmt: skip
    parts = [{"type": "text", "text": "be brief"}, {"type": "text", "text": "be kind"}]
    as_parts = chat(client, [{"role": "system", "content": parts}, *user()],
                    max_tokens=2, temperature=0)  # fmt: skip
    dev_parts = chat(client, [{"role": "developer", "content": parts}, *user()],
                     max_tokens=2, temperature=0)  # fmt: skip
    for r in (as_system, as_developer, as_parts, dev_parts):
        assert r.status_code == 200, r.text
    # The worker saw the same prompt each time: a system message with the texts joined.
    prompts = {r.json()["usage"]["prompt_tokens"] for r in (as_system, as_developer, as_parts)}
    assert len(prompts) == 1 and dev_parts.json()["usage"]["prompt_tokens"] in prompts


CALL = {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}


@pytest.mark.parametrize(
    ("messages", "field"),
    [
        ([{"role": "user", "content": None}], "messages.0.content"),
        ([{"role": "user"}], "messages.0.content"),
        ([{"role": "system", "content": None}, *user()], "messages.0.content"),
        ([{"role": "developer", "content": None}, *user()], "messages.0.content"),
        ([*user(), {"role": "assistant", "content": None}, *user()], "messages.1.content"),
        ([*user(), {"role": "tool", "content": "42"}], "messages.1.tool_call_id"),
        ([*user(), {"role": "tool", "content": None, "tool_call_id": "c"}], "messages.1.content"),
        ([{"role": "system", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}],
         "messages.0.content.0.type"),
        ([*user(), {"role": "assistant", "tool_calls": [{"id": "c", "type": "function"}]}],
         "messages.1.tool_calls.0.function.name"),
        ([{"role": "user", "content": [{"type": "audio"}]}], "messages.0.content.0.type"),
    ],
)  # fmt: skip
def test_messages_the_worker_cannot_take_answer_422_naming_the_field(
    client, messages, field
) -> None:
    assert fields(chat(client, messages, max_tokens=2)) == [field]


def test_tool_messages_answering_a_call_are_taken(client) -> None:
    """The worker takes a tool message that carries tool_call_id (and an assistant message
    with tool_calls and null content): found by sending them to a real worker."""
    messages = [
        *user("what is f?"),
        {"role": "assistant", "content": None, "tool_calls": [CALL]},
        {"role": "tool", "content": [{"type": "text", "text": "42"}], "tool_call_id": "call_1"},
    ]
    r = chat(client, messages, max_tokens=2)
    assert r.status_code == 200, r.text


# ---- sampling parameters -------------------------------------------------------------

EDGES: list[tuple[str, Any, Any]] = [  # (field, the last value taken, the first refused)
    ("temperature", 0, -0.001),
    ("temperature", 2, 2.001),
    ("temperature", 2, 1e308),
    ("top_p", 0, -0.01),
    ("top_p", 1, 1.01),
    ("presence_penalty", -2, -2.01),
    ("presence_penalty", 2, 2.01),
    ("frequency_penalty", -2, -2.01),
    ("frequency_penalty", 2, 2.01),
    ("n", 1, 2),
    ("n", 1, 1000),
    ("stop", ["a", "b", "c", "d"], ["a", "b", "c", "d", "e"]),
    ("stop", "x", 5),
    ("max_tokens", 1, 0),
    ("seed", 7, 1.5),
    ("stream", False, 0),
    ("stream", False, "true"),
    ("top_k", 0, -1),
    ("min_p", 1, 1.5),
]


@pytest.mark.parametrize(("field", "ok", "bad"), EDGES, ids=[f"{f}={b}" for f, _, b in EDGES])
def test_each_sampling_bound_answers_422_naming_the_field(client, field, ok, bad) -> None:
    taken = chat(client, user(), **{"max_tokens": 2, field: ok})
    assert taken.status_code == 200, taken.text
    assert fields(chat(client, user(), **{"max_tokens": 2, field: bad})) == [field]


@pytest.mark.parametrize(
    ("bias", "field"), [({"5": 100.5}, "logit_bias.5"), ({"abc": 1}, "logit_bias.abc")]
)
def test_logit_bias_values_and_keys(client, bias, field) -> None:
    assert chat(client, user(), max_tokens=2, logit_bias={"5": -100, "7": 100}).status_code == 200
    assert fields(chat(client, user(), max_tokens=2, logit_bias=bias)) == [field]


# ---- the context ---------------------------------------------------------------------


# Grammars make the tiny random model's answers deterministic in what matters here: WIDE
# answers only characters of three byte tokens each, ASCII only one-byte characters.
WIDE = 'root ::= "中"+'
ASCII = "root ::= [a-z ]+"


@pytest.mark.parametrize("suffix", ["", "x", "xy"])
def test_huge_max_tokens_is_clamped_never_502(client, suffix) -> None:
    """llama-cpp-python checks max_tokens only where the text ends on a whole UTF-8
    character, so an answer of 3-byte characters runs up to 2 tokens past it. Where its
    own truncation (n_ctx - prompt) left no room for that, the decode past the context
    failed: before the clamp, the prompt ending in "xy" answered 502."""
    r = chat(client, user("hi " * 5 + suffix), max_tokens=100_000, temperature=0, grammar=WIDE)
    assert r.status_code == 200, r.text
    clamped = r.json()["edison"]["max_tokens_clamped_to"]
    assert r.headers["x-edison-max-tokens"] == str(clamped)
    usage = r.json()["usage"]
    assert r.json()["choices"][0]["finish_reason"] == "length"
    assert clamped <= usage["completion_tokens"] <= clamped + 2
    assert usage["prompt_tokens"] + clamped + UTF8_SLACK_TOKENS <= N_CTX


SHAPES = {
    "user": user("hello"),
    "developer": [{"role": "developer", "content": "be brief"}, *user("hello world")],
    "turns": [
        {"role": "system", "content": "s"},
        *user("a"),
        {"role": "assistant", "content": "b"},
        *user("c"),
    ],
    "tool": [
        *user("f?"),
        {"role": "assistant", "content": None, "tool_calls": [CALL]},
        {"role": "tool", "content": "42", "tool_call_id": "call_1"},
    ],
}


@pytest.mark.parametrize("messages", SHAPES.values(), ids=SHAPES.keys())
def test_the_chat_template_fits_in_its_bound(client, messages) -> None:
    """The worker's real prompt (template included) fits in what the clamp left for it."""
    r = chat(client, messages, max_tokens=100_000, temperature=0, grammar=ASCII)
    assert r.status_code == 200, r.text
    clamped = r.json()["edison"]["max_tokens_clamped_to"]
    assert r.json()["usage"]["prompt_tokens"] + clamped + UTF8_SLACK_TOKENS <= N_CTX


def test_max_tokens_that_fits_is_sent_as_asked(client, token_counts) -> None:
    r = chat(client, user("hi"), max_tokens=8)
    assert r.status_code == 200
    assert "max_tokens_clamped_to" not in r.json()["edison"]
    assert "x-edison-max-tokens" not in r.headers
    assert token_counts == []  # "hi" plus 8 fits whatever the tokenizer says: not counted
    absent = chat(client, user("hi"))
    assert absent.status_code == 200
    assert absent.json()["edison"]["max_tokens_clamped_to"] == (
        N_CTX
        - token_counts[0]
        - TEMPLATE_FIXED_TOKENS
        - TEMPLATE_TOKENS_PER_MESSAGE
        - UTF8_SLACK_TOKENS
    )


def test_too_long_prompt_answers_400_with_the_numbers(client, token_counts) -> None:
    r = chat(client, user("hello world " * 60), max_tokens=4)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["code"] == "context_length_exceeded"
    assert err["n_ctx"] == N_CTX and err["prompt_tokens"] == token_counts[0] > 0
    assert "prompt_tokens_is_lower_bound" not in err
    assert str(err["prompt_tokens"]) in err["message"] and str(N_CTX) in err["message"]
    # Far more text than any tokenizer could fit: refused without asking the worker.
    huge = chat(client, user("x" * (256 * N_CTX)), max_tokens=4)
    assert huge.status_code == 400
    assert huge.json()["error"]["prompt_tokens_is_lower_bound"] is True
    assert len(token_counts) == 1


def test_streams_get_the_same_checks_before_the_first_byte(client) -> None:
    body = {"model": "fast", "stream": True, "messages": user()}
    with client.stream("POST", URL, json={**body, "temperature": -1}) as r:
        assert r.status_code == 422
        assert json.loads(r.read())["error"]["fields"][0]["field"] == "temperature"
    with client.stream("POST", URL, json={**body, "messages": user("hello " * 300)}) as r:
        assert r.status_code == 400
        assert json.loads(r.read())["error"]["code"] == "context_length_exceeded"
    wide = {**body, "messages": user("hi " * 5 + "xy"), "max_tokens": 100_000}
    wide.update(grammar=WIDE, temperature=0)
    with client.stream("POST", URL, json=wide) as r:
        assert r.status_code == 200
        clamped = int(r.headers["x-edison-max-tokens"])
        events = [json.loads(x[6:]) for x in r.iter_lines() if x.startswith("data: {")]
    # Before the clamp this stream stopped short at the context's end, with no finish.
    assert 1 <= clamped < 100_000
    assert all("error" not in e for e in events)
    assert events[-1]["choices"][0]["finish_reason"] == "length"
    developer = {**body, "messages": [{"role": "developer", "content": "x"}, *user()]}
    with client.stream("POST", URL, json={**developer, "max_tokens": 3}) as r:
        assert r.status_code == 200
        assert b"[DONE]" in r.read()


# ---- logs and error messages ---------------------------------------------------------


@pytest.fixture(scope="module")
def python_client(tiny_dir, tmp_path_factory) -> Iterator[TestClient]:
    """A fast tier on llama-cpp-python: its request validation answers a bad tool
    definition with the pydantic error that quotes the request (llama-server answers 500)."""
    tmp = tmp_path_factory.mktemp("hardening-python")
    settings = Settings(
        server={"outputs_dir": str(tmp / "outputs"), "log_level": "debug"},
        memory={"reserve_ram_mb": 0, "state_dir": str(tmp / "state")},
        models={
            "fast": {"path": str(tiny_dir / "fast.gguf"), "n_ctx": N_CTX},
            "n_threads": 1,
            "backend": "llama-cpp-python",
        },
    )
    with TestClient(create_app(settings)) as c:
        wait_ready(c)
        yield c


def test_long_request_text_is_never_logged_at_info_or_above(python_client, caplog) -> None:
    client = python_client
    marker = "zebra quartz secret "
    caplog.set_level(logging.DEBUG)
    ok = chat(client, user(marker * 4), max_tokens=100_000)
    too_long = chat(client, user(marker * 40), max_tokens=4)
    # A tool definition the worker refuses: its error quotes the definition back.
    refused = chat(
        client,
        user(marker),
        max_tokens=2,
        tools=[{"type": "function", "function": {"description": marker * 3}}],
    )
    assert ok.status_code == 200 and too_long.status_code == 400
    assert refused.status_code == 400, refused.text
    err = refused.json()["error"]
    assert err["code"] == "invalid_request" and "tools.0.function.name" in err["message"]
    assert marker not in err["message"] and len(err["message"]) <= MAX_ERROR_CHARS + 60
    loud = [rec for rec in caplog.records if rec.levelno >= logging.INFO]
    assert loud, "the refusal is logged"
    assert not [rec.getMessage() for rec in loud if "zebra" in rec.getMessage()]
    assert all("\n" not in rec.getMessage() for rec in loud if rec.name == "edison.chat")
    # Below INFO the worker's whole message is kept for debugging.
    assert any("zebra" in rec.getMessage() for rec in caplog.records if rec.levelno < logging.INFO)
