"""Mixed-adapter continuous batching of the HF backend with the tiny model: a request's
output inside a batch equals its output alone, whatever shares the batch or joins it."""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import torch

from ftops_inference.backend import Completion, GenerationRequest
from ftops_inference.hf_backend import HFPeftBackend
from ftops_inference.sampling import FinishReason, SamplingConfig
from ftops_runtime.errors import FailedPrecondition, Unavailable

PROMPTS = ("The capital of", "Product LZ-59 costs", "Hello there my friend, how", "A")


def make_adapter(base_dir: Path, out: Path, seed: int) -> Path:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(base_dir)
    config = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    get_peft_model(base, config).save_pretrained(str(out), safe_serialization=True)
    return out


@pytest.fixture(scope="module")
def adapter_dirs(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("batch-adapters")
    return [make_adapter(tiny_model_dir, root / f"a{seed}", seed) for seed in (1, 2)]


@pytest.fixture
async def backend(tiny_model_dir: Path, adapter_dirs: list[Path]) -> AsyncIterator[HFPeftBackend]:
    hf = HFPeftBackend(
        tiny_model_dir, max_batch_size=8, max_batch_wait_ms=20, recovery_probe_s=0.05
    )
    await hf.start()
    for i, path in enumerate(adapter_dirs):
        await hf.load_adapter(f"v{i}", path)
    yield hf
    await hf.close()


def mixed_requests() -> list[GenerationRequest]:
    requests = []
    for j in range(8):
        sampling = SamplingConfig(
            max_tokens=6 + j,
            temperature=0.9 if j % 2 else 0.0,
            top_k=40,
            seed=j,
            stop=(".",) if j == 5 else (),
        )
        adapter = (None, "v0", "v1")[j % 3]
        requests.append(GenerationRequest(PROMPTS[j % len(PROMPTS)], sampling, adapter))
    return requests


def same(a: Completion, b: Completion) -> bool:
    return (a.text, a.completion_tokens, a.finish_reason) == (
        b.text,
        b.completion_tokens,
        b.finish_reason,
    )


async def test_batched_output_equals_output_alone(backend: HFPeftBackend) -> None:
    requests = mixed_requests()
    alone = [await backend.generate(r) for r in requests]
    together = await asyncio.gather(*(backend.generate(r) for r in requests))
    assert all(same(a, b) for a, b in zip(alone, together, strict=True))
    # The adapters really differ from the base and from each other on sampled output.
    sampled = SamplingConfig(max_tokens=16, temperature=1.0, seed=3)
    texts = {
        (await backend.generate(GenerationRequest(PROMPTS[0], sampled, a))).text
        for a in (None, "v0", "v1")
    }
    assert len(texts) == 3


async def test_requests_joining_a_running_batch_are_unaffected(backend: HFPeftBackend) -> None:
    requests = mixed_requests()
    alone = [await backend.generate(r) for r in requests]
    long = GenerationRequest(PROMPTS[2], SamplingConfig(max_tokens=40, seed=9), "v1")
    long_alone = await backend.generate(long)

    async def join_after_first_chunk() -> list[Completion]:
        # The long request is decoding when each of the others joins.
        return list(await asyncio.gather(*(backend.generate(r) for r in requests)))

    chunks = backend.stream(long)
    parts: list[str] = []
    async with contextlib.aclosing(chunks):
        first = await anext(chunks)
        parts.append(first.text)
        joined = asyncio.create_task(join_after_first_chunk())
        last = first
        async for chunk in chunks:
            parts.append(chunk.text)
            last = chunk
    results = await joined
    assert "".join(parts) == long_alone.text
    assert last.completion_tokens == long_alone.completion_tokens
    assert all(same(a, b) for a, b in zip(alone, results, strict=True))


async def test_one_token_requests_joining_with_longer_ones_leave_the_rest_intact(
    backend: HFPeftBackend,
) -> None:
    """Rows done at their first token (warm-ups, max_tokens 1) skip the running batch;
    the rows that joined with them and the running one still compute what they would
    alone."""
    long = GenerationRequest(PROMPTS[2], SamplingConfig(max_tokens=30, seed=9), "v0")
    joining = [
        GenerationRequest(PROMPTS[j % len(PROMPTS)], SamplingConfig(max_tokens=n, seed=j), a)
        for j, (n, a) in enumerate([(1, "v1"), (7, None), (1, None), (5, "v1"), (1, "v0")])
    ]
    long_alone = await backend.generate(long)
    alone = [await backend.generate(r) for r in joining]

    chunks = backend.stream(long)
    parts: list[str] = []
    async with contextlib.aclosing(chunks):
        first = await anext(chunks)
        parts.append(first.text)
        joined = asyncio.gather(*(backend.generate(r) for r in joining))
        parts += [chunk.text async for chunk in chunks]
    results = await joined
    assert "".join(parts) == long_alone.text
    assert all(same(a, b) for a, b in zip(alone, results, strict=True))
    # The model thread drops finished rows just after handing over their last chunk.
    for _ in range(200):
        if backend.engine.batch_size == 0:
            break
        await asyncio.sleep(0.01)
    assert backend.engine.batch_size == 0


async def test_stream_in_a_batch_concatenates_to_generate(backend: HFPeftBackend) -> None:
    request = GenerationRequest(PROMPTS[1], SamplingConfig(max_tokens=20, stop=("ts",)), "v0")
    full = await backend.generate(request)
    others = [asyncio.create_task(backend.generate(r)) for r in mixed_requests()]
    chunks = [c async for c in backend.stream(request)]
    await asyncio.gather(*others)
    assert "".join(c.text for c in chunks) == full.text
    assert chunks[-1].finish_reason == full.finish_reason
    assert all(c.finish_reason is None for c in chunks[:-1])


async def test_max_tokens_caps_and_eos_or_length_finish(backend: HFPeftBackend) -> None:
    done = await backend.generate(GenerationRequest(PROMPTS[0], SamplingConfig(max_tokens=3)))
    assert done.completion_tokens <= 3
    assert done.finish_reason in (FinishReason.LENGTH, FinishReason.EOS, FinishReason.STOP)


async def test_cancelled_stream_leaves_the_batch_at_the_next_step(
    backend: HFPeftBackend,
) -> None:
    request = GenerationRequest(PROMPTS[0], SamplingConfig(max_tokens=200, temperature=1.0))
    left = asyncio.Event()
    loop = asyncio.get_running_loop()
    engine = backend.engine
    original = engine._select

    def select(keep: list[int]) -> None:  # on the model thread
        original(keep)
        if not engine._active:
            loop.call_soon_threadsafe(left.set)

    engine._select = select  # type: ignore[method-assign]
    async with contextlib.aclosing(backend.stream(request)) as chunks:
        await anext(chunks)
        # The first token is handed over as the row joins the batch (model thread).
        for _ in range(200):
            if engine.batch_size == 1:
                break
            await asyncio.sleep(0.01)
        assert engine.batch_size == 1
        row = engine._active[0]
    await asyncio.wait_for(left.wait(), 10)
    assert engine.batch_size == 0
    assert len(row.tokens) < 200  # dropped, not run to the end


async def test_a_failed_forward_fails_its_rows_with_unavailable_then_recovers(
    backend: HFPeftBackend,
) -> None:
    runtime: Any = backend._rt
    original = runtime.forward
    calls = 0

    def broken(*args: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return original(*args)

    runtime.forward = broken
    with pytest.raises(Unavailable, match="illegal memory access"):
        await backend.generate(GenerationRequest(PROMPTS[0], SamplingConfig(max_tokens=4), "v0"))
    assert backend.failure is not None
    # The probe pass succeeds (the fault was transient): serving again.
    for _ in range(200):
        if backend.failure is None:
            break
        await asyncio.sleep(0.01)
    assert backend.failure is None
    done = await backend.generate(GenerationRequest(PROMPTS[0], SamplingConfig(max_tokens=4)))
    assert done.completion_tokens > 0


# -- stacked LoRA vs PEFT's adapter_names --------------------------------------------


def make_variant_adapter(base_dir: Path, out: Path, **variant: Any) -> Path:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(7)
    base = AutoModelForCausalLM.from_pretrained(base_dir)
    config = LoraConfig(
        r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False, **variant
    )
    get_peft_model(base, config).save_pretrained(str(out), safe_serialization=True)
    return out


async def test_stacked_lora_computes_what_peft_computes(
    tiny_model_dir: Path, adapter_dirs: list[Path]
) -> None:
    logits: dict[str, Any] = {}
    for kernel in ("stacked", "peft"):
        hf = HFPeftBackend(tiny_model_dir, lora_kernel=kernel)
        await hf.start()
        for i, path in enumerate(adapter_dirs):
            await hf.load_adapter(f"v{i}", path)
        runtime: Any = hf._rt
        assert (runtime.stack is not None and "v0" in runtime.stack) == (kernel == "stacked")
        ids = torch.tensor([[5, 17, 42, 9]] * 3)
        mask = torch.ones_like(ids)
        positions = torch.arange(4).expand(3, 4)
        names = ["v0", "__base__", "v1"]
        logits[kernel] = await hf.engine.call(
            functools.partial(runtime.forward, ids, mask, positions, None, names)
        )
        await hf.close()
    torch.testing.assert_close(logits["stacked"][0], logits["peft"][0], rtol=1e-5, atol=1e-5)


async def test_adapter_with_lora_bias_is_served_through_peft_beside_stacked_ones(
    tiny_model_dir: Path, adapter_dirs: list[Path], tmp_path: Path
) -> None:
    hf = HFPeftBackend(tiny_model_dir)
    await hf.start()
    try:
        await hf.load_adapter("plain", adapter_dirs[0])
        runtime: Any = hf._rt
        assert "plain" in runtime.stack
        request = GenerationRequest(PROMPTS[0], SamplingConfig(max_tokens=8, seed=1), "plain")
        before = await hf.generate(request)
        biased = make_variant_adapter(tiny_model_dir, tmp_path / "bias", lora_bias=True)
        await hf.load_adapter("bias", biased)
        assert "bias" not in runtime.stack
        assert "bias" in runtime.peft.peft_config
        biased_request = GenerationRequest(PROMPTS[1], SamplingConfig(max_tokens=8, seed=2), "bias")
        biased_alone = await hf.generate(biased_request)
        # One batch: a stacked row, a PEFT row and a base row, each as it would be alone.
        base_request = GenerationRequest(PROMPTS[2], SamplingConfig(max_tokens=8))
        base_alone = await hf.generate(base_request)
        mixed = await asyncio.gather(
            hf.generate(request), hf.generate(biased_request), hf.generate(base_request)
        )
        assert [m.text for m in mixed] == [before.text, biased_alone.text, base_alone.text]
        await hf.unload_adapter("bias")
        assert not runtime.peft.peft_config
        assert (await hf.generate(request)).text == before.text
    finally:
        await hf.close()


async def test_dora_adapter_is_served_stacked_and_refused_by_the_peft_kernel(
    tiny_model_dir: Path, adapter_dirs: list[Path], tmp_path: Path
) -> None:
    dora = make_variant_adapter(tiny_model_dir, tmp_path / "dora", use_dora=True)
    hf = HFPeftBackend(tiny_model_dir)
    await hf.start()
    try:
        await hf.load_adapter("dora", dora)
        await hf.load_adapter("plain", adapter_dirs[0])
        requests = [
            GenerationRequest(PROMPTS[i], SamplingConfig(max_tokens=8, seed=i), adapter)
            for i, adapter in enumerate(("dora", "plain", None))
        ]
        alone = [await hf.generate(r) for r in requests]
        together = await asyncio.gather(*(hf.generate(r) for r in requests))
        assert all(same(a, b) for a, b in zip(alone, together, strict=True))
    finally:
        await hf.close()

    peft_only = HFPeftBackend(tiny_model_dir, lora_kernel="peft")
    await peft_only.start()
    try:
        with pytest.raises(FailedPrecondition, match="DoRA"):
            await peft_only.load_adapter("dora", dora)
        assert not peft_only.holds("dora")
        done = await peft_only.generate(GenerationRequest(PROMPTS[0], SamplingConfig(max_tokens=4)))
        assert done.completion_tokens > 0
    finally:
        await peft_only.close()
