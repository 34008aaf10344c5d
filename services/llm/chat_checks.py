"""What a chat request must be before a llama_cpp.server worker sees it.

Everything here is a pure function of the request body and given numbers (no I/O), so
that a request the workers would refuse, or fail on, is answered 422 naming the field
(or 400 ``context_length_exceeded``) instead of a 502 from the worker:

- the messages, normalized to what the worker's types take (``developer`` is
  ``system``; text parts of system, assistant and tool messages joined; ``null``
  content refused except on an assistant message that carries tool calls);
- the sampling parameters, against OpenAI's bounds (llama.cpp's own for its
  extensions); ``routers/chat.py`` declares the same bounds from these tables so the
  OpenAPI schema shows them;
- ``max_tokens``, clamped to what the context leaves after the prompt (see
  :func:`fit`): llama-cpp-python generates up to three tokens past ``max_tokens`` to
  finish a UTF-8 character, and a generation that reaches the end of the context
  fails in the worker (``llama_decode returned 1``).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Any

from services.errors import ContextLengthExceeded, InvalidRequest

# Numbers: (lowest, highest) allowed, None for no bound. OpenAI's bounds; llama.cpp's own
# for its extensions (top_k, min_p, ...). ``n`` is 1: llama_cpp.server answers one choice.
FLOAT_BOUNDS: dict[str, tuple[float | None, float | None]] = {
    "temperature": (0.0, 2.0),
    "top_p": (0.0, 1.0),
    "presence_penalty": (-2.0, 2.0),
    "frequency_penalty": (-2.0, 2.0),
    "min_p": (0.0, 1.0),
    "repeat_penalty": (0.0, None),
    "mirostat_tau": (0.0, 10.0),
    "mirostat_eta": (0.001, 1.0),
}
INT_BOUNDS: dict[str, tuple[int | None, int | None]] = {
    "max_tokens": (1, 1_000_000),
    "max_completion_tokens": (1, 1_000_000),
    "n": (1, 1),
    "seed": (None, None),
    "top_k": (0, None),
    "min_tokens": (0, None),
    "top_logprobs": (0, 20),
    "mirostat_mode": (0, 2),
}
BOOLS = ("stream", "logprobs")
STRINGS = ("user", "grammar")
LOGIT_BIAS_BOUNDS = (-100.0, 100.0)
MAX_STOP = 4
RESPONSE_FORMATS = ("text", "json_object", "json_schema")

# The context budget, in tokens. The worker's tokenizer counts the messages' text (each
# as "role\ncontent\n", plus tool calls and tool definitions as JSON); the chat template
# adds its markers around them. TEMPLATE_* bound those markers: ChatML, Llama 3, Gemma
# and Mistral templates add 2-7 tokens per message and under 10 for BOS and the
# generation prompt; the demo models' template, spelled in plain characters, 4 per
# message and 14. The fixed part also covers what some templates add once (Llama 2's
# <<SYS>> markers, Llama 3.1's default system line with dates: about 25 tokens).
TEMPLATE_FIXED_TOKENS = 32
TEMPLATE_TOKENS_PER_MESSAGE = 8
# llama-cpp-python checks max_tokens only where the text ends on a whole UTF-8 character
# (``Llama._create_completion``): a 4-byte character in byte tokens runs 3 tokens past
# it, and a decode past the context's end fails. 3 less the last sampled token (never
# decoded) is 2; 4 keeps a margin. Output that is not valid UTF-8 (random weights) can
# run on without bound: no clamp covers that.
UTF8_SLACK_TOKENS = 4
# Bounds from the length alone: a token is at least one byte of the UTF-8 text (plus
# BOS, EOS and a leading-space token that tokenizers may add), and no vocabulary in use
# has tokens longer than 256 bytes.
TOKENIZER_EXTRA_TOKENS = 4
MAX_BYTES_PER_TOKEN = 256

_TOKEN_ID = re.compile(r"^(0|[1-9][0-9]{0,9})$")


# ---- parameters ----------------------------------------------------------------------


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _check_range(name: str, v: float, lo: float | None, hi: float | None) -> None:
    if lo is not None and hi is not None and lo == hi and v != lo:
        raise InvalidRequest(name, f"must be {lo:g}: the llama.cpp workers return one choice")
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        if hi is None:
            raise InvalidRequest(name, f"must be at least {lo:g}")
        if lo is None:
            raise InvalidRequest(name, f"must be at most {hi:g}")
        raise InvalidRequest(name, f"must be between {lo:g} and {hi:g}")


def check_params(body: dict[str, Any]) -> None:
    """Raise InvalidRequest naming the first parameter outside its type or bounds.

    ``None`` is "not given" (OpenAI's null means the default).
    """
    for name, (lo, hi) in FLOAT_BOUNDS.items():
        v = body.get(name)
        if v is None:
            continue
        if not _is_number(v) or not math.isfinite(v):
            raise InvalidRequest(name, "must be a finite number")
        _check_range(name, v, lo, hi)
    for name, (ilo, ihi) in INT_BOUNDS.items():
        v = body.get(name)
        if v is None:
            continue
        if not _is_int(v):
            raise InvalidRequest(name, "must be an integer")
        _check_range(name, v, ilo, ihi)
    for name in BOOLS:
        if body.get(name) is not None and not isinstance(body[name], bool):
            raise InvalidRequest(name, "must be true or false")
    for name in STRINGS:
        if body.get(name) is not None and not isinstance(body[name], str):
            raise InvalidRequest(name, "must be a string")
    _check_stop(body.get("stop"))
    _check_logit_bias(body.get("logit_bias"), by_token_text=body.get("logit_bias_type") == "tokens")
    _check_response_format(body.get("response_format"))


def _check_stop(stop: Any) -> None:
    if stop is None or isinstance(stop, str):
        return
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise InvalidRequest("stop", f"must be a string or a list of at most {MAX_STOP} strings")
    if len(stop) > MAX_STOP:
        raise InvalidRequest("stop", f"at most {MAX_STOP} stop sequences ({len(stop)} given)")


def _check_logit_bias(bias: Any, *, by_token_text: bool) -> None:
    if bias is None:
        return
    if not isinstance(bias, dict):
        raise InvalidRequest("logit_bias", "must be an object of token id to bias")
    lo, hi = LOGIT_BIAS_BOUNDS
    for key, v in bias.items():
        if not by_token_text and not _TOKEN_ID.match(str(key)):
            raise InvalidRequest(f"logit_bias.{key}", "keys must be token ids (integers)")
        if not _is_number(v) or not math.isfinite(v):
            raise InvalidRequest(f"logit_bias.{key}", "must be a finite number")
        _check_range(f"logit_bias.{key}", v, lo, hi)


def _check_response_format(fmt: Any) -> None:
    if fmt is None:
        return
    if not isinstance(fmt, dict) or fmt.get("type") not in RESPONSE_FORMATS:
        raise InvalidRequest(
            "response_format.type", f"must be one of {', '.join(RESPONSE_FORMATS)}"
        )
    if fmt["type"] == "json_schema":
        spec = fmt.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("schema", {}), dict):
            raise InvalidRequest("response_format.json_schema", "must be an object with a schema")


def _response_format(fmt: dict[str, Any]) -> dict[str, Any]:
    """OpenAI's ``json_schema`` format as llama_cpp.server takes it: ``json_object``
    with the schema beside it (the worker turns it into a grammar)."""
    if fmt.get("type") != "json_schema":
        return fmt
    schema = fmt["json_schema"].get("schema")
    return {"type": "json_object", **({"schema": schema} if schema is not None else {})}


# ---- messages ------------------------------------------------------------------------


def _text_of(content: Any, field: str, kinds: tuple[str, ...] = ("text",)) -> str:
    """A string, or the texts of a list of text parts joined by newlines."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise InvalidRequest(field, "must be a string or a list of text parts")
    texts = []
    for k, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind not in kinds:
            raise InvalidRequest(f"{field}.{k}.type", f"must be {' or '.join(kinds)} here")
        text = part.get(kind)
        if not isinstance(text, str):
            raise InvalidRequest(f"{field}.{k}.{kind}", "must be a string")
        texts.append(text)
    return "\n".join(texts)


def _user_parts(content: list[Any], field: str) -> list[dict[str, Any]]:
    out = []
    for k, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            if not isinstance(part.get("text"), str):
                raise InvalidRequest(f"{field}.{k}.text", "must be a string")
        elif kind in ("image_url", "input_image"):
            url = part.get("image_url")
            if isinstance(url, dict):
                url = url.get("url")
            if not isinstance(url, str):
                raise InvalidRequest(f"{field}.{k}.image_url", "must be a URL or {url: ...}")
            if kind == "input_image":  # the Responses API's name; the worker knows image_url
                part = {"type": "image_url", "image_url": {"url": url}}
        else:
            raise InvalidRequest(f"{field}.{k}.type", "must be text or image_url")
        out.append(part)
    return out


def _check_tool_calls(calls: Any, field: str) -> None:
    if not isinstance(calls, list):
        raise InvalidRequest(field, "must be a list of tool calls")
    for k, call in enumerate(calls):
        where = f"{field}.{k}"
        if not isinstance(call, dict) or not isinstance(call.get("id"), str):
            raise InvalidRequest(f"{where}.id", "must be a string")
        if call.get("type") != "function":
            raise InvalidRequest(f"{where}.type", "must be function")
        fn = call.get("function")
        for key in ("name", "arguments"):
            if not isinstance(fn, dict) or not isinstance(fn.get(key), str):
                raise InvalidRequest(f"{where}.function.{key}", "must be a string")


def normalize_message(m: Any, i: int) -> dict[str, Any]:
    """One message as the worker's types take it, or InvalidRequest naming the field."""
    where = f"messages.{i}"
    if not isinstance(m, dict):
        raise InvalidRequest(where, "must be an object with a role and content")
    asked = m.get("role")
    role = "system" if asked == "developer" else asked
    if role not in ("system", "user", "assistant", "tool"):
        raise InvalidRequest(f"{where}.role", "must be system, developer, user, assistant or tool")
    out = {**m, "role": role}
    content = m.get("content")
    if role == "assistant":
        calls = m.get("tool_calls")
        if calls is not None:
            _check_tool_calls(calls, f"{where}.tool_calls")
        if content is None:
            if not calls:
                raise InvalidRequest(
                    f"{where}.content", "an assistant message needs content or tool_calls"
                )
            out.pop("content", None)  # the worker takes an absent content, not a null one
        else:
            out["content"] = _text_of(content, f"{where}.content", ("text", "refusal"))
        return out
    if content is None:
        raise InvalidRequest(f"{where}.content", f"a {asked} message needs content, not null")
    if role == "user":
        if isinstance(content, list):
            out["content"] = _user_parts(content, f"{where}.content")
        elif not isinstance(content, str):
            raise InvalidRequest(f"{where}.content", "must be a string or a list of parts")
        return out
    out["content"] = _text_of(content, f"{where}.content")
    if role == "tool":
        call_id = m.get("tool_call_id")
        if not isinstance(call_id, str) or not call_id:
            raise InvalidRequest(
                f"{where}.tool_call_id",
                "a tool message needs the tool_call_id of the assistant's call it answers",
            )
    return out


def prepare_request(body: dict[str, Any]) -> dict[str, Any]:
    """The request as the worker takes it (a new dict), or InvalidRequest naming the
    first field it would refuse or fail on."""
    check_params(body)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise InvalidRequest("messages", "must be a non-empty list of messages")
    out = dict(body)
    out["messages"] = [normalize_message(m, i) for i, m in enumerate(messages)]
    if "max_completion_tokens" in out:  # OpenAI's newer name; the worker knows max_tokens
        newer = out.pop("max_completion_tokens")
        if out.get("max_tokens") not in (None, newer):
            raise InvalidRequest(
                "max_completion_tokens", "give max_tokens or max_completion_tokens, not both"
            )
        out["max_tokens"] = newer
    if out.get("response_format") is not None:
        out["response_format"] = _response_format(out["response_format"])
    return out


# ---- the context budget --------------------------------------------------------------


@dataclass(frozen=True)
class PromptText:
    """What the worker's tokenizer is asked to count for a request, and its size."""

    text: str = ""
    n_bytes: int = 0
    n_messages: int = 0
    image_tokens: int = 0  # what the request's images take in a vision tier's context

    @property
    def template_tokens(self) -> int:
        """The most tokens the chat template adds around the messages, images included."""
        return (
            TEMPLATE_FIXED_TOKENS
            + TEMPLATE_TOKENS_PER_MESSAGE * self.n_messages
            + self.image_tokens
        )


def prompt_text(body: dict[str, Any]) -> PromptText:
    """The text of a prepared request's prompt: each message as "role\\ncontent\\n" (text
    parts only: image tokens are not counted), tool calls and tool definitions as JSON."""
    pieces = []
    for m in body.get("messages", []):
        content = m.get("content")
        if isinstance(content, list):
            content = "\n".join(p.get("text", "") for p in content if p.get("type") == "text")
        pieces.append(f"{m.get('role')}\n{content or ''}\n")
        if m.get("tool_calls"):
            pieces.append(json.dumps(m["tool_calls"]))
    for key in ("tools", "functions"):
        if body.get(key):
            pieces.append(json.dumps(body[key]))
    text = "".join(pieces)
    try:
        n_bytes = len(text.encode("utf-8"))
    except UnicodeEncodeError as exc:  # a lone surrogate: the worker could not encode it
        raise InvalidRequest("messages", "the text is not valid Unicode") from exc
    return PromptText(text, n_bytes, len(body.get("messages", [])))


@dataclass(frozen=True)
class Fit:
    """What a request may generate in the context that answers it."""

    max_tokens: int  # what the worker is sent
    clamped_to: int | None  # max_tokens when Edison lowered the request's (or set it)
    prompt_tokens: int | None  # counted by the worker's tokenizer; None: not needed


def room(prompt_tokens: int, template_tokens: int, n_ctx: int) -> int:
    """The tokens an answer may take: what the context leaves after the prompt, the
    template's markers and the UTF-8 slack."""
    return n_ctx - prompt_tokens - template_tokens - UTF8_SLACK_TOKENS


def fit(
    prompt_tokens: int,
    template_tokens: int,
    requested: int | None,
    n_ctx: int,
    *,
    tier: str,
    lower_bound: bool = False,
) -> Fit:
    """Clamp ``requested`` (None: as many as fit) to :func:`room`. No room for one token
    is ContextLengthExceeded with the numbers."""
    left = room(prompt_tokens, template_tokens, n_ctx)
    if left < 1:
        least = "at least " if lower_bound else ""
        raise ContextLengthExceeded(
            f"The prompt takes {least}{prompt_tokens} tokens, and up to {template_tokens} more "
            f"with the chat template; the {tier} tier's context holds {n_ctx} tokens, which "
            "leaves no room for an answer. Shorten the messages.",
            tier=tier,
            n_ctx=n_ctx,
            prompt_tokens=prompt_tokens,
            template_tokens=template_tokens,
            **({"prompt_tokens_is_lower_bound": True} if lower_bound else {}),
        )
    if requested is not None and requested <= left:
        return Fit(requested, None, prompt_tokens)
    return Fit(left, left, prompt_tokens)


def fit_from_length(
    prompt: PromptText, requested: int | None, n_ctx: int, *, tier: str
) -> Fit | None:
    """Decide from the text's length alone when it can, without the tokenizer.

    More bytes than ``MAX_BYTES_PER_TOKEN`` per token of the context: refused, whatever
    the tokenizer would say. Few enough that even a token per byte leaves room for the
    requested ``max_tokens``: it fits as asked. Otherwise None: the tokenizer counts
    (always when no ``max_tokens`` is given: the room is then the answer's limit).
    """
    fewest = math.ceil(prompt.n_bytes / MAX_BYTES_PER_TOKEN)
    fit(fewest, prompt.template_tokens, requested, n_ctx, tier=tier, lower_bound=True)
    most = prompt.n_bytes + TOKENIZER_EXTRA_TOKENS
    if requested is not None and requested <= room(most, prompt.template_tokens, n_ctx):
        return Fit(requested, None, None)
    return None
