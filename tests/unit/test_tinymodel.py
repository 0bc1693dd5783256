"""Tests for the locally built tiny Llama (ftops_tinymodel).

The model is built once per session (~25 s on 2 CPU cores); everything else
reuses that directory.
"""

from __future__ import annotations

import json
import os
import time
from importlib import resources
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

import ftops_tinymodel as tm
from ftops_tinymodel import builder as build_mod
from ftops_tinymodel.__main__ import main as cli_main
from ftops_tinymodel.model import TrainConfig, llama_config, pretrain
from ftops_tinymodel.tokenizer import train_tokenizer

# Measured 1.0 for seeds 0-2; leave a margin for other torch builds/CPUs.
MIN_RETENTION = 0.9


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tm.build(tmp_path_factory.mktemp("tiny") / "model", seed=0)


# --- corpus -----------------------------------------------------------------


def test_corpus_shape_and_splits() -> None:
    train = tm.train_texts()
    retention = tm.retention_set()
    new = tm.new_facts()
    assert 200 <= len(train) <= 1000
    assert len(retention) >= 50
    assert len(new) >= 30
    train_set = set(train)
    for p in retention:
        assert set(p) == {"prompt", "completion"}
        assert p["prompt"] + p["completion"] in train_set  # drawn from pretraining
    train_prompts = {t.rsplit(" ", 1)[0] for t in train}
    for p in new:
        assert p["prompt"] + p["completion"] not in train_set
        assert not any(t.startswith(p["prompt"] + " ") for t in train)  # entity unseen
        assert p["prompt"] not in train_prompts
    corpus_dir = resources.files("ftops_tinymodel").joinpath("corpus")
    total = sum(
        len(corpus_dir.joinpath(n).read_bytes())
        for n in ("train.txt", "retention.jsonl", "new_facts.jsonl")
    )
    assert total < 200_000


def test_corpus_generator_is_reproducible(tmp_path: Path) -> None:
    from ftops_tinymodel import make_corpus

    make_corpus.write(tmp_path)
    corpus_dir = resources.files("ftops_tinymodel").joinpath("corpus")
    for name in ("train.txt", "retention.jsonl", "new_facts.jsonl"):
        assert (tmp_path / name).read_text() == corpus_dir.joinpath(name).read_text(), name


# --- cheap determinism (no full build) ---------------------------------------


def test_tokenizer_training_is_deterministic() -> None:
    texts = tm.train_texts()
    assert train_tokenizer(texts).to_str() == train_tokenizer(texts).to_str()


def test_cache_key_and_config_hash_are_stable() -> None:
    assert tm.cache_key(0) == tm.cache_key(0)
    assert tm.cache_key(0) != tm.cache_key(1)
    assert build_mod.config_hash() == build_mod.config_hash(TrainConfig())
    assert build_mod.config_hash() != build_mod.config_hash(TrainConfig(steps=1))


def test_short_pretrain_is_deterministic() -> None:
    cfg = TrainConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, steps=3, batch_size=8
    )
    seqs = [[1, 5, 6, 7, 2], [1, 8, 9, 2], [1, 10, 11, 12, 13, 2]] * 4

    def run() -> dict[str, torch.Tensor]:
        torch.manual_seed(0)
        model = LlamaForCausalLM(llama_config(cfg, 32, 1, 2, 0))
        pretrain(model, seqs, cfg, seed=0, pad=0)
        return model.state_dict()

    a, b = run(), run()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_default_dir_honours_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("FTOPS_TINYMODEL_DIR", str(tmp_path / "x"))
    assert tm.default_dir() == tmp_path / "x"
    monkeypatch.delenv("FTOPS_TINYMODEL_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert tm.default_dir(3) == tmp_path / "ftops" / f"tinymodel-{tm.cache_key(3)}"


# --- publish / concurrency logic (fake dirs, no training) --------------------


def _fake_build(path: Path, key: str) -> Path:
    path.mkdir(parents=True)
    (path / tm.METADATA_FILE).write_text(json.dumps({"cache_key": key}))
    return path


def test_publish_keeps_concurrent_winner(tmp_path: Path) -> None:
    target = _fake_build(tmp_path / "model", "winner")
    loser = _fake_build(tmp_path / ".tmp-loser", "loser")
    assert build_mod._publish(loser, target, replace=False) == target
    assert tm.read_metadata(target) == {"cache_key": "winner"}
    assert not loser.exists()


def test_publish_replaces_when_asked(tmp_path: Path) -> None:
    target = _fake_build(tmp_path / "model", "old")
    new = _fake_build(tmp_path / ".tmp-new", "new")
    build_mod._publish(new, target, replace=True)
    assert tm.read_metadata(target) == {"cache_key": "new"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # trash removed


def test_build_refuses_foreign_nonempty_dir(tmp_path: Path) -> None:
    (tmp_path / "keep.txt").write_text("not a model")
    with pytest.raises(FileExistsError):
        tm.build(tmp_path)


# --- the real build ------------------------------------------------------------


def test_build_layout_and_metadata(model_dir: Path) -> None:
    names = {p.name for p in model_dir.iterdir()}
    assert {
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        tm.METADATA_FILE,
    } <= names
    assert not any(n.endswith((".bin", ".pt", ".pth", ".pkl")) for n in names)  # no pickle
    meta = tm.read_metadata(model_dir)
    assert meta is not None
    assert meta["cache_key"] == tm.cache_key(0)
    assert meta["seed"] == 0
    assert meta["retention_exact_match"] >= MIN_RETENTION
    assert meta["retention_mean_loss"] < 0.5
    assert meta["build_seconds"] > 0  # no upper bound: shared CI CPUs make timing flaky
    assert not list(model_dir.parent.glob(".*tmp-*"))  # temp dir cleaned up


def test_hf_load_and_retention(model_dir: Path) -> None:
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    assert model.config.model_type == "llama"
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<s>", "</s>", "<pad>")
    text = "The capital of Varnia is Oslen. Ünïcode ok?"
    ids = tok(text)["input_ids"]
    assert ids[0] == tok.bos_token_id
    assert tok.decode(ids, skip_special_tokens=True) == text
    chat = tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert isinstance(chat, str)
    assert chat.endswith("assistant:")
    assert tm.exact_match(model, tok, tm.retention_set()) >= MIN_RETENTION
    # New facts are genuinely unknown before any adapter teaches them.
    assert tm.exact_match(model, tok, tm.new_facts()) < 0.2


def test_cache_hit_does_not_rebuild(model_dir: Path) -> None:
    meta_file = model_dir / tm.METADATA_FILE
    before = meta_file.stat().st_mtime_ns
    t0 = time.monotonic()
    assert tm.build(model_dir, seed=0) == model_dir
    assert time.monotonic() - t0 < 5
    assert meta_file.stat().st_mtime_ns == before


def test_cli_eval(model_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["eval", str(model_dir)]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["retention_exact_match"] >= MIN_RETENTION


def test_evaluate_with_noop_adapter(model_dir: Path, tmp_path: Path) -> None:
    from peft import LoraConfig, get_peft_model

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    # LoRA B is zero-initialised, so an untrained adapter must not change outputs.
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    peft_model.save_pretrained(str(tmp_path / "adapter"))
    assert tm.evaluate_retention(model_dir, tmp_path / "adapter") >= MIN_RETENTION


@pytest.mark.skipif(
    not os.environ.get("FTOPS_SLOW_TESTS"), reason="second full build; set FTOPS_SLOW_TESTS=1"
)
def test_full_build_is_bit_identical(model_dir: Path, tmp_path: Path) -> None:
    again = tm.build(tmp_path / "again", seed=0)
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert (again / name).read_bytes() == (model_dir / name).read_bytes(), name
