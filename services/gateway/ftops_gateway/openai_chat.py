"""Chat messages rendered to the prompt the data plane takes.

The gateway has no tokenizer and no copy of the base model (its image carries no ML
stack), so it cannot apply the base model's own chat template. It renders the trainer's
default chat template instead (``ftops_trainer.dataset.DEFAULT_CHAT_TEMPLATE``), so an
adapter trained on ``messages`` data is prompted the way it was trained::

    <|system|>\\n{system}\\n<|user|>\\n{user}\\n<|assistant|>\\n{answer}\\n ... <|assistant|>\\n

Two differences from the trainer's rendering: BOS is added by the inference service's
tokenizer, and earlier assistant turns end with a newline rather than the model's EOS
token, whose text the gateway does not know.
"""

from __future__ import annotations

from collections.abc import Sequence

ROLE_MARK = "<|{role}|>\n"
# OpenAI's newer name for the system role: same meaning for a completion model.
ROLE_ALIASES = {"developer": "system"}


def render_chat(messages: Sequence[tuple[str, str]]) -> str:
    """The prompt for ``(role, content)`` turns, ending with the assistant's turn mark."""
    parts = []
    for role, content in messages:
        role = ROLE_ALIASES.get(role, role)
        parts.append(f"{ROLE_MARK.format(role=role)}{content}\n")
    parts.append(ROLE_MARK.format(role="assistant"))
    return "".join(parts)
