"""The chat checks from given bodies and numbers: normalization, bounds, the clamp."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from routers.chat import ChatRequest
from services.errors import ContextLengthExceeded, InvalidRequest
from services.llm.chat import MAX_ERROR_CHARS, one_line, validation_summary
from services.llm.chat_checks import (
    MAX_BYTES_PER_TOKEN,
    TEMPLATE_FIXED_TOKENS,
    TEMPLATE_TOKENS_PER_MESSAGE,
    TOKENIZER_EXTRA_TOKENS,
    UTF8_SLACK_TOKENS,
    Fit,
    PromptText,
    check_params,
    fit,
    fit_from_length,
    prepare_request,
    prompt_text,
)

USER = {"role": "user", "content": "hi"}
CALL = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}


def field_of(body: dict[str, Any]) -> str:
    with pytest.raises(InvalidRequest) as caught:
        prepare_request(body)
    return caught.value.details["fields"][0]["field"]


# ---- messages ------------------------------------------------------------------------

NORMALIZED = [  # (message as sent, message as the worker gets it)
    ({"role": "developer", "content": "rules"}, {"role": "system", "content": "rules"}),
    (
        {
            "role": "system",
            "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}],
        },
        {"role": "system", "content": "a\nb"},
    ),
    (
        {"role": "developer", "content": [{"type": "text", "text": "a"}]},
        {"role": "system", "content": "a"},
    ),
    (
        {
            "role": "assistant",
            "content": [{"type": "text", "text": "x"}, {"type": "refusal", "refusal": "no"}],
        },
        {"role": "assistant", "content": "x\nno"},
    ),
    (
        {"role": "assistant", "content": None, "tool_calls": [CALL]},
        {"role": "assistant", "tool_calls": [CALL]},
    ),
    (
        {"role": "tool", "content": [{"type": "text", "text": "42"}], "tool_call_id": "c1"},
        {"role": "tool", "content": "42", "tool_call_id": "c1"},
    ),
    (
        {"role": "user", "content": [{"type": "input_image", "image_url": "data:x"}]},
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:x"}}]},
    ),
    (
        {"role": "user", "content": "hi", "name": "ann"},
        {"role": "user", "content": "hi", "name": "ann"},
    ),
]


@pytest.mark.parametrize(("sent", "worker"), NORMALIZED)
def test_messages_are_normalized_to_what_the_worker_takes(sent, worker) -> None:
    out = prepare_request({"messages": [sent, USER]})
    assert out["messages"] == [worker, USER]


REFUSED_MESSAGES = [  # (messages, the field named)
    ([{"role": "user", "content": None}], "messages.0.content"),
    ([{"role": "user"}], "messages.0.content"),
    ([USER, {"role": "system", "content": None}], "messages.1.content"),
    ([{"role": "developer", "content": None}], "messages.0.content"),
    ([USER, {"role": "assistant", "content": None}], "messages.1.content"),
    ([USER, {"role": "assistant", "content": None, "tool_calls": []}], "messages.1.content"),
    ([USER, {"role": "tool", "content": "42"}], "messages.1.tool_call_id"),
    ([USER, {"role": "tool", "content": "42", "tool_call_id": ""}], "messages.1.tool_call_id"),
    ([USER, {"role": "tool", "content": None, "tool_call_id": "c"}], "messages.1.content"),
    ([{"role": "function", "content": "x"}], "messages.0.role"),
    (
        [{"role": "system", "content": [{"type": "image_url", "image_url": "u"}]}],
        "messages.0.content.0.type",
    ),
    ([{"role": "system", "content": [{"type": "text", "text": 5}]}], "messages.0.content.0.text"),
    ([{"role": "user", "content": [{"type": "audio"}]}], "messages.0.content.0.type"),
    (
        [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}],
        "messages.0.content.0.image_url",
    ),
    ([{"role": "user", "content": 5}], "messages.0.content"),
    (
        [USER, {"role": "assistant", "tool_calls": [{"id": "c", "type": "function"}]}],
        "messages.1.tool_calls.0.function.name",
    ),
    (
        [USER, {"role": "assistant", "tool_calls": [{**CALL, "type": "code"}]}],
        "messages.1.tool_calls.0.type",
    ),
    ([], "messages"),
    (["hi"], "messages.0"),
]


@pytest.mark.parametrize(("messages", "field"), REFUSED_MESSAGES)
def test_messages_the_worker_would_refuse_name_the_field(messages, field) -> None:
    assert field_of({"messages": messages}) == field


def test_prepare_maps_newer_names_and_leaves_the_body_alone() -> None:
    body = {
        "messages": [{"role": "developer", "content": "x"}, USER],
        "max_completion_tokens": 9,
        "response_format": {
            "type": "json_schema",
            "json_schema": {"name": "n", "schema": {"type": "object"}},
        },
    }
    out = prepare_request(body)
    assert out["max_tokens"] == 9 and "max_completion_tokens" not in out
    assert out["response_format"] == {"type": "json_object", "schema": {"type": "object"}}
    assert body["messages"][0]["role"] == "developer" and "max_tokens" not in body
    both = {"messages": [USER], "max_tokens": 5, "max_completion_tokens": 6}
    assert field_of(both) == "max_completion_tokens"
    assert prepare_request({**both, "max_tokens": 6})["max_tokens"] == 6


# ---- parameters: each bound at its edge and just beyond ------------------------------

EDGES: list[tuple[str, Any, Any]] = [  # (field, the last value taken, the first refused)
    ("temperature", 0, -0.001),
    ("temperature", 2, 2.001),
    ("temperature", 2.0, 1e308),
    ("temperature", 1, True),
    ("temperature", 1, "1"),
    ("top_p", 0, -0.001),
    ("top_p", 1, 1.001),
    ("presence_penalty", -2, -2.001),
    ("presence_penalty", 2, 2.001),
    ("frequency_penalty", -2, -2.001),
    ("frequency_penalty", 2, 2.001),
    ("n", 1, 2),
    ("n", 1, 0),
    ("n", 1, 1.0),
    ("max_tokens", 1, 0),
    ("max_tokens", 1_000_000, 1_000_001),
    ("max_completion_tokens", 1, 0),
    ("seed", -3, 1.5),
    ("seed", 2**40, "7"),
    ("stream", True, 0),
    ("stream", False, "false"),
    ("stop", ["a", "b", "c", "d"], ["a", "b", "c", "d", "e"]),
    ("stop", "x", 5),
    ("stop", [], [1]),
    ("top_k", 0, -1),
    ("min_p", 1, 1.001),
    ("repeat_penalty", 0, -0.1),
    ("top_logprobs", 20, 21),
    ("mirostat_mode", 2, 3),
    ("logprobs", False, 1),
]


@pytest.mark.parametrize(("field", "ok", "bad"), EDGES, ids=[f"{f}={b!r}" for f, _, b in EDGES])
def test_service_checks_each_bound(field, ok, bad) -> None:
    check_params({field: ok})
    with pytest.raises(InvalidRequest) as caught:
        check_params({field: bad})
    assert [f["field"] for f in caught.value.details["fields"]] == [field]


@pytest.mark.parametrize(("field", "ok", "bad"), EDGES, ids=[f"{f}={b!r}" for f, _, b in EDGES])
def test_request_model_declares_each_bound(field, ok, bad) -> None:
    """The router's pydantic model refuses the same values (and so the OpenAPI schema
    shows the bounds)."""
    ChatRequest.model_validate({"messages": [USER], field: ok})
    with pytest.raises(ValidationError) as caught:
        ChatRequest.model_validate({"messages": [USER], field: bad})
    assert {e["loc"][0] for e in caught.value.errors()} == {field}


def test_the_schema_shows_the_bounds() -> None:
    props = ChatRequest.model_json_schema()["properties"]
    temperature = props["temperature"]["anyOf"][0]
    assert (temperature["minimum"], temperature["maximum"]) == (0, 2)
    assert props["n"]["anyOf"][0]["maximum"] == 1
    assert props["stream"]["type"] == "boolean"


@pytest.mark.parametrize(
    ("bias", "field"),
    [
        ({"12": 100.5}, "logit_bias.12"),
        ({"12": -100.5}, "logit_bias.12"),
        ({"x": 1}, "logit_bias.x"),
        ({"-1": 1}, "logit_bias.-1"),
        ({"1": float("nan")}, "logit_bias.1"),
    ],
)
def test_logit_bias(bias, field) -> None:
    check_params({"logit_bias": {"0": -100, "12": 100}})
    check_params({"logit_bias": {"hello": 5}, "logit_bias_type": "tokens"})
    with pytest.raises(InvalidRequest) as caught:
        check_params({"logit_bias": bias})
    assert caught.value.details["fields"][0]["field"] == field


@pytest.mark.parametrize(
    "fmt",
    [
        {"type": "xml"},
        "json",
        {"type": "json_schema"},
        {"type": "json_schema", "json_schema": {"schema": 1}},
    ],
)
def test_response_format(fmt) -> None:
    with pytest.raises(InvalidRequest):
        check_params({"response_format": fmt})


# ---- the context budget --------------------------------------------------------------

CLAMPS = [  # (prompt tokens, template tokens, max_tokens asked, n_ctx) -> (sent, clamped_to)
    (100, 40, 50, 256, (50, None)),
    (100, 40, 112, 256, (112, None)),  # 100 + 40 + 112 + 4 = 256: just fits
    (100, 40, 113, 256, (112, 112)),
    (100, 40, 100_000, 256, (112, 112)),
    (100, 40, None, 256, (112, 112)),  # none asked: the room, said
    (211, 40, 5, 256, (1, 1)),  # room for exactly one token
    (0, 40, None, 4096, (4052, 4052)),
]


@pytest.mark.parametrize(("prompt", "template", "asked", "n_ctx", "expected"), CLAMPS)
def test_clamp_arithmetic(prompt, template, asked, n_ctx, expected) -> None:
    assert UTF8_SLACK_TOKENS == 4  # the table's arithmetic
    done = fit(prompt, template, asked, n_ctx, tier="fast")
    assert (done.max_tokens, done.clamped_to) == expected
    assert done.prompt_tokens == prompt


@pytest.mark.parametrize(("prompt", "template"), [(212, 40), (256, 40), (5000, 40), (0, 253)])
def test_no_room_is_context_length_exceeded_with_the_numbers(prompt, template) -> None:
    with pytest.raises(ContextLengthExceeded) as caught:
        fit(prompt, template, 8, 256, tier="fast")
    d = caught.value.details
    assert (d["prompt_tokens"], d["template_tokens"], d["n_ctx"], d["tier"]) == (
        prompt,
        template,
        256,
        "fast",
    )
    assert f"{prompt} tokens" in caught.value.message and "256" in caught.value.message


def test_cheap_bounds_from_length() -> None:
    template = TEMPLATE_FIXED_TOKENS + TEMPLATE_TOKENS_PER_MESSAGE
    # Few bytes: even a token per byte leaves room for what is asked -> no count needed.
    small = PromptText("x" * 10, 10, 1)
    room = 256 - (10 + TOKENIZER_EXTRA_TOKENS) - template - UTF8_SLACK_TOKENS
    assert fit_from_length(small, room, 256, tier="fast") == Fit(room, None, None)
    assert fit_from_length(small, room + 1, 256, tier="fast") is None
    assert fit_from_length(small, None, 256, tier="fast") is None  # the room is the answer
    # So many bytes that even the longest tokens could not fit: refused, a lower bound.
    fewest_fits = 256 - template - UTF8_SLACK_TOKENS - 1
    edge = PromptText("", fewest_fits * MAX_BYTES_PER_TOKEN, 1)
    assert fit_from_length(edge, 1, 256, tier="fast") is None
    over = PromptText("", fewest_fits * MAX_BYTES_PER_TOKEN + 1, 1)
    with pytest.raises(ContextLengthExceeded) as caught:
        fit_from_length(over, 1, 256, tier="fast")
    assert caught.value.details["prompt_tokens_is_lower_bound"] is True
    assert caught.value.details["prompt_tokens"] == fewest_fits + 1


def test_prompt_text_counts_roles_contents_calls_and_tools() -> None:
    body = {
        "messages": [
            {"role": "system", "content": "sys"},
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "look"},
                    {"type": "image_url", "image_url": {"url": "u"}},
                ],
            },
            {"role": "assistant", "tool_calls": [CALL]},
        ],
        "tools": [{"type": "function", "function": {"name": "f"}}],
    }
    p = prompt_text(body)
    assert p.text.startswith("system\nsys\nuser\nlook\nassistant\n\n")
    assert '"name": "f"' in p.text and '"arguments"' in p.text
    assert p.n_bytes == len(p.text) and p.n_messages == 3
    assert p.template_tokens == TEMPLATE_FIXED_TOKENS + 3 * TEMPLATE_TOKENS_PER_MESSAGE
    assert (
        prompt_text({"messages": [{"role": "user", "content": "é"}]}).n_bytes
        == len("user\né\n") + 1
    )
    with pytest.raises(InvalidRequest):
        prompt_text({"messages": [{"role": "user", "content": "\ud800"}]})


# ---- worker error text ---------------------------------------------------------------

SECRET = "the whole private prompt " * 50
WORKER_VALIDATION = (
    "2 validation errors:\n"
    "  {'type': 'missing', 'loc': ('body', 'tools', 0, 'function', 'name'), "
    f"'msg': 'Field required', 'input': {{'description': '{SECRET}'}}}}\n"
    "  {'type': 'literal_error', "
    "'loc': ('body', 'messages', 0, 'ChatCompletionRequestSystemMessage', 'role'), "
    f"'msg': \"Input should be 'system'\", 'input': '{SECRET}'}}\n"
    '\n  File "app.py", line 376, in create_chat_completion'
)


def test_worker_validation_text_is_summarized_without_its_inputs() -> None:
    summary = validation_summary(WORKER_VALIDATION)
    assert summary == (
        "tools.0.function.name: Field required; "
        "messages.0.ChatCompletionRequestSystemMessage.role: Input should be 'system'"
    )
    assert validation_summary("llama_decode returned 1") is None


def test_one_line_caps_the_worker_message() -> None:
    assert one_line("\n  llama_decode returned 1\n  File x\n") == "llama_decode returned 1"
    capped = one_line(SECRET + "\nmore")
    assert len(capped) == MAX_ERROR_CHARS and capped.endswith("…")
