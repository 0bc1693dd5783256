"""Serving while loading: steady load on version A of a running replica while 20 new
versions are hot-loaded through adapter.ready (each followed by its first request), at one
version per 0.25 s and back to back (the worst case: the replica does nothing but load),
against the same load with nothing loading (the baseline).

The three phases alternate over several rounds and each is pooled across them: on a shared
2-core host the same quiet load drifts by a third from one window to the next, more than
loading costs, so phases measured once each, minutes apart, compare the host's drift.
Zero failed requests is the claim; A's p99 is the cost. The replica runs as deployed, in
a process of its own with one torch thread, so the loads' own CPU work (download, sha256,
checks, warm-up) competes with serving A, and the bench's clients and registry do not.
Loads are paced as configured (``load_duty_cycle``, 0.25 by default); set
FTOPS_LOAD_DUTY_CYCLE=1 to measure them unpaced."""

from __future__ import annotations

import asyncio
import statistics
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from bench.hot_load import PROMPT, Replica, make_adapters
from bench.report import Report
from ftops.common.v1 import common_pb2
from ftops.inference.v1 import inference_pb2

VERSIONS = 20
ROUNDS = 5
CLIENTS = 4
MAX_TOKENS = 8
PACED_S = 0.25
QUIET_S = 5.0
QUIET, PACED, BACK_TO_BACK = "nothing loading", f"one load per {PACED_S}s", "loads back to back"


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


async def _load(
    replica: Replica, adapters: Iterator[Path], pace_s: float, done: asyncio.Event
) -> list[float]:
    """Hot-load VERSIONS new versions, one every pace_s; ready -> first token of each."""
    tokens = []
    for _ in range(VERSIONS):
        t0 = time.perf_counter()
        _, token = await replica.hot_load(next(adapters))
        tokens.append(token)
        await asyncio.sleep(max(0.0, pace_s - (time.perf_counter() - t0)))
    done.set()
    return tokens


class _Phase:
    def __init__(self) -> None:
        self.samples: list[float] = []
        self.rounds_p99_ms: list[float] = []
        self.failed = 0
        self.wall_s = 0.0
        self.loads: list[float] = []

    def record(self, samples: list[float], failed: int, wall_s: float) -> None:
        self.samples += samples
        ordered = sorted(samples)
        self.rounds_p99_ms.append(round(ordered[int(len(ordered) * 0.99)] * 1000, 1))
        self.failed += failed
        self.wall_s += wall_s


async def main() -> None:
    import torch

    from ftops_devstack.servers import start_nats
    from ftops_tinymodel import build

    torch.set_num_threads(1)
    model_dir = build()
    nats = start_nats()
    phases = {QUIET: _Phase(), PACED: _Phase(), BACK_TO_BACK: _Phase()}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            adapters = make_adapters(model_dir, Path(tmp), 1 + 2 * ROUNDS * VERSIONS)
            fresh = iter(adapters[1:])
            # Room for every version: loading, not eviction, is what is measured here.
            async with Replica(
                model_dir, nats.url, Path(tmp), own_process=True, max_loaded=len(adapters) + 1
            ) as replica:
                serving = replica.registry.add(adapters[0], replica.fingerprint)
                await replica.first_token(serving.version_id)  # loaded on demand, warm
                for _ in range(ROUNDS):
                    for label, phase in phases.items():
                        done = asyncio.Event()
                        loader = None
                        if label == QUIET:
                            asyncio.get_running_loop().call_later(QUIET_S, done.set)
                        else:
                            pace = PACED_S if label == PACED else 0.0
                            loader = asyncio.create_task(_load(replica, fresh, pace, done))
                        t0 = time.perf_counter()
                        samples, failed = await _steady_load(replica, serving.version_id, done)
                        if loader is not None:
                            phase.loads += await loader
                        phase.record(samples, failed, time.perf_counter() - t0)
    finally:
        nats.stop()

    report = Report(
        "serving_while_loading",
        f"{CLIENTS} clients on version A ({MAX_TOKENS} tokens each) while {VERSIONS} versions "
        f"hot-load; phases alternate, {ROUNDS} rounds pooled",
        "the same load with nothing loading, in the same rounds",
    )
    quiet = phases[QUIET]
    base = report.add(f"A, {QUIET} (baseline)", quiet.samples, quiet.wall_s)
    for label, phase in phases.items():
        if label != QUIET:
            row = report.add(f"A, {VERSIONS} versions {label}", phase.samples, phase.wall_s)
            report.add(f"  each ({label}): ready -> token", phase.loads)
            report.notes[f"A p99 vs baseline, {label}"] = (
                f"{(row.p99_ms / base.p99_ms - 1) * 100:+.1f}%"
            )
    for label, phase in phases.items():
        report.notes[f"failed requests, {label}"] = phase.failed
        report.notes[f"p99 ms per round, {label}"] = ", ".join(map(str, phase.rounds_p99_ms))
        if label != QUIET:
            # Each round's loading window against the quiet window just before it.
            paired = [
                loading / quiet_p99 - 1
                for loading, quiet_p99 in zip(phase.rounds_p99_ms, quiet.rounds_p99_ms, strict=True)
            ]
            report.notes[f"A p99 vs the quiet window before it, median of rounds, {label}"] = (
                f"{statistics.median(paired) * 100:+.1f}%"
            )
    report.notes["target"] = f"zero failures, p99 within +20% ({PACED})"
    report.write()


if __name__ == "__main__":
    asyncio.run(main())
