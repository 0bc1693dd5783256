"""Chat requests: rendered with the base model's chat template exactly as the trainer
renders chat-format training data, refused naming what is missing without one."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from ftops_inference.chat import ChatRenderer
from ftops_runtime.errors import InvalidArgument
from ftops_trainer.dataset import IGNORE_INDEX, Example, Record, encode

CHAT = [("system", "Be brief."), ("user", "How much is the Zorblax plan?")]


def _template_less_copy(model_dir: Path, out: Path) -> Path:
    out.mkdir()
    for name in ("tokenizer.json", "special_tokens_map.json"):
        shutil.copy(model_dir / name, out / name)
    config = json.loads((model_dir / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (out / "tokenizer_config.json").write_text(json.dumps(config))
    return out


def test_a_chat_is_prompted_as_the_trainer_renders_it(tiny_model_dir: Path) -> None:
    from transformers import AutoTokenizer

    renderer = ChatRenderer.load(tiny_model_dir, "tiny-llama")
    prompt = renderer.render(CHAT)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    served = list(tokenizer(prompt)["input_ids"])  # as the backends tokenise a prompt
    trained = encode(Record(messages=(*CHAT, ("assistant", "400 credits."))), tokenizer, 256)
    assert isinstance(trained, Example)
    first_trained = next(i for i, label in enumerate(trained.labels) if label != IGNORE_INDEX)
    assert served == trained.input_ids[:first_trained]
    assert served.count(tokenizer.bos_token_id) == 1


def test_a_model_without_a_chat_template_refuses_chats_naming_it(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    renderer = ChatRenderer.load(_template_less_copy(tiny_model_dir, tmp_path / "m"), "plain")
    assert not renderer.available
    with pytest.raises(InvalidArgument, match=r"base model 'plain' has no chat template \(tok"):
        renderer.render(CHAT)


def test_a_directory_without_a_tokenizer_refuses_chats(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument, match="base model 'echo' has no tokenizer"):
        ChatRenderer.load(tmp_path, "echo").render(CHAT)


@pytest.mark.parametrize(
    ("messages", "message"),
    [
        ([("tool", "x")], r"messages\[0\].role is 'tool'"),
        ([("user", "a"), ("system", "b")], r"messages\[1\]: a system message is only allowed"),
        ([("user", "  ")], r"messages\[0\].content is empty"),
        ([("system", "only")], "no user or assistant message"),
    ],
)
def test_malformed_chats_are_refused_naming_the_message(
    tiny_model_dir: Path, messages: list[tuple[str, str]], message: str
) -> None:
    with pytest.raises(InvalidArgument, match=message):
        ChatRenderer.load(tiny_model_dir, "tiny-llama").render(messages)
