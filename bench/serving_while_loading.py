"""Serving while loading: steady load on version A of a running replica while 20 new
versions are hot-loaded through adapter.ready, against the same load with nothing loading
(the baseline, same run). Zero failed requests is the claim; A's p99 is the cost."""

from __future__ import annotations

import asyncio
import tempfile
import time
from pathlib import Path

from bench.hot_load import PROMPT, Replica, make_adapters
from bench.report import Report
from ftops.common.v1 import common_pb2
from ftops.inference.v1 import inference_pb2

VERSIONS = 20
CLIENTS = 4
MAX_TOKENS = 8


async def _steady_load(
    replica: Replica, version_id: str, until: asyncio.Event
) -> tuple[list[float], int]:
    samples: list[float] = []
    failures = 0
    request = inference_pb2.GenerateRequest(
        version_id=version_id,
        prompt=PROMPT,
        sampling=common_pb2.SamplingParams(max_tokens=MAX_TOKENS, temperature=0.8),
    )

    async def client() -> None:
        nonlocal failures
        while not until.is_set():
            t0 = time.perf_counter()
            try:
                await replica.stub.Generate(request, timeout=30)
            except Exception:
                failures += 1
            samples.append(time.perf_counter() - t0)

    await asyncio.gather(*(client() for _ in range(CLIENTS)))
    return samples, failures


async def main() -> None:
    import torch

    from ftops_devstack.servers import start_nats
    from ftops_tinymodel import build

    torch.set_num_threads(1)
    model_dir = build()
    nats = start_nats()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            adapters = make_adapters(model_dir, Path(tmp), VERSIONS + 1)
            # Room for every version: loading, not eviction, is what is measured here.
            async with Replica(model_dir, nats.url, Path(tmp), max_loaded=VERSIONS + 2) as replica:
                serving = replica.registry.add(adapters[0], replica.fingerprint)
                await replica.first_token(serving.version_id)  # loaded on demand, warm

                loading_s = 0.0
                load_times: list[float] = []

                async def load_all(done: asyncio.Event) -> None:
                    nonlocal loading_s
                    t0 = time.perf_counter()
                    for adapter in adapters[1:]:
                        _, token = await replica.hot_load(adapter)
                        load_times.append(token)
                    loading_s = time.perf_counter() - t0
                    done.set()

                done = asyncio.Event()
                loader = asyncio.create_task(load_all(done))
                during, failed_during = await _steady_load(replica, serving.version_id, done)
                await loader

                # Baseline: the same load for the same wall time, nothing loading.
                stop = asyncio.Event()
                asyncio.get_running_loop().call_later(loading_s, stop.set)
                quiet, failed_quiet = await _steady_load(replica, serving.version_id, stop)
    finally:
        nats.stop()

    report = Report(
        "serving_while_loading",
        f"{CLIENTS} clients on version A ({MAX_TOKENS} tokens each) while {VERSIONS} versions "
        "hot-load",
        "the same load with nothing loading",
    )
    base = report.add("A, nothing loading (baseline)", quiet, loading_s)
    row = report.add(f"A, while {VERSIONS} versions load", during, loading_s)
    report.add("each load: ready -> first token", load_times)
    report.notes["failed requests (loading / baseline)"] = f"{failed_during} / {failed_quiet}"
    report.notes["A p99 vs baseline"] = f"{(row.p99_ms / base.p99_ms - 1) * 100:+.1f}%"
    report.notes["target"] = "zero failures, p99 within +20%"
    report.write()


if __name__ == "__main__":
    asyncio.run(main())
