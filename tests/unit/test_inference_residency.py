"""Bounded adapter residency: LRU in the model and in the CPU tier, pins, reloads, retire.
The tiers are plain functions here; the HF backend's real ones are tested at the end."""

from __future__ import annotations

import asyncio
import weakref
from pathlib import Path

import pytest
import torch

from ftops_inference.backend import GenerationRequest
from ftops_inference.hf_backend import HFPeftBackend
from ftops_inference.residency import Residency, Tiers
from ftops_inference.sampling import SamplingConfig
from ftops_runtime.errors import FailedPrecondition, NotFound


class Weights:
    def __init__(self, name: str) -> None:
        self.name = name


class FakeModel:
    def __init__(self) -> None:
        self.attached: dict[str, Weights] = {}
        self.reads: list[str] = []
        self.log: list[str] = []

    def tiers(self) -> Tiers[Weights]:
        async def read(path: Path) -> Weights:
            self.reads.append(path.name)
            return Weights(path.name)

        async def attach(version: str, weights: Weights) -> None:
            self.attached[version] = weights
            self.log.append(f"+{version}")

        async def detach(version: str) -> Weights:
            self.log.append(f"-{version}")
            return self.attached.pop(version)

        async def remove(version: str) -> None:
            await detach(version)

        return Tiers(read=read, attach=attach, detach=detach, remove=remove)


def residency(max_loaded: int = 2, max_cached: int = 1) -> tuple[Residency[Weights], FakeModel]:
    model = FakeModel()
    return Residency(model.tiers(), max_loaded=max_loaded, max_cached=max_cached), model


async def test_least_recently_used_unpinned_version_is_evicted_to_cpu() -> None:
    res, _ = residency()
    await res.add("a", Path("a"))
    await res.add("b", Path("b"))
    async with res.use("a"):  # a is now more recent than b
        pass
    await res.add("c", Path("c"))
    assert res.loaded() == ["a", "c"]
    assert res.cached() == ["b"]
    assert res.tier("b") == "cpu"
    assert res.stats["b"].evictions == 1


async def test_evicted_version_reloads_on_demand_from_cpu_then_disk() -> None:
    res, model = residency(max_loaded=1, max_cached=1)
    await res.add("a", Path("a"))
    await res.add("b", Path("b"))  # a -> cpu
    await res.add("c", Path("c"))  # b -> cpu, a falls to disk
    assert res.cached() == ["b"]
    assert res.tier("a") == "disk"
    reads = len(model.reads)
    async with res.use("b"):  # from the CPU tier: no disk read
        assert res.loaded() == ["b"]
    assert len(model.reads) == reads
    async with res.use("a"):  # from disk
        assert res.loaded() == ["a"]
    assert model.reads[-1] == "a"
    assert res.stats["a"].reloads == 1
    assert res.stats["b"].reloads == 1


async def test_pinned_version_is_never_evicted_a_request_waits_for_a_slot() -> None:
    res, _ = residency(max_loaded=1, max_cached=4)
    await res.add("a", Path("a"))
    await res.add("b", Path("b"))
    await res.acquire("b")  # an in-flight request on b
    waiting = asyncio.create_task(res.acquire("a"))
    await asyncio.sleep(0)  # let it reach its wait
    assert not waiting.done()
    assert res.loaded() == ["b"]
    await res.release("b")
    await asyncio.wait_for(waiting, 5)
    assert res.loaded() == ["a"]
    await res.release("a")


async def test_retire_waits_for_in_flight_requests_then_drops_every_tier() -> None:
    res, model = residency()
    changes: list[str] = []
    res.on_event = lambda version, event: changes.append(f"{event}:{version}")
    await res.add("a", Path("a"))
    await res.acquire("a")
    retiring = asyncio.create_task(res.retire("a"))
    await asyncio.sleep(0)
    assert not retiring.done()
    assert "a" in model.attached  # the in-flight request keeps its weights
    with pytest.raises(FailedPrecondition, match="being unloaded"):
        await res.acquire("a")
    await res.release("a")
    await asyncio.wait_for(retiring, 5)
    assert res.tier("a") == ""
    assert model.attached == {}
    assert changes == ["load:a", "unload:a"]
    with pytest.raises(NotFound):
        await res.retire("a")


async def test_cpu_tier_is_bounded() -> None:
    res, _ = residency(max_loaded=1, max_cached=2)
    for name in "abcde":
        await res.add(name, Path(name))
    assert res.loaded() == ["e"]
    assert res.cached() == ["c", "d"]
    assert sorted(res.known()) == list("abcde")


async def test_adding_a_known_version_again_changes_nothing() -> None:
    res, model = residency()
    await res.add("a", Path("a"))
    await res.add("a", Path("other"))
    assert model.log == ["+a"]


# -- the HF backend's real tiers -------------------------------------------------------


def make_adapter(base_dir: Path, out: Path, seed: int) -> Path:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(base_dir)
    config = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    get_peft_model(base, config).save_pretrained(str(out), safe_serialization=True)
    return out


async def test_hf_eviction_and_reload_keep_outputs_and_unload_frees_the_weights(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    dirs = [make_adapter(tiny_model_dir, tmp_path / f"a{i}", i) for i in range(3)]
    hf = HFPeftBackend(tiny_model_dir, max_loaded=1, max_cached=1)
    await hf.start()
    try:
        sampling = SamplingConfig(max_tokens=12, temperature=1.0, seed=4)
        first: dict[str, str] = {}
        for i, path in enumerate(dirs):
            await hf.load_adapter(f"v{i}", path)
            first[f"v{i}"] = (await hf.generate(GenerationRequest("The", sampling, f"v{i}"))).text
        assert hf.loaded() == ["v2"]
        assert hf.cached() == ["v1"]
        # v0 comes back from disk, v1 from the CPU tier: the same outputs as before.
        for version in ("v0", "v1"):
            again = await hf.generate(GenerationRequest("The", sampling, version))
            assert again.text == first[version]
        assert hf.adapter_stats("v0").reloads == 1
        assert hf.adapter_stats("v1").tier == "model"
        assert hf.adapter_stats("v0").tier == "cpu"

        runtime = hf._rt
        assert runtime is not None
        assert runtime.stack is not None
        layer = next(iter(runtime.stack._layers.values()))
        ref = weakref.ref(next(iter(layer.buckets.values())).a)
        del layer
        await hf.unload_adapter("v1")
        assert ref() is None  # freed at once: nothing holds the unloaded weights any more
        assert "v1" not in runtime.stack
        assert not hf.holds("v1")
    finally:
        await hf.close()
