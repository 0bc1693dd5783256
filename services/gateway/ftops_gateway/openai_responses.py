"""Response bodies and stream chunks in OpenAI's format.

``model`` echoes what the client asked for (an alias stays an alias, as with OpenAI's
own model aliases); the version that actually answered is ``system_fingerprint`` and
the ``x-ftops-version`` / ``x-ftops-arm`` headers."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ftops.common.v1 import common_pb2

BASE_FINGERPRINT = "base"


def finish_reason(reason: int) -> str | None:
    """OpenAI's finish reason: a stop sequence and end-of-sequence are both "stop"."""
    if reason == common_pb2.FINISH_REASON_LENGTH:
        return "length"
    if reason in (common_pb2.FINISH_REASON_STOP, common_pb2.FINISH_REASON_EOS):
        return "stop"
    return None


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


@dataclass
class Shape:
    """What one response looks like: completion or chat, and its identity."""

    chat: bool
    id: str
    model: str
    created: int
    version_id: str = ""

    @property
    def fingerprint(self) -> str:
        return self.version_id or BASE_FINGERPRINT

    def _envelope(self, object_name: str) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": object_name,
            "created": self.created,
            "model": self.model,
            "system_fingerprint": self.fingerprint,
        }

    def response(
        self, text: str, reason: int, prompt_tokens: int, completion_tokens: int
    ) -> dict[str, Any]:
        choice: dict[str, Any] = {"index": 0, "finish_reason": finish_reason(reason)}
        if self.chat:
            choice["message"] = {"role": "assistant", "content": text}
            choice["logprobs"] = None
        else:
            choice["text"] = text
            choice["logprobs"] = None
        body = self._envelope("chat.completion" if self.chat else "text_completion")
        body["choices"] = [choice]
        body["usage"] = usage(prompt_tokens, completion_tokens)
        return body

    def chunk(self, text: str | None, reason: int = 0, *, role: bool = False) -> dict[str, Any]:
        """One stream chunk; ``role`` marks the chat stream's opening chunk."""
        choice: dict[str, Any] = {"index": 0, "finish_reason": finish_reason(reason)}
        if self.chat:
            delta: dict[str, Any] = {}
            if role:
                delta["role"] = "assistant"
            if text is not None:
                delta["content"] = text
            choice["delta"] = delta
            choice["logprobs"] = None
        else:
            choice["text"] = text or ""
            choice["logprobs"] = None
        body = self._envelope("chat.completion.chunk" if self.chat else "text_completion")
        body["choices"] = [choice]
        return body

    def usage_chunk(self, prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
        """The last chunk of a stream with ``stream_options.include_usage``: no choices."""
        body = self._envelope("chat.completion.chunk" if self.chat else "text_completion")
        body["choices"] = []
        body["usage"] = usage(prompt_tokens, completion_tokens)
        return body
