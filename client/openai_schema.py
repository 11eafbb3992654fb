"""The OpenAI-compatible wire format of `seqr host`: request schemas, error bodies, response and
stream-chunk builders, and stop-string handling. Pure: no model, no network.

Requests are validated with pydantic; fields the host cannot honour are refused with a 400
naming them (never silently ignored), unknown extra fields that do not change the answer
(``user``, ``metadata``…) are accepted, as OpenAI clients send them.
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictStr, ValidationError, field_validator

MAX_STOPS, MAX_STOP_CHARS = 4, 64
MAX_MESSAGES = 512

# Fields of the OpenAI API that change the answer and that this host does not implement, with
# the values that mean "off" (those are accepted).
UNSUPPORTED: dict[str, tuple] = {
    "tools": (None, []), "tool_choice": (None, "none"), "functions": (None, []), "function_call": (None, "none"),
    "logprobs": (None, False, 0), "top_logprobs": (None, 0), "logit_bias": (None, {}), "echo": (None, False),
    "best_of": (None, 1), "suffix": (None, ""), "presence_penalty": (None, 0, 0.0),
    "frequency_penalty": (None, 0, 0.0), "audio": (None,), "modalities": (None, ["text"]),
    "prediction": (None,), "n": (None, 1), "response_format": (None, {"type": "text"}),
}


HINTS = {"prompt": "a string, or a list holding one string (batched prompts are not supported)"}


class ApiError(Exception):
    """An OpenAI-style error: HTTP status + ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class _Request(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: StrictStr = Field(min_length=1, max_length=256)
    max_tokens: int | None = Field(None, ge=1, strict=True)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stream: StrictBool = False
    stop: StrictStr | list[StrictStr] | None = None
    seed: int | None = Field(None, ge=0, lt=2 ** 63, strict=True)
    stream_options: dict[str, Any] | None = None

    @field_validator("stop")
    @classmethod
    def _stops(cls, v):
        stops = [v] if isinstance(v, str) else list(v or [])
        if len(stops) > MAX_STOPS or any(not s or len(s) > MAX_STOP_CHARS for s in stops):
            raise ValueError(f"up to {MAX_STOPS} non-empty stop strings of at most {MAX_STOP_CHARS} characters")
        return stops

    def stops(self) -> list[str]:
        return list(self.stop or [])

    def include_usage(self) -> bool:
        return bool((self.stream_options or {}).get("include_usage"))


class _TextPart(BaseModel):
    type: Literal["text"]
    text: StrictStr


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")     # e.g. "name"

    role: Literal["system", "developer", "user", "assistant"]
    content: StrictStr | list[_TextPart]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatRequest(_Request):
    messages: Annotated[list[Message], Field(min_length=1, max_length=MAX_MESSAGES)]
    max_completion_tokens: int | None = Field(None, ge=1, strict=True)

    def limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def chat(self) -> list[dict[str, str]]:
        # "developer" is the newer name of "system"; chat templates know only "system".
        return [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                for m in self.messages]


class CompletionRequest(_Request):
    prompt: StrictStr | Annotated[list[StrictStr], Field(min_length=1, max_length=1)]

    def limit(self) -> int | None:
        return self.max_tokens

    def text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]


def _param(loc: tuple) -> str:
    """pydantic's error location as an OpenAI ``param`` ("messages[0].content"), without the
    union-member tags pydantic puts in it."""
    fields = {f for cls in (ChatRequest, CompletionRequest, Message, _TextPart) for f in cls.model_fields}
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in fields:
            out += ("." if out else "") + part
    return out


def parse(cls: type[_Request], doc: Any) -> _Request:
    """A validated request, or ApiError(400) naming the first offending field."""
    if not isinstance(doc, dict):
        raise ApiError(400, "the request body must be a JSON object", code="invalid_body")
    for name, off in UNSUPPORTED.items():
        if name in doc and doc[name] not in off:
            raise ApiError(400, f"{name!r} is not supported by this host", param=name, code="unsupported_parameter")
    try:
        return cls.model_validate(doc)
    except ValidationError as e:
        # The deepest location is the most specific (a union reports each branch's failure).
        err = max(e.errors(include_url=False), key=lambda x: len(x["loc"]))
        param = _param(err["loc"]) or None
        msg = HINTS.get(param or "", err["msg"])
        raise ApiError(400, f"{param}: {msg}" if param else msg, param=param,
                       code="invalid_value" if err["type"] != "missing" else "missing_required_parameter") from None


# ---------------------------------------------------------------------------- responses
def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def chat_response(*, rid: str, model: str, text: str, finish: str, prompt_tokens: int, completion_tokens: int,
                  seqr: dict) -> dict:
    return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                         "finish_reason": finish}],
            "usage": usage(prompt_tokens, completion_tokens), "seqr": seqr}


def completion_response(*, rid: str, model: str, text: str, finish: str, prompt_tokens: int,
                        completion_tokens: int, seqr: dict) -> dict:
    return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}],
            "usage": usage(prompt_tokens, completion_tokens), "seqr": seqr}


def _chunk(obj: str, *, rid: str, model: str, created: int, choice: dict, seqr: dict | None,
           usage_: dict | None) -> dict:
    """One streamed chunk; the last one of a stream carries only the usage (no choices)."""
    doc = {"id": rid, "object": obj, "created": created, "model": model, "choices": [choice]}
    if seqr is not None:
        doc["seqr"] = seqr
    if usage_ is not None:
        doc["choices"], doc["usage"] = [], usage_
    return doc


def chat_chunk(*, rid: str, model: str, created: int, delta: dict, finish: str | None,
               seqr: dict | None = None, usage_: dict | None = None) -> dict:
    return _chunk("chat.completion.chunk", rid=rid, model=model, created=created, seqr=seqr, usage_=usage_,
                  choice={"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish})


def completion_chunk(*, rid: str, model: str, created: int, text: str, finish: str | None,
                     seqr: dict | None = None, usage_: dict | None = None) -> dict:
    return _chunk("text_completion", rid=rid, model=model, created=created, seqr=seqr, usage_=usage_,
                  choice={"index": 0, "text": text, "logprobs": None, "finish_reason": finish})


# ---------------------------------------------------------------------------- stop strings
class StopFilter:
    """Streams text through, cutting it before the first stop string.

    ``feed(piece)`` returns the text that is safe to emit now: it holds back the last
    ``max(len(stop)) - 1`` characters, which might be the start of a stop string split across
    pieces. ``stopped`` turns True once a stop string was seen (nothing after it is emitted).
    ``flush()`` returns what was held back when generation ends without a stop."""

    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self._keep = max((len(s) for s in self.stops), default=1) - 1
        self._pending = ""
        self.stopped = False

    def feed(self, piece: str) -> str:
        if self.stopped:
            return ""
        buf = self._pending + piece
        hits = [i for i in (buf.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.stopped, self._pending = True, ""
            return buf[:min(hits)]
        cut = max(len(buf) - self._keep, 0)
        self._pending = buf[cut:]
        return buf[:cut]

    def flush(self) -> str:
        out, self._pending = ("" if self.stopped else self._pending), ""
        return out
