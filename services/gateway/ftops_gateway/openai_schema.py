"""Request bodies of the OpenAI-compatible endpoint, validated and turned into the
gateway's own ``GenerateRequest``.

Parameters the data plane cannot honour are refused with a 400 naming the parameter
rather than silently ignored: a client asking for 3 choices or for log-probabilities
would otherwise get an answer that looks right and is not."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ftops.common.v1 import common_pb2
from ftops.gateway.v1 import gateway_pb2
from ftops_gateway.openai_chat import chat_messages
from ftops_gateway.openai_errors import OpenAIError, invalid

MAX_STOP_SEQUENCES = 4
# OpenAI's default when a request says nothing; the gRPC contract's 0 would mean greedy.
DEFAULT_TEMPERATURE = 1.0


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")

    include_usage: bool = False


class _Common(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str = Field(min_length=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, ge=0, le=1)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, lt=2**64)
    n: int | None = Field(None, ge=1)
    user: str | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    metadata: dict[str, str] | None = None

    def _refuse_unsupported(self) -> None:
        if self.n not in (None, 1):
            raise invalid("only n=1 is supported: send one request per choice", "n")
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name):
                raise invalid(f"{name} is not supported (only 0)", name)
        if self.logit_bias:
            raise invalid("logit_bias is not supported", "logit_bias")
        if self.stream_options is not None and not self.stream:
            raise invalid("stream_options is only allowed with stream: true", "stream_options")

    def _stops(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > MAX_STOP_SEQUENCES:
            raise invalid(f"at most {MAX_STOP_SEQUENCES} stop sequences are allowed", "stop")
        if any(not s for s in stops):
            raise invalid("stop sequences must not be empty", "stop")
        return stops

    def _limit(self) -> int | None:
        return self.max_tokens

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    def sampling(self) -> common_pb2.SamplingParams:
        params = common_pb2.SamplingParams(
            # 0 = the inference service's default.
            max_tokens=self._limit() or 0,
            temperature=DEFAULT_TEMPERATURE if self.temperature is None else self.temperature,
            top_p=self.top_p or 0.0,
            stop=self._stops(),
        )
        if self.seed is not None:
            params.seed = self.seed
        return params

    def prompt_text(self) -> str:
        """The raw prompt; empty for a chat (see ``chat``)."""
        raise NotImplementedError

    def chat(self) -> list[gateway_pb2.ChatMessage]:
        """The chat's turns, rendered by the inference service; empty for a completion."""
        return []

    def to_generate(self, *, request_id: str, tenant: str) -> gateway_pb2.GenerateRequest:
        self._refuse_unsupported()
        request = gateway_pb2.GenerateRequest(
            model=self.model,
            prompt=self.prompt_text(),
            messages=self.chat(),
            sampling=self.sampling(),
            request_id=request_id,
            tenant=tenant,
            # OpenAI's end-user id is the sticky-split and flag-rule user key.
            user=self.user or "",
            # OpenAI's request metadata is what flag rules match on.
            metadata=self.metadata or {},
        )
        return request


class CompletionRequest(_Common):
    prompt: str | list[str]
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None
    logprobs: int | None = None

    def _refuse_unsupported(self) -> None:
        super()._refuse_unsupported()
        if self.best_of not in (None, 1):
            raise invalid("only best_of=1 is supported", "best_of")
        if self.echo:
            raise invalid("echo is not supported", "echo")
        if self.suffix:
            raise invalid("suffix (insertion) is not supported", "suffix")
        if self.logprobs is not None:
            raise invalid("logprobs are not supported", "logprobs")

    def prompt_text(self) -> str:
        if isinstance(self.prompt, str):
            return self.prompt
        if len(self.prompt) != 1:
            raise invalid(
                f"exactly one prompt per request is supported, got {len(self.prompt)}", "prompt"
            )
        return self.prompt[0]


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[ContentPart] | None = None

    def text(self, index: int) -> str:
        param = f"messages[{index}].content"
        if self.role in ("tool", "function"):
            raise invalid(f"role {self.role!r} is not supported (no tool calling)", param)
        if self.content is None:
            raise invalid("content is required", param)
        if isinstance(self.content, str):
            return self.content
        texts = []
        for part in self.content:
            if part.type != "text" or part.text is None:
                raise invalid(f"only text content parts are supported, got {part.type!r}", param)
            texts.append(part.text)
        return "".join(texts)


class ChatCompletionRequest(_Common):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = None
    tools: list[Any] | None = None
    functions: list[Any] | None = None
    response_format: dict[str, Any] | None = None

    def _refuse_unsupported(self) -> None:
        super()._refuse_unsupported()
        if self.logprobs or self.top_logprobs:
            raise invalid("logprobs are not supported", "logprobs")
        if self.tools or self.functions:
            raise invalid("tool calling is not supported", "tools")
        if self.response_format and self.response_format.get("type", "text") != "text":
            raise invalid("only response_format type 'text' is supported", "response_format")

    def _limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def prompt_text(self) -> str:
        return ""

    def chat(self) -> list[gateway_pb2.ChatMessage]:
        return chat_messages([(m.role, m.text(i)) for i, m in enumerate(self.messages)])


def parse(model: type[_Common], body: Any) -> _Common:
    """The validated request, or a 400 naming the first offending parameter."""
    if not isinstance(body, dict):
        raise invalid("the request body must be a JSON object")
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        first = exc.errors()[0]
        param = ".".join(str(p) for p in first["loc"]) or None
        raise OpenAIError(
            400, f"{param}: {first['msg']}" if param else first["msg"], param=param
        ) from None
