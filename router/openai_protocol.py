"""The OpenAI API's shapes: request bodies (pydantic), their mapping onto `SamplingParams`, and
the responses built from the router's chunks. No web framework here (see `openai_api.py`).

Unknown fields are ignored, as OpenAI-compatible servers do; fields that would change the
answer but are not supported (n > 1, echo, logit_bias, tools) get a 400 naming them rather than
being silently dropped. Structured output: `response_format` (`json_object`, `json_schema`) and
vLLM's `guided_json` / `guided_regex` / `guided_choice`.
"""

from __future__ import annotations

import math
import time
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field

from engine.sampling_params import SamplingParams
from engine.tokenizer import Tokenizer
from router.router import Chunk, RequestError

TokenId = Annotated[int, Field(ge=0)]


class APIError(Exception):
    """An error answered in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        type: str = "invalid_request_error",
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.body = {"error": {"message": message, "type": type, "param": param, "code": code}}
        self.headers = headers

    @classmethod
    def from_request_error(cls, e: RequestError) -> APIError:
        if e.code == "NOT_FOUND":
            return cls(404, e.message, param="model", code="model_not_found")
        if e.code == "UNAVAILABLE":
            return cls(503, e.message, type="server_error", code="service_unavailable")
        if e.code == "INVALID_ARGUMENT":
            return cls(400, e.message)
        if e.code == "RESOURCE_EXHAUSTED":
            retry_after = math.ceil(e.retry_after_s or 1)
            headers = {"Retry-After": str(retry_after)}
            return cls(429, e.message, code="rate_limit_exceeded", headers=headers)
        return cls(500, e.message, type="server_error")


def unsupported(param: str, what: str) -> APIError:
    return APIError(400, f"{what} is not supported yet", param=param, code="unsupported")


# -- requests ------------------------------------------------------------------------------


class StreamOptions(BaseModel):
    include_usage: bool = False


class _SamplingRequest(BaseModel):
    """Fields both endpoints share; `top_k` and below are vLLM-style extensions."""

    model_config = ConfigDict(extra="ignore")

    model: str = ""  # a tier name; "" or "auto": the default tier
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=-(2**63), lt=2**64)  # torch's seed range
    temperature: float | None = None  # None: 1.0, as OpenAI
    top_p: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    ignore_eos: bool = False
    stop_token_ids: list[TokenId] | None = None
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    # Structured output: OpenAI's response_format, and vLLM's extensions.
    response_format: dict[str, Any] | None = None
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None

    def check_supported(self) -> None:
        if self.n != 1:
            raise APIError(400, f"n must be 1 (got {self.n}): send separate requests", param="n")
        if self.logit_bias:
            raise unsupported("logit_bias", "logit_bias")

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    def sampling_params(self, logprobs: int | None) -> SamplingParams:
        """Raises APIError (400) with SamplingParams' message for out-of-range values."""
        given = {
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k,
            "min_p": self.min_p,
            "repetition_penalty": self.repetition_penalty,
            "presence_penalty": self.presence_penalty,
            "frequency_penalty": self.frequency_penalty,
            "seed": self.seed,
        }
        structured = self._structured()
        try:
            return SamplingParams(
                **{name: value for name, value in given.items() if value is not None},
                **structured,
                stop=[self.stop] if isinstance(self.stop, str) else list(self.stop or []),
                stop_token_ids=list(self.stop_token_ids or []),
                ignore_eos=self.ignore_eos,
                include_stop_str_in_output=self.include_stop_str_in_output,
                skip_special_tokens=self.skip_special_tokens,
                logprobs=logprobs,
            )
        except ValueError as e:
            raise APIError(400, str(e)) from None

    def _structured(self) -> dict:
        """The SamplingParams fields of the one structured output constraint asked for."""
        kind = (self.response_format or {}).get("type", "text")
        extensions = {
            "guided_json": ("json_schema", self.guided_json),
            "guided_regex": ("regex", self.guided_regex),
            "guided_choice": ("choice", self.guided_choice),
        }
        asked = [name for name, (_, value) in extensions.items() if value is not None]
        if kind != "text":
            asked.append("response_format")
        if len(asked) > 1:
            raise APIError(400, f"give at most one structured output constraint, got {asked}")
        if kind == "json_object":
            return {"json_schema": {"type": "object"}}
        if kind == "json_schema":
            spec = self.response_format.get("json_schema")
            if not isinstance(spec, dict) or not isinstance(spec.get("schema"), dict):
                raise APIError(
                    400,
                    "response_format json_schema needs json_schema.schema, an object",
                    param="response_format",
                )
            return {"json_schema": spec["schema"]}
        if kind != "text":
            raise APIError(
                400,
                f"response_format type must be text, json_object or json_schema, not {kind!r}",
                param="response_format",
            )
        return {key: value for key, value in extensions.values() if value is not None}


class CompletionRequest(_SamplingRequest):
    prompt: str | list[TokenId] | list[str] | list[list[TokenId]]
    max_tokens: int | None = None  # None: the tier's default_max_tokens
    logprobs: int | None = None
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None

    def check_supported(self) -> None:
        super().check_supported()
        if self.echo:
            raise unsupported("echo", "echo")
        if self.best_of not in (None, 1):
            raise unsupported("best_of", "best_of > 1")
        if self.suffix:
            raise unsupported("suffix", "suffix")

    def prompt_input(self) -> tuple[str, list[int]]:
        """(text, token ids): one of the two is empty, as `Router.validate` takes them."""
        prompt = self.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
            if len(prompt) != 1:
                raise APIError(
                    400,
                    f"one prompt per request (got {len(prompt)}): send separate requests",
                    param="prompt",
                )
            prompt = prompt[0]
        return (prompt, []) if isinstance(prompt, str) else ("", list(prompt))


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")  # name, tool_calls, ...: the template may use them

    role: str
    content: str | list[dict[str, Any]] | None = None

    def for_template(self) -> dict:
        message = self.model_dump(exclude_none=True)
        if isinstance(self.content, list):
            texts = []
            for part in self.content:
                if part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise unsupported("messages", f"content of type {part.get('type')!r}")
                texts.append(part["text"])
            message["content"] = "\n".join(texts)
        return message


class ChatCompletionRequest(_SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None
    max_tokens: int | None = None  # the older name; max_completion_tokens wins
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: list[dict[str, Any]] | None = None
    chat_template_kwargs: dict[str, Any] | None = None  # extra template variables (vLLM's)

    def check_supported(self) -> None:
        super().check_supported()
        if self.tools:
            raise unsupported("tools", "tools")
        if self.top_logprobs is not None and not self.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")

    @property
    def max_output_tokens(self) -> int | None:
        return (
            self.max_completion_tokens
            if self.max_completion_tokens is not None
            else (self.max_tokens)
        )

    @property
    def num_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


# -- responses -----------------------------------------------------------------------------


def usage(usage: dict) -> dict:
    return {
        "prompt_tokens": usage["prompt_tokens"],
        "completion_tokens": usage["completion_tokens"],
        "total_tokens": usage["prompt_tokens"] + usage["completion_tokens"],
        "prompt_tokens_details": {"cached_tokens": usage.get("cached_prompt_tokens", 0)},
    }


class _Formatter:
    """One request's responses, built chunk by chunk (streaming) or from all chunks."""

    object_name = ""
    chunk_object_name = ""

    def __init__(self, request_id: str, model: str, tokenizer: Tokenizer | None, logprobs: bool):
        self.id = request_id
        self.model = model
        self.tokenizer = tokenizer
        self.logprobs = logprobs
        self.created = int(time.time())

    def _envelope(self, object_name: str, choices: list, **extra) -> dict:
        return {
            "id": self.id,
            "object": object_name,
            "created": self.created,
            "model": self.model,
            "choices": choices,
            **extra,
        }

    def usage_event(self, final: Chunk) -> dict:
        """The extra last event of a stream with `include_usage`."""
        return self._envelope(self.chunk_object_name, [], usage=usage(final.usage))

    def token_text(self, token_id: int) -> str:
        if self.tokenizer is None:
            return f"token_id:{token_id}"
        return self.tokenizer.decode([token_id], skip_special_tokens=False)


class CompletionFormatter(_Formatter):
    object_name = chunk_object_name = "text_completion"

    def __init__(self, *args):
        super().__init__(*args)
        self._text_offset = 0

    def _logprobs(self, token_ids: list[int], entries: list | None) -> dict | None:
        if not self.logprobs:
            return None
        out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for token_id, entry in zip(token_ids, entries or []):
            if entry is None:
                continue
            chosen, top = entry
            token = self.token_text(token_id)
            out["tokens"].append(token)
            out["token_logprobs"].append(_finite(chosen))
            # NOTE: tokens that decode alike (e.g. partial UTF-8 -> U+FFFD) share a key; keep
            # the likelier one (`top` is sorted), not the last.
            top_by_text: dict[str, float] = {}
            for t, lp in top:
                top_by_text.setdefault(self.token_text(t), _finite(lp))
            out["top_logprobs"].append(top_by_text)
            out["text_offset"].append(self._text_offset)
            self._text_offset += len(token)
        return out

    def _choice(self, text: str, token_ids, entries, finish_reason, stop_reason) -> dict:
        return {
            "index": 0,
            "text": text,
            "logprobs": self._logprobs(token_ids, entries),
            "finish_reason": finish_reason,
            # vLLM's extension: the stop string or token id that ended it.
            "stop_reason": stop_reason if finish_reason else None,
        }

    def stream_events(self, chunk: Chunk, include_usage: bool) -> list[dict]:
        if not (chunk.text or chunk.finish_reason or (self.logprobs and chunk.token_ids)):
            return []
        choice = self._choice(
            chunk.text, chunk.token_ids, chunk.logprobs, chunk.finish_reason, chunk.stop_reason
        )
        extra = {"usage": None} if include_usage else {}
        return [self._envelope(self.chunk_object_name, [choice], **extra)]

    def response(self, chunks: list[Chunk]) -> dict:
        final = chunks[-1]
        token_ids = [t for c in chunks for t in c.token_ids]
        entries = [e for c in chunks for e in (c.logprobs or [None] * len(c.token_ids))]
        text = "".join(c.text for c in chunks)
        choice = self._choice(text, token_ids, entries, final.finish_reason, final.stop_reason)
        return self._envelope(self.object_name, [choice], usage=usage(final.usage))


class ChatFormatter(_Formatter):
    object_name = "chat.completion"
    chunk_object_name = "chat.completion.chunk"

    def _logprobs(self, token_ids: list[int], entries: list | None) -> dict | None:
        if not self.logprobs:
            return None
        content = []
        for token_id, entry in zip(token_ids, entries or []):
            if entry is None:
                continue
            chosen, top = entry
            content.append(
                {**self._token(token_id, chosen), "top_logprobs": [self._token(*t) for t in top]}
            )
        return {"content": content, "refusal": None}

    def _token(self, token_id: int, logprob: float) -> dict:
        text = self.token_text(token_id)
        return {"token": text, "logprob": _finite(logprob), "bytes": list(text.encode())}

    def first_event(self, include_usage: bool) -> dict:
        """The stream's opening event: the assistant role, no content yet."""
        choice = {
            "index": 0,
            "delta": {"role": "assistant", "content": ""},
            "logprobs": None,
            "finish_reason": None,
        }
        extra = {"usage": None} if include_usage else {}
        return self._envelope(self.chunk_object_name, [choice], **extra)

    def stream_events(self, chunk: Chunk, include_usage: bool) -> list[dict]:
        if not (chunk.text or chunk.finish_reason or (self.logprobs and chunk.token_ids)):
            return []
        choice = {
            "index": 0,
            "delta": {"content": chunk.text} if chunk.text else {},
            "logprobs": self._logprobs(chunk.token_ids, chunk.logprobs),
            "finish_reason": chunk.finish_reason,
            "stop_reason": chunk.stop_reason if chunk.finish_reason else None,
        }
        extra = {"usage": None} if include_usage else {}
        return [self._envelope(self.chunk_object_name, [choice], **extra)]

    def response(self, chunks: list[Chunk]) -> dict:
        final = chunks[-1]
        token_ids = [t for c in chunks for t in c.token_ids]
        entries = [e for c in chunks for e in (c.logprobs or [None] * len(c.token_ids))]
        choice = {
            "index": 0,
            "message": {"role": "assistant", "content": "".join(c.text for c in chunks)},
            "logprobs": self._logprobs(token_ids, entries),
            "finish_reason": final.finish_reason,
            "stop_reason": final.stop_reason,
        }
        return self._envelope(self.object_name, [choice], usage=usage(final.usage))


def _finite(logprob: float) -> float:
    # JSON has no -Infinity; OpenAI uses -9999.0 for "very unlikely".
    return logprob if math.isfinite(logprob) else -9999.0
