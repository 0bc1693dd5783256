"""Memory of adapter versions in the HF backend: resident memory (RSS) before loading 50
versions, after loading them (all in the model, each used once), and after unloading them
all: what unload gives back. The baseline is the process with the base model alone."""

from __future__ import annotations

import asyncio
import gc
import os
import tempfile
import time
from pathlib import Path

from bench.hot_load import make_adapters
from bench.report import Report
from ftops_inference.backend import GenerationRequest
from ftops_inference.hf_backend import HFPeftBackend
from ftops_inference.sampling import SamplingConfig

VERSIONS = 50
RANK = 64
MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def rss_mb() -> float:
    gc.collect()
    with open(f"/proc/{os.getpid()}/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


async def _cycle(
    backend: HFPeftBackend, dirs: list[Path], tag: str, loads: list[float], unloads: list[float]
) -> tuple[float, float]:
    for i, path in enumerate(dirs):
        t0 = time.perf_counter()
        await backend.load_adapter(f"{tag}{i}", path)
        await backend.generate(
            GenerationRequest("Hello", SamplingConfig(max_tokens=2), f"{tag}{i}")
        )
        loads.append(time.perf_counter() - t0)
    loaded = rss_mb()
    for i in range(len(dirs)):
        t0 = time.perf_counter()
        await backend.unload_adapter(f"{tag}{i}")
        unloads.append(time.perf_counter() - t0)
    return loaded, rss_mb()


async def main() -> None:
    import torch

    from ftops_tinymodel import build

    torch.set_num_threads(1)
    model_dir = build()
    with tempfile.TemporaryDirectory() as tmp:
        dirs = make_adapters(model_dir, Path(tmp), VERSIONS, rank=RANK, modules=MODULES)
        size_mb = sum(p.stat().st_size for d in dirs for p in d.glob("*.safetensors")) / 2**20
        backend = HFPeftBackend(model_dir, max_loaded=VERSIONS, max_cached=0)
        await backend.start()
        await backend.generate(GenerationRequest("Hello", SamplingConfig(max_tokens=2)))
        before = rss_mb()
        loads: list[float] = []
        unloads: list[float] = []
        loaded, after = await _cycle(backend, dirs, "a", loads, unloads)
        # A second cycle shows whether unloaded memory is reused or leaks per cycle.
        loaded2, after2 = await _cycle(backend, dirs, "b", loads, unloads)
        await backend.close()

    report = Report(
        "adapter_memory",
        f"RSS with {VERSIONS} LoRA versions (rank {RANK}, all linear modules, "
        f"{size_mb / VERSIONS:.1f} MB each on disk) in the tiny model",
        "RSS with the base model alone, before any load",
    )
    report.add("load + first request, per version", loads)
    report.add("unload (frees and trims), per version", unloads)
    report.notes["adapter weights on disk, total"] = f"{size_mb:.1f} MB"
    report.notes["RSS before (baseline)"] = f"{before:.1f} MB"
    report.notes[f"RSS with {VERSIONS} loaded"] = f"{loaded:.1f} MB (+{loaded - before:.1f})"
    report.notes[f"RSS after unloading all {VERSIONS}"] = f"{after:.1f} MB (+{after - before:.1f})"
    report.notes["given back by unload"] = f"{(loaded - after) / max(loaded - before, 1e-9):.0%}"
    report.notes["second cycle: loaded / unloaded"] = (
        f"{loaded2:.1f} / {after2:.1f} MB (+{after2 - before:.1f} over baseline)"
    )
    report.write()


if __name__ == "__main__":
    asyncio.run(main())
