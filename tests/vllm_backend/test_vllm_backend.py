"""The vLLM backend with the tiny model: adapters by version with never-reused LoRA ids and
names, streaming, stop strings, unload, reload after vLLM's CPU LRU evicted an adapter,
refused requests, early-closed streams. Runs on vLLM's CPU build (``make test-vllm``) or
a GPU; skipped where vLLM is not installed (tests/vllm_backend/conftest.py)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from ftops_inference.backend import GenerationRequest
from ftops_inference.sampling import FinishReason, SamplingConfig
from ftops_inference.settings import InferenceSettings
from ftops_runtime.errors import FailedPrecondition, InvalidArgument

MakeLora = Callable[..., Path]  # tests/vllm_backend/conftest.py: write_lora


@pytest.fixture(scope="module")
async def backend(tiny_model_dir: Path) -> AsyncIterator[object]:
    from ftops_inference.vllm_backend import VLLMBackend

    settings = InferenceSettings(
        base_model_path=str(tiny_model_dir),
        backend="vllm",
        vllm_gpu_memory_utilization=0.3,
        vllm_max_loras=2,
        vllm_max_lora_rank=8,
        vllm_max_cpu_loras=4,
        vllm_dtype="float32",
        vllm_cpu_kvcache_space_gib=1,  # ignored on a GPU
    )
    vllm = VLLMBackend(tiny_model_dir, settings)
    await vllm.start()
    yield vllm
    await vllm.close()


async def test_versions_get_distinct_ids_and_distinct_outputs(
    backend: object, tiny_model_dir: Path, tmp_path: Path, make_lora: MakeLora
) -> None:
    from ftops_inference.vllm_backend import VLLMBackend

    assert isinstance(backend, VLLMBackend)
    await backend.load_adapter("v1", make_lora(tiny_model_dir, tmp_path / "a1", 1))
    await backend.load_adapter("v2", make_lora(tiny_model_dir, tmp_path / "a2", 2))
    ids = {v: a.lora_id for v, a in backend._adapters.items()}
    assert ids["v1"] != ids["v2"]
    sampling = SamplingConfig(max_tokens=16, temperature=1.0, seed=7)
    texts = {
        v: (await backend.generate(GenerationRequest("The capital of", sampling, v))).text
        for v in (None, "v1", "v2")
    }
    assert len(set(texts.values())) == 3
    # Same seed, same version: the same text.
    again = await backend.generate(GenerationRequest("The capital of", sampling, "v1"))
    assert again.text == texts["v1"]

    await backend.unload_adapter("v1")
    with pytest.raises(FailedPrecondition):
        await backend.generate(GenerationRequest("The capital of", sampling, "v1"))
    # Reloading the same version under a new id never serves stale weights; a new name too,
    # since vLLM keys prefix-cache blocks by name.
    names = {v: a.request.lora_name for v, a in backend._adapters.items()}
    await backend.load_adapter("v1", tmp_path / "a1")
    assert backend._adapters["v1"].lora_id not in ids.values()
    assert backend._adapters["v1"].request.lora_name not in names.values()


async def test_stream_concatenates_and_stop_strings_finish(backend: object) -> None:
    from ftops_inference.vllm_backend import VLLMBackend

    assert isinstance(backend, VLLMBackend)
    request = GenerationRequest("Product LZ-59 costs", SamplingConfig(max_tokens=24))
    full = await backend.generate(request)
    chunks = [c async for c in backend.stream(request)]
    assert "".join(c.text for c in chunks) == full.text
    assert chunks[-1].finish_reason == full.finish_reason
    assert full.finish_reason in (FinishReason.EOS, FinishReason.LENGTH)
    if len(full.text) > 3:
        stop = full.text[2:4]
        stopped = await backend.generate(
            GenerationRequest(request.prompt, SamplingConfig(max_tokens=24, stop=(stop,)))
        )
        assert stopped.finish_reason == FinishReason.STOP
        assert stop not in stopped.text


async def test_context_length_is_vllms(backend: object) -> None:
    from ftops_inference.vllm_backend import VLLMBackend

    assert isinstance(backend, VLLMBackend)
    assert backend.context_length == 256  # the tiny model's max_position_embeddings


async def test_adapters_evicted_by_vllms_lru_reload_and_unload(
    backend: object, tiny_model_dir: Path, tmp_path: Path, make_lora: MakeLora
) -> None:
    from ftops_inference.vllm_backend import VLLMBackend

    assert isinstance(backend, VLLMBackend)
    versions = [f"e{i}" for i in range(backend._settings.vllm_max_cpu_loras + 1)]
    sampling = SamplingConfig(max_tokens=16, temperature=1.0, seed=11)
    await backend.load_adapter("e0", make_lora(tiny_model_dir, tmp_path / "e0", 10))
    before = (await backend.generate(GenerationRequest("The capital of", sampling, "e0"))).text
    for i, version in enumerate(versions[1:], start=1):
        await backend.load_adapter(version, make_lora(tiny_model_dir, tmp_path / version, 10 + i))
    # e0 left vLLM's CPU cache (max_cpu_loras newer loads since): reloaded from disk, same text.
    again = await backend.generate(GenerationRequest("The capital of", sampling, "e0"))
    assert again.text == before
    ids = {backend._adapters[v].lora_id for v in versions}
    for version in versions:  # some are evicted by now: remove_lora says False, no error
        await backend.unload_adapter(version)
    assert not ids & set(await backend._engine.list_loras())


async def test_requests_vllm_refuses_are_invalid_arguments(backend: object) -> None:
    from ftops_inference.vllm_backend import VLLMBackend

    assert isinstance(backend, VLLMBackend)
    with pytest.raises(InvalidArgument):  # vLLM allows temperature in [0, 2]
        await backend.generate(
            GenerationRequest("The capital of", SamplingConfig(max_tokens=4, temperature=3.0))
        )
    prompt = "the capital of " * 200
    assert await backend.count_prompt_tokens(prompt) > backend.context_length
    with pytest.raises(InvalidArgument):
        await backend.generate(GenerationRequest(prompt, SamplingConfig(max_tokens=4)))
    # Neither touched the engine's health.
    assert backend.failure is None
    assert (
        await backend.generate(GenerationRequest("The capital of", SamplingConfig(max_tokens=4)))
    ).text


async def test_closing_a_stream_early_frees_the_request(backend: object) -> None:
    from ftops_inference.vllm_backend import VLLMBackend

    assert isinstance(backend, VLLMBackend)
    stream = backend.stream(GenerationRequest("The capital of", SamplingConfig(max_tokens=128)))
    first = await anext(stream)
    if first.finish_reason is not None:
        pytest.skip("the model finished within its first chunk; nothing left to close")
    await stream.aclose()  # vLLM's generator is closed with ours and aborts the request
    processor = backend._engine.output_processor
    for _ in range(50):
        if processor.get_num_unfinished_requests() == 0:
            break
        await asyncio.sleep(0.05)
    assert processor.get_num_unfinished_requests() == 0
