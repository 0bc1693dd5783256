"""Hot-loading a new adapter version into the running inference backend, against the
baseline of what a restart-based rollout costs: a fresh backend loading the base model and
the adapter before it can answer. Also measures the requests served to the already loaded
version while the new one loads (the zero-downtime claim): errors and worst latency."""

from __future__ import annotations

import asyncio
import tempfile
import time
from pathlib import Path

from bench.report import Report
from ftops_inference.backend import GenerationRequest
from ftops_inference.hf_backend import HFPeftBackend
from ftops_inference.sampling import SamplingConfig

ROUNDS = 8
PROMPT = "Product LZ-59 costs"


def _make_adapters(model_dir: Path, out: Path, n: int) -> list[Path]:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    dirs = []
    for i in range(n):
        torch.manual_seed(i)
        base = AutoModelForCausalLM.from_pretrained(model_dir)
        config = LoraConfig(r=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
        path = out / f"adapter-{i}"
        get_peft_model(base, config).save_pretrained(str(path), safe_serialization=True)
        dirs.append(path)
    return dirs


def _request(adapter: str | None) -> GenerationRequest:
    return GenerationRequest(PROMPT, SamplingConfig(max_tokens=4), adapter)


async def _restart(model_dir: Path, adapter: Path) -> float:
    started = time.perf_counter()
    backend = HFPeftBackend(model_dir)
    await backend.start()
    await backend.load_adapter("new", adapter)
    await backend.generate(_request("new"))
    elapsed = time.perf_counter() - started
    await backend.close()
    return elapsed


async def main() -> None:
    from ftops_tinymodel import build

    model_dir = build()
    with tempfile.TemporaryDirectory() as tmp:
        adapters = _make_adapters(model_dir, Path(tmp), ROUNDS + 1)
        restart = [await _restart(model_dir, adapters[i % len(adapters)]) for i in range(ROUNDS)]

        backend = HFPeftBackend(model_dir)
        await backend.start()
        await backend.load_adapter("serving", adapters[0])
        hot: list[float] = []
        during: list[float] = []
        errors = 0
        for i in range(1, ROUNDS + 1):
            loading = asyncio.Event()
            loading.set()

            async def traffic(loading: asyncio.Event = loading) -> None:
                nonlocal errors
                while loading.is_set():
                    t0 = time.perf_counter()
                    try:
                        await backend.generate(_request("serving"))
                    except Exception:
                        errors += 1
                    during.append(time.perf_counter() - t0)

            load_traffic = asyncio.create_task(traffic())
            await asyncio.sleep(0.02)
            t0 = time.perf_counter()
            await backend.load_adapter(f"v{i}", adapters[i])
            await backend.generate(_request(f"v{i}"))
            hot.append(time.perf_counter() - t0)
            loading.clear()
            await load_traffic
            await backend.unload_adapter(f"v{i}")
        await backend.close()

    report = Report(
        "hot_load",
        f"new adapter version answering its first request (tiny model, {ROUNDS} rounds)",
        "restart: fresh backend loads base + adapter, then answers",
    )
    base = report.add("restart (baseline)", restart)
    row = report.add("hot-load into running backend", hot)
    report.add("requests to the serving version during loads", during)
    report.notes["speed-up vs restart (p50)"] = f"{base.p50_ms / row.p50_ms:.1f}x"
    report.notes["errors on the serving version during loads"] = errors
    report.write()


if __name__ == "__main__":
    asyncio.run(main())
