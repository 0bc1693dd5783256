"""The GGUF converter on a GGUF written here from the tiny model (the gguf package's own
writer, laid out as llama.cpp lays out a Llama): the same weights and tokenizer come
back as a Hugging Face directory, tied embeddings tied, with the chat template and the
sha256 of every file; a truncated file and an unsupported architecture are refused with
the reason."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

gguf = pytest.importorskip("gguf", reason="the converter needs the ftops[smollm2] extra")

from ftops_models import GGUFError, check_model_dir, convert_gguf, read_metadata  # noqa: E402
from ftops_models.gguf_convert import file_sha256, verify  # noqa: E402

TEMPLATE = "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% endfor %}"


def _permute(weights: Any, heads: int) -> Any:
    """llama.cpp's rotary layout of q/k rows (transformers undoes it on load)."""
    return (
        weights.reshape(heads, 2, weights.shape[0] // heads // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


def _gguf_from_hf(model_dir: Path, out: Path, architecture: str = "llama") -> Path:
    """The HF model as llama.cpp's converter writes it (F32, GPT-2 style BPE tokenizer)."""
    from safetensors.numpy import load_file

    config = json.loads((model_dir / "config.json").read_text())
    tokenizer = json.loads((model_dir / "tokenizer.json").read_text())
    weights = load_file(str(model_dir / "model.safetensors"))
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    writer = gguf.GGUFWriter(str(out), architecture)
    writer.add_name("tiny-llama")
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_rope_freq_base(config["rope_parameters"]["rope_theta"])
    writer.add_vocab_size(config["vocab_size"])
    vocab = sorted(tokenizer["model"]["vocab"].items(), key=lambda kv: kv[1])
    special = {t["id"] for t in tokenizer["added_tokens"]}
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list([token for token, _ in vocab])
    writer.add_token_types([3 if i in special else 1 for _, i in vocab])
    merges = tokenizer["model"]["merges"]
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    writer.add_bos_token_id(config["bos_token_id"])
    writer.add_eos_token_id(config["eos_token_id"])
    writer.add_pad_token_id(config["pad_token_id"])
    writer.add_chat_template(TEMPLATE)
    names = {
        "self_attn.q_proj": "attn_q",
        "self_attn.k_proj": "attn_k",
        "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output",
        "mlp.gate_proj": "ffn_gate",
        "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down",
        "input_layernorm": "attn_norm",
        "post_attention_layernorm": "ffn_norm",
    }
    writer.add_tensor("token_embd.weight", weights["model.embed_tokens.weight"])
    writer.add_tensor("output_norm.weight", weights["model.norm.weight"])
    for layer in range(config["num_hidden_layers"]):
        for hf, short in names.items():
            tensor = weights[f"model.layers.{layer}.{hf}.weight"]
            if short == "attn_q":
                tensor = _permute(tensor, heads)
            elif short == "attn_k":
                tensor = _permute(tensor, kv_heads)
            writer.add_tensor(f"blk.{layer}.{short}.weight", np.ascontiguousarray(tensor))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


@pytest.fixture(scope="module")
def tiny_gguf(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _gguf_from_hf(tiny_model_dir, tmp_path_factory.mktemp("gguf") / "tiny.gguf")


def test_a_gguf_converts_to_the_same_model_with_recorded_sha256s(
    tiny_gguf: Path, tiny_model_dir: Path, tmp_path: Path
) -> None:
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = convert_gguf(tiny_gguf, tmp_path / "converted")
    assert check_model_dir(out) == out.resolve()
    original = load_file(str(tiny_model_dir / "model.safetensors"))
    converted = load_file(str(out / "model.safetensors"))
    assert set(converted) == set(original)
    for name, tensor in original.items():
        assert torch.equal(converted[name], tensor), name
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()

    text = "The capital of France is Paris."
    want = AutoTokenizer.from_pretrained(tiny_model_dir)
    got = AutoTokenizer.from_pretrained(out)
    assert got(text)["input_ids"][-8:] == want(text)["input_ids"][-8:]
    assert got.chat_template == TEMPLATE
    assert got.eos_token_id == want.eos_token_id

    meta = read_metadata(out)
    assert meta is not None
    assert meta["architecture"] == "llama"
    assert meta["source"]["sha256"] == file_sha256(tiny_gguf)
    assert meta["files"]["model.safetensors"] == file_sha256(out / "model.safetensors")
    assert verify(out) == []
    (out / "config.json").write_text("{}")
    assert verify(out) == ["config.json"]


def test_a_conversion_is_reused_for_the_same_file(tiny_gguf: Path, tmp_path: Path) -> None:
    out = convert_gguf(tiny_gguf, tmp_path / "m")
    stamp = (out / "model.safetensors").stat().st_mtime_ns
    assert convert_gguf(tiny_gguf, tmp_path / "m") == out
    assert (out / "model.safetensors").stat().st_mtime_ns == stamp


def test_a_truncated_download_is_refused_with_the_reason(tiny_gguf: Path, tmp_path: Path) -> None:
    data = tiny_gguf.read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(GGUFError, match=r"cut.gguf (is truncated|cannot be read as GGUF)"):
        convert_gguf(cut, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    header_only = tmp_path / "header.gguf"
    header_only.write_bytes(data[:64])
    with pytest.raises(GGUFError, match=r"header\.gguf"):
        convert_gguf(header_only, tmp_path / "out")
    not_gguf = tmp_path / "model.bin"
    not_gguf.write_bytes(b"PK\x03\x04 a zip, not a GGUF")
    with pytest.raises(GGUFError, match=r"model\.bin is not a GGUF file"):
        convert_gguf(not_gguf, tmp_path / "out")


def test_an_unsupported_architecture_is_refused_naming_it(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    other = _gguf_from_hf(tiny_model_dir, tmp_path / "falcon.gguf", architecture="falcon")
    with pytest.raises(GGUFError, match="is a 'falcon' model: the converter builds llama"):
        convert_gguf(other, tmp_path / "out")
