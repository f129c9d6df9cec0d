"""The OpenAI request bodies the gateway takes, as pydantic models, and their translation into an InferRequest.

As vLLM's OpenAI server does, fields of the standard requests that the gateway does not know are accepted and
ignored; the extension object `recserve` (what the SDKs send with `extra_body={"recserve": {...}}`) is strict:
an unknown key in it is a 400. Imports pydantic and the generated messages only.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from recserve.v1 import tier_pb2 as pb

MAX_REQUEST_ID_CHARS = 128  # the tiers' limit (TierLimits.max_request_id_chars)
# "developer" is OpenAI's newer name for the system turn.
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
OFFLOAD_MODES = {
    "auto": pb.OFFLOAD_MODE_AUTO,
    "local_only": pb.OFFLOAD_MODE_LOCAL_ONLY,
    "last_tier": pb.OFFLOAD_MODE_LAST_TIER,
}
TASKS = {"generate": pb.TASK_KIND_GENERATE, "choice": pb.TASK_KIND_CHOICE}


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="ignore")


class RecServeOptions(BaseModel):
    """The `recserve` extension object: how the cascade serves the request."""

    model_config = ConfigDict(extra="forbid")

    task: Literal["generate", "choice"] = "generate"
    options: list[str] = Field(default_factory=list)  # CHOICE: the options, e.g. ["A", "B", "C", "D"]
    family: str = ""  # task family: each has its own confidence window
    reference: str = ""  # the correct answer, for the tiers' accuracy metrics
    offload: Literal["auto", "local_only", "last_tier"] = "auto"
    request_id: str | None = None  # default: one the gateway makes
    # Seconds the answer may take (a processing-time requirement, apart from the request's timeout); none: no
    # requirement. The placement picks the candidates that can meet it.
    requirement_seconds: float | None = Field(default=None, gt=0)
    service_class: str = ""  # e.g. "interactive" or "batch"

    @field_validator("request_id")
    @classmethod
    def _printable(cls, value: str | None) -> str | None:
        # It travels back in a response header: printable ASCII only.
        if value is not None and not (
            0 < len(value) <= MAX_REQUEST_ID_CHARS and value.isascii() and value.isprintable()
        ):
            raise ValueError(f"request_id must be 1-{MAX_REQUEST_ID_CHARS} printable ASCII characters")
        return value

    @model_validator(mode="after")
    def _options_for_choice(self) -> RecServeOptions:
        if self.options and self.task != "choice":
            raise ValueError("options are for task 'choice'")
        if self.task == "choice" and len(self.options) < 2:
            raise ValueError("task 'choice' needs at least two options")
        return self


class StreamOptions(_Lenient):
    include_usage: bool = False


class TextPart(_Lenient):
    type: str
    text: str = ""


class ChatMessageParam(_Lenient):
    role: str
    content: str | list[TextPart] | None = None

    @field_validator("role")
    @classmethod
    def _known_role(cls, role: str) -> str:
        if role not in ROLES:
            raise ValueError(f"role {role!r} is not supported: the tiers take system, user and assistant turns")
        return role

    @field_validator("content")
    @classmethod
    def _text_only(cls, content: str | list[TextPart] | None) -> str | list[TextPart] | None:
        if isinstance(content, list):
            for part in content:
                if part.type != "text":
                    raise ValueError(f"content parts of type {part.type!r} are not supported: text only")
        return content

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class _CompletionRequest(_Lenient):
    """What chat and text completions share."""

    model: str | None = None  # default: the served model
    temperature: float | None = Field(None, ge=0.0, le=2.0)  # default: 0, greedy (the tiers' confidence is greedy's)
    max_tokens: int | None = Field(None, ge=1)  # default: the tiers' default
    stop: str | list[str] | None = None
    n: int | None = 1
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    recserve: RecServeOptions = Field(default_factory=RecServeOptions)

    @field_validator("n")
    @classmethod
    def _one_choice(cls, n: int | None) -> int | None:
        if n not in (None, 1):
            raise ValueError("n must be 1: the cascade returns one answer per request")
        return n

    @model_validator(mode="after")
    def _stream_options_need_stream(self) -> _CompletionRequest:
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed when stream is true")
        return self

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    def _infer_request(self, request_id: str, max_tokens: int | None, logprobs: bool) -> pb.InferRequest:
        options = self.recserve
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or ())
        return pb.InferRequest(
            request_id=request_id,
            task=TASKS[options.task],
            options=options.options,
            family=options.family,
            reference=options.reference,
            offload=OFFLOAD_MODES[options.offload],
            sampling=pb.SamplingParams(
                max_tokens=max_tokens or 0, temperature=self.temperature or 0.0, stop=stop, logprobs=logprobs
            ),
            requirement_seconds=options.requirement_seconds,
            service_class=options.service_class,
        )


class ChatCompletionRequest(_CompletionRequest):
    messages: list[ChatMessageParam] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)  # OpenAI's newer name for max_tokens; wins over it
    logprobs: bool | None = False
    # Accepted, but only the generated token's own log-prob is reported: `top_logprobs` of each token stays empty.
    top_logprobs: int | None = Field(None, ge=0, le=20)

    def infer_request(self, request_id: str) -> pb.InferRequest:
        request = self._infer_request(request_id, self.max_completion_tokens or self.max_tokens, bool(self.logprobs))
        request.messages.extend(pb.ChatMessage(role=ROLES[m.role], content=m.text()) for m in self.messages)
        return request


class CompletionRequest(_CompletionRequest):
    prompt: str | list[Any]
    # The number asks for the sampled token's log-prob; alternatives beyond it are not reported (see responses).
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool | None = False
    suffix: str | None = None

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, prompt: str | list[Any]) -> str | list[Any]:
        if not isinstance(prompt, str):
            raise ValueError("prompt must be one string: lists of prompts (or of token ids) are not supported")
        return prompt

    @model_validator(mode="after")
    def _unsupported(self) -> CompletionRequest:
        if self.echo:
            raise ValueError("echo is not supported")
        if self.suffix:
            raise ValueError("suffix is not supported")
        return self

    def infer_request(self, request_id: str) -> pb.InferRequest:
        request = self._infer_request(request_id, self.max_tokens, self.logprobs is not None)
        request.prompt = str(self.prompt)
        return request
