"""Serving while loading: steady load on version A of a running replica while 20 new
versions are hot-loaded through adapter.ready (each followed by its first request), once
back to back (the worst case: the replica does nothing but load) and once at one version
per 0.25 s, against the same load with nothing loading (the baseline, same run). Zero
failed requests is the claim; A's p99 is the cost. One process, one torch thread: the
loads' own CPU work (download, sha256, checks, warm-up) competes with serving A."""

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
# Versions arriving one after another with no gap (worst case), and at a steadier pace.
PACED_S = 0.25
BASELINE_S = 5.0


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
    walls: dict[str, float] = {}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            adapters = make_adapters(model_dir, Path(tmp), VERSIONS + 1)
            # Room for every version: loading, not eviction, is what is measured here.
            async with Replica(
                model_dir, nats.url, Path(tmp), max_loaded=2 * VERSIONS + 2
            ) as replica:
                serving = replica.registry.add(adapters[0], replica.fingerprint)
                await replica.first_token(serving.version_id)  # loaded on demand, warm
                runs: dict[str, tuple[list[float], int, list[float]]] = {}
                for label, pace_s in (("back to back", 0.0), (f"one per {PACED_S}s", PACED_S)):
                    load_times: list[float] = []
                    done = asyncio.Event()

                    async def load_all(
                        pace_s: float = pace_s,
                        done: asyncio.Event = done,
                        out: list[float] = load_times,
                    ) -> None:
                        for adapter in adapters[1:]:
                            t0 = time.perf_counter()
                            _, token = await replica.hot_load(adapter)
                            out.append(token)
                            await asyncio.sleep(max(0.0, pace_s - (time.perf_counter() - t0)))
                        done.set()

                    t0 = time.perf_counter()
                    loader = asyncio.create_task(load_all())
                    samples, failed = await _steady_load(replica, serving.version_id, done)
                    await loader
                    walls[label] = time.perf_counter() - t0
                    runs[label] = (samples, failed, load_times)

                # Baseline: the same load for as long, nothing loading.
                stop = asyncio.Event()
                asyncio.get_running_loop().call_later(BASELINE_S, stop.set)
                quiet, failed_quiet = await _steady_load(replica, serving.version_id, stop)
    finally:
        nats.stop()

    report = Report(
        "serving_while_loading",
        f"{CLIENTS} clients on version A ({MAX_TOKENS} tokens each) while {VERSIONS} versions "
        "hot-load",
        "the same load with nothing loading",
    )
    base = report.add("A, nothing loading (baseline)", quiet, BASELINE_S)
    report.notes["failed requests, baseline"] = failed_quiet
    for label, (samples, failed, load_times) in runs.items():
        row = report.add(f"A, {VERSIONS} loads {label}", samples, walls[label])
        report.add(f"  each load ({label}): ready -> token", load_times)
        report.notes[f"failed requests, loads {label}"] = failed
        report.notes[f"A p99 vs baseline, loads {label}"] = (
            f"{(row.p99_ms / base.p99_ms - 1) * 100:+.1f}%"
        )
    report.notes["target"] = "zero failures, p99 within +20%"
    report.write()


if __name__ == "__main__":
    asyncio.run(main())
