"""Chat messages as the data plane takes them.

The gateway has no tokenizer and no copy of the base model (its image carries no ML
stack), so it does not render chats: it passes the turns on (``GenerateRequest.messages``)
and the inference service renders them with the base model's own chat template, exactly
as the trainer renders chat-format training data. A base model without a chat template
refuses chats there with INVALID_ARGUMENT (a 400 on the OpenAI endpoint).
"""

from __future__ import annotations

from collections.abc import Sequence

from ftops.gateway.v1 import gateway_pb2
from ftops.inference.v1 import inference_pb2

# OpenAI's newer name for the system role: the same for every chat template.
ROLE_ALIASES = {"developer": "system"}


def chat_messages(messages: Sequence[tuple[str, str]]) -> list[gateway_pb2.ChatMessage]:
    """``(role, content)`` turns as the gateway's contract carries them."""
    return [
        gateway_pb2.ChatMessage(role=ROLE_ALIASES.get(role, role), content=content)
        for role, content in messages
    ]


def inference_chat_message(message: gateway_pb2.ChatMessage) -> inference_pb2.ChatMessage:
    """One turn passed on to an inference replica (roles checked there, by the template's
    rules, so that gRPC and OpenAI callers get the same answers)."""
    return inference_pb2.ChatMessage(
        role=ROLE_ALIASES.get(message.role, message.role), content=message.content
    )
