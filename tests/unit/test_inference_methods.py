"""Every method the trainer produces is served by the HF backend: AdaLoRA, IA3, prompt
tuning, prefix tuning and partial fine-tunes, trained here with the trainer's own training
function on the tiny model, answer exactly what PEFT's PeftModel (or the partially
fine-tuned model) answers, alone and in batches beside LoRA adapters and the base; what a
replica cannot serve is refused at load with the reason, and the trainer refuses at submit
what the configured serving backend cannot serve."""

from __future__ import annotations

import asyncio
import copy
import json
import shutil
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any, cast

import pytest
import torch
from safetensors.torch import load_file, save_file

import ftops_tinymodel
from ftops_inference.adapter_check import AdapterLimits, check_adapter_config, check_tensors
from ftops_inference.adapter_methods import SERVED
from ftops_inference.backend import Completion, GenerationRequest, ModuleShape
from ftops_inference.hf_backend import HFPeftBackend
from ftops_inference.sampling import SamplingConfig
from ftops_runtime.errors import FailedPrecondition
from ftops_trainer.dataset import Record
from ftops_trainer.methods import load_partial
from ftops_trainer.training import TrainParams, train_adapter

FACTS = [Record(f["prompt"], f["completion"]) for f in ftops_tinymodel.new_facts()[:8]]
# A couple of optimizer steps each, at rates that move the tiny model's greedy output.
METHODS: dict[str, dict[str, Any]] = {
    # Six steps: its rank allocation prunes (a rank pattern in the artifact).
    "adalora": {"r": 4, "target_r": 2, "learning_rate": 3e-2, "num_epochs": 3},
    "ia3": {"target_modules": ("k_proj", "v_proj", "down_proj"), "learning_rate": 0.3},
    "prompt_tuning": {"num_virtual_tokens": 4, "learning_rate": 0.3},
    "prefix_tuning": {"num_virtual_tokens": 4, "learning_rate": 0.1},
    "partial": {"num_layers": 1, "learning_rate": 1e-2},
    "lora": {"learning_rate": 3e-2},
}
PROMPTS = [FACTS[0].prompt, FACTS[1].prompt, "The capital of", "Hello there my friend, how"]
MAX_TOKENS = 10


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def trained(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("methods")
    out = {}
    for method, options in METHODS.items():
        params = TrainParams(**{"method": method, "num_epochs": 1, "batch_size": 4, **options})
        train_adapter(tiny_model_dir, FACTS, params, root / method, base_model_name="tiny")
        out[method] = root / method
    return out


def _greedy(model: Any, tok: Any, prompt: str) -> str:
    """The model's greedy answer as "<tokens>:<text>", the text as the backend gives it (an
    incomplete character at the end is not text)."""
    ids = tok(prompt, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=MAX_TOKENS,
            do_sample=False,
            pad_token_id=tok.pad_token_id or 0,
        )
    new = out[0, ids.shape[1] :].tolist()
    if new and new[-1] == tok.eos_token_id:
        new = new[:-1]  # EOS ends the answer, it is not in it
    text = str(tok.decode(new, skip_special_tokens=True)).rstrip("\ufffd")
    return f"{len(new)}:{text}"


def _said(answer: Completion) -> str:
    return f"{answer.completion_tokens}:{answer.text}"


@pytest.fixture(scope="module")
def references(tiny_model_dir: Path, trained: dict[str, Path]) -> dict[str, dict[str, str]]:
    """Each method's greedy answers by PEFT's PeftModel (a partial fine-tune: the base with
    its layers overwritten), and the base model's."""
    from peft import PeftModel

    base, tok = ftops_tinymodel.load(tiny_model_dir)
    answers = {"base": {p: _greedy(base, tok, p) for p in PROMPTS}}
    for method, path in trained.items():
        fresh: Any = copy.deepcopy(base)
        if method == "partial":
            model: Any = load_partial(fresh, path)
        else:
            model = PeftModel.from_pretrained(fresh, str(path))
        model.eval()
        answers[method] = {p: _greedy(model, tok, p) for p in PROMPTS}
    return answers


@pytest.fixture
async def backend(tiny_model_dir: Path) -> AsyncIterator[HFPeftBackend]:
    hf = HFPeftBackend(tiny_model_dir, max_batch_size=16, max_batch_wait_ms=30)
    await hf.start()
    yield hf
    await hf.close()


def _request(prompt: str, adapter: str | None) -> GenerationRequest:
    return GenerationRequest(prompt, SamplingConfig(max_tokens=MAX_TOKENS), adapter)


async def test_each_method_answers_what_peft_answers(
    backend: HFPeftBackend, trained: dict[str, Path], references: dict[str, dict[str, str]]
) -> None:
    for method, path in trained.items():
        await backend.load_adapter(method, path)
        for prompt in PROMPTS:
            got = await backend.generate(_request(prompt, method))
            assert _said(got) == references[method][prompt], (method, prompt)
        # The adapter really changes what the model says.
        assert references[method] != references["base"], method
    runtime: Any = backend._rt
    assert len(runtime.methods) == 5
    assert "lora" in runtime.stack


async def test_mixed_batches_give_each_row_its_reference(
    backend: HFPeftBackend, trained: dict[str, Path], references: dict[str, dict[str, str]]
) -> None:
    for method, path in trained.items():
        await backend.load_adapter(method, path)
    # A LoRA request and an IA3 request at the same time, with the base, prompt and
    # prefix tuning in the same batches, and a partial fine-tune (its own batches).
    names: list[str | None] = [None, *trained]
    cases = [(p, n) for p in PROMPTS for n in names]
    answers = await asyncio.gather(*(backend.generate(_request(p, n)) for p, n in cases))
    for (prompt, name), answer in zip(cases, answers, strict=True):
        assert _said(answer) == references[name or "base"][prompt], (name, prompt)


async def test_evicted_and_reloaded_methods_answer_the_same(
    tiny_model_dir: Path, trained: dict[str, Path], references: dict[str, dict[str, str]]
) -> None:
    hf = HFPeftBackend(tiny_model_dir, max_loaded=1)
    await hf.start()
    try:
        for method, path in trained.items():
            await hf.load_adapter(method, path)
        prompt = PROMPTS[0]
        for _ in range(2):  # every request evicts the previous adapter to the CPU tier
            for method in trained:
                answer = await hf.generate(_request(prompt, method))
                assert _said(answer) == references[method][prompt], method
        assert hf.adapter_stats("ia3").reloads >= 1
        await hf.unload_adapter("prefix_tuning")
        runtime: Any = hf._rt
        assert "prefix_tuning" not in runtime.methods
        assert not hf.holds("prefix_tuning")
    finally:
        await hf.close()


def _variant(src: Path, dest: Path, config: dict[str, Any], tensors: dict[str, Any]) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    base_config = json.loads((src / "adapter_config.json").read_text())
    (dest / "adapter_config.json").write_text(json.dumps({**base_config, **config}))
    state = load_file(str(src / "adapter_model.safetensors"))
    save_file({**state, **tensors} if tensors else state, str(dest / "adapter_model.safetensors"))
    return dest


async def test_what_does_not_fit_the_base_is_refused_and_nothing_stays(
    backend: HFPeftBackend, trained: dict[str, Path], tmp_path: Path
) -> None:
    wrong_layers = _variant(trained["prefix_tuning"], tmp_path / "p", {"num_layers": 7}, {})
    with pytest.raises(FailedPrecondition, match="num_layers=7, the base model has 4"):
        await backend.load_adapter("bad-prefix", wrong_layers)
    state = load_file(str(trained["partial"] / "adapter_model.safetensors"))
    key = next(k for k in state if k.endswith("mlp.down_proj.weight"))
    wrong_shape = _variant(trained["partial"], tmp_path / "q", {}, {key: torch.zeros(3, 3)})
    with pytest.raises(FailedPrecondition, match="has shape \\[3, 3\\], the base model's"):
        await backend.load_adapter("bad-partial", wrong_shape)
    runtime: Any = backend._rt
    assert not backend.holds("bad-prefix")
    assert not backend.holds("bad-partial")
    assert len(runtime.methods) == 0
    # The base answers as before.
    assert (await backend.generate(_request(PROMPTS[0], None))).finish_reason


# -- file checks before loading (no model) -----------------------------------------------

BASE = {
    "model.layers.0.self_attn.k_proj": ModuleShape("linear", 64, 32),
    "model.layers.0.mlp.down_proj": ModuleShape("linear", 128, 64),
}


def _write(directory: Path, config: dict[str, Any], tensors: dict[str, list[int]]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "adapter_config.json").write_text(json.dumps(config))
    save_file(
        {k: torch.ones(shape) for k, shape in tensors.items()},
        str(directory / "adapter_model.safetensors"),
    )
    return directory


def test_vllm_replicas_refuse_every_method_but_lora_naming_their_backend(tmp_path: Path) -> None:
    ia3 = {"peft_type": "IA3", "target_modules": ["k_proj"], "feedforward_modules": []}
    key = "base_model.model.model.layers.0.self_attn.k_proj.ia3_l"
    adapter = _write(tmp_path, ia3, {key: [32, 1]})
    check_adapter_config("v1", adapter)  # the HF backend serves it
    check_tensors("v1", adapter, BASE)
    vllm = AdapterLimits(methods=SERVED["vllm"], backend="vllm")
    with pytest.raises(FailedPrecondition, match=r"backend \(vllm\) serves lora adapters only"):
        check_adapter_config("v1", adapter, vllm)
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LOHA"}))
    with pytest.raises(FailedPrecondition, match="serves lora, adalora, ia3, prompt_tuning"):
        check_adapter_config("v1", adapter)


@pytest.mark.parametrize(
    ("config", "tensors", "error"),
    [
        (  # B's rank disagrees with A's
            {"peft_type": "ADALORA", "init_r": 4, "lora_alpha": 16},
            {
                "base_model.model.model.layers.0.self_attn.k_proj.lora_A": [2, 64],
                "base_model.model.model.layers.0.self_attn.k_proj.lora_B": [32, 3],
                "base_model.model.model.layers.0.self_attn.k_proj.lora_E": [2, 1],
            },
            "which do not fit linear 64->32",
        ),
        (  # down_proj is feed-forward: IA3 scales its input, [1, in]
            {"peft_type": "IA3", "feedforward_modules": ["down_proj"]},
            {"base_model.model.model.layers.0.mlp.down_proj.ia3_l": [64, 1]},
            r"expected \[1, 128\]",
        ),
        (
            {"peft_type": "IA3", "feedforward_modules": []},
            {"base_model.model.model.layers.0.mlp.up_proj.ia3_l": [64, 1]},
            "not a linear layer of the base model",
        ),
        (
            {"peft_type": "PROMPT_TUNING", "num_virtual_tokens": 4},
            {"prompt_embeddings": [5, 64]},
            r"not \[num_virtual_tokens=4",
        ),
        (
            {"peft_type": "PREFIX_TUNING", "num_virtual_tokens": 4},
            {"prompt_embeddings": [4, 64], "extra": [1]},
            "holds one tensor",
        ),
        (
            {"method": "partial", "layers_module": "model.layers", "layers": [3]},
            {"model.layers.2.mlp.down_proj.weight": [64, 128]},
            "outside the partial fine-tune's layers",
        ),
    ],
)
def test_method_tensors_are_checked_against_the_config_and_base(
    tmp_path: Path, config: dict[str, Any], tensors: dict[str, list[int]], error: str
) -> None:
    adapter = _write(tmp_path, config, tensors)
    with pytest.raises(FailedPrecondition, match=error):
        check_tensors("v1", adapter, BASE)


@pytest.mark.parametrize(
    "config",
    [
        {"peft_type": "PROMPT_TUNING", "num_virtual_tokens": 0},
        {"peft_type": "PREFIX_TUNING", "num_virtual_tokens": 100000},
        {"peft_type": "PROMPT_TUNING", "num_virtual_tokens": 4, "num_transformer_submodules": 2},
        {"method": "partial", "layers_module": "model.layers", "layers": []},
    ],
)
def test_bad_method_configs_are_refused(tmp_path: Path, config: dict[str, Any]) -> None:
    adapter = _write(tmp_path, config, {"prompt_embeddings": [4, 64]})
    with pytest.raises(FailedPrecondition):
        check_adapter_config("v1", adapter)


# -- the trainer refuses at submit what the serving backend cannot serve ---------------------


@pytest.mark.parametrize(
    ("backend", "method", "options", "refused"),
    [
        ("vllm", "ia3", {}, "method 'ia3' cannot be served by the configured serving backend"),
        ("vllm", "partial", {}, "backend 'vllm'"),
        ("vllm", "lora", {"use_dora": True}, "does not serve DoRA"),
        ("vllm", "lora", {}, None),
        ("vllm", "adalora", {}, "method 'adalora' cannot be served by .* backend 'vllm'"),
        ("hf", "adalora", {}, None),
        ("hf", "prefix_tuning", {}, None),
        ("hf", "partial", {}, None),
    ],
)
def test_the_trainer_refuses_at_submit_what_the_serving_backend_cannot_serve(
    tiny_model_dir: Path, backend: str, method: str, options: dict[str, Any], refused: str | None
) -> None:
    from ftops.registry.v1 import registry_pb2
    from ftops.trainer.v1 import trainer_pb2
    from ftops_trainer.intake import Intake
    from ftops_trainer.settings import TrainerSettings

    spec = trainer_pb2.JobSpec(
        adapter="a",
        base_model="tiny",
        dataset_jsonl=b"{}",
        method=method,
        lora=trainer_pb2.LoraConfig(**options),
    )
    base = registry_pb2.BaseModel(name="tiny", uri=str(tiny_model_dir))
    intake = Intake(TrainerSettings(serving_backend=cast(Any, backend)), cast(Any, None))
    if refused is None:
        intake._check_method(spec, base)
        return
    with pytest.raises(FailedPrecondition, match=refused):
        intake._check_method(spec, base)


# -- GPT-2 (Conv1D layers, absolute positions, no grouped KV) --------------------------------

GPT2_METHODS: dict[str, dict[str, Any]] = {
    "adalora": {
        "target_modules": ("c_attn",),
        "r": 4,
        "target_r": 2,
        "learning_rate": 0.1,
        "num_epochs": 3,
    },
    "ia3": {
        "target_modules": ("c_attn", "mlp.c_proj"),
        "feedforward_modules": ("mlp.c_proj",),
        "learning_rate": 0.3,
    },
    "prompt_tuning": {"num_virtual_tokens": 4, "learning_rate": 0.3},
    "prefix_tuning": {"num_virtual_tokens": 4, "learning_rate": 0.1},
    "partial": {"num_layers": 1, "learning_rate": 1e-2},
}


@pytest.fixture(scope="module")
def gpt2_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random-weight GPT-2 sharing the tiny model's tokenizer."""
    from transformers import GPT2Config, GPT2LMHeadModel

    out = tmp_path_factory.mktemp("gpt2")
    vocab = json.loads((tiny_model_dir / "config.json").read_text())["vocab_size"]
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=vocab, n_positions=256, n_embd=64, n_layer=2, n_head=4,
        bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )  # fmt: skip
    GPT2LMHeadModel(config).save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(tiny_model_dir / name, out / name)
    return out


async def test_gpt2_methods_answer_what_peft_answers_in_one_mixed_batch(
    gpt2_dir: Path, tmp_path: Path
) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gpt2_dir)
    base: Any = AutoModelForCausalLM.from_pretrained(gpt2_dir)
    base.eval()
    expected: dict[str | None, dict[str, str]] = {None: {p: _greedy(base, tok, p) for p in PROMPTS}}
    hf = HFPeftBackend(gpt2_dir, max_batch_size=16, max_batch_wait_ms=30)
    await hf.start()
    try:
        for method, options in GPT2_METHODS.items():
            params = TrainParams(**{"method": method, "num_epochs": 1, "batch_size": 4, **options})
            train_adapter(gpt2_dir, FACTS, params, tmp_path / method)
            fresh: Any = copy.deepcopy(base)
            if method == "partial":
                model: Any = load_partial(fresh, tmp_path / method)
            else:
                model = PeftModel.from_pretrained(fresh, str(tmp_path / method))
            model.eval()
            expected[method] = {p: _greedy(model, tok, p) for p in PROMPTS}
            assert expected[method] != expected[None], method
            await hf.load_adapter(method, tmp_path / method)
        cases = [(p, n) for p in PROMPTS for n in expected]
        answers = await asyncio.gather(*(hf.generate(_request(p, n)) for p, n in cases))
        for (prompt, name), answer in zip(cases, answers, strict=True):
            assert _said(answer) == expected[name][prompt], (name, prompt)
    finally:
        await hf.close()
