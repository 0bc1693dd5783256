"""Chat requests rendered to the prompt a backend generates from.

The trainer renders chat-format training data with the base model's own chat template
(``ftops_trainer.dataset``); a chat request is rendered the same way, with the template's
generation prompt, so an adapter is asked the way it was taught. The rendered text is
tokenised as a prompt is (``add_special_tokens``): a template that writes the BOS token
itself loses that leading BOS text here, so the tokenizer's own BOS is the only one, as in
training.

A base model without a chat template refuses chats: guessing a format the model never saw
would answer, just badly, and nobody would know why.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ftops_runtime.errors import InvalidArgument

log = logging.getLogger(__name__)

ROLES = ("system", "user", "assistant")
NO_TEMPLATE = "no chat template (tokenizer_config.json 'chat_template' or chat_template.jinja)"
NO_TOKENIZER = "no tokenizer (tokenizer.json, tokenizer_config.json)"
# A chat this long is no longer a chat turn: refused before the template runs over it.
MAX_MESSAGES = 1024


def check_messages(messages: Sequence[tuple[str, str]]) -> None:
    """The roles and contents every chat template expects, or INVALID_ARGUMENT naming the
    first offending message."""
    if len(messages) > MAX_MESSAGES:
        raise InvalidArgument(f"the chat has {len(messages)} messages; at most {MAX_MESSAGES}")
    for i, (role, content) in enumerate(messages):
        if role not in ROLES:
            raise InvalidArgument(
                f"messages[{i}].role is {role!r}: expected system, user or assistant"
            )
        if role == "system" and i > 0:
            raise InvalidArgument(f"messages[{i}]: a system message is only allowed first")
        if not content.strip():
            raise InvalidArgument(f"messages[{i}].content is empty")
    if all(role == "system" for role, _ in messages):
        raise InvalidArgument("the chat has no user or assistant message")


class ChatRenderer:
    """The base model's chat template, or the reason chats are refused."""

    def __init__(self, tokenizer: Any | None, base_model: str, missing: str = NO_TEMPLATE) -> None:
        self._tokenizer = tokenizer
        self._base_model = base_model
        self._missing = missing
        self._bos_text = ""
        if tokenizer is not None and tokenizer.bos_token_id is not None:
            ids = list(tokenizer("x")["input_ids"])
            if ids[:1] == [tokenizer.bos_token_id]:  # the tokenizer adds BOS on its own
                self._bos_text = str(tokenizer.bos_token or "")

    @classmethod
    def load(cls, model_dir: Path, base_model: str) -> ChatRenderer:
        """The model directory's tokenizer and its chat template (tokenizer_config.json's
        ``chat_template`` or chat_template.jinja); a renderer that refuses chats when
        there is none."""
        try:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(model_dir)
        except Exception as exc:  # no tokenizer files (echo backend), no ML stack
            log.info("no tokenizer in %s (%r): chat requests are refused", model_dir, exc)
            return cls(None, base_model, NO_TOKENIZER)
        if not getattr(tokenizer, "chat_template", None):
            return cls(None, base_model, NO_TEMPLATE)
        return cls(tokenizer, base_model)

    @property
    def available(self) -> bool:
        return self._tokenizer is not None

    def render(self, messages: Sequence[tuple[str, str]]) -> str:
        """The prompt for the chat, ending where the assistant's next turn starts."""
        check_messages(messages)
        if self._tokenizer is None:
            raise InvalidArgument(
                f"base model {self._base_model!r} has {self._missing}, so it cannot take chat "
                "messages: send a prompt instead"
            )
        try:
            text = self._tokenizer.apply_chat_template(
                [{"role": r, "content": c} for r, c in messages],
                tokenize=False,
                add_generation_prompt=True,
            )
        # Templates raise what they like (jinja's raise_exception on a role order they do
        # not support): the caller's chat is what they refuse.
        except Exception as exc:
            raise InvalidArgument(
                f"base model {self._base_model!r}'s chat template refused the messages: {exc}"
            ) from None
        if not isinstance(text, str):
            raise InvalidArgument(f"base model {self._base_model!r}'s chat template gave no text")
        if self._bos_text and text.startswith(self._bos_text):
            text = text[len(self._bos_text) :]
        return text
