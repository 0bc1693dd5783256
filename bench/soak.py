"""Soak (issue 17): the whole stack for --minutes at half its measured capacity, with a
canary release every 2 minutes and a training job every 5 (both scaled down for shorter
runs, to at least every 20 s and 45 s), sampled every 10 s (5 s under 10 minutes) for
growth (ftops_devstack.soak).

Per process (both gateways, both inference replicas, registry, trainer, monitor; NATS and
Redis): resident memory, open file descriptors, threads, asyncio tasks. Per window: the
p99 latency of the requests that succeeded. JetStream: bytes, messages and consumers of
every stream. Redis: keys. Registry: rows per table. Disk: artifact store, trainer
checkpoints, the replicas' adapter caches.

Each series is reported as the mean of its first and last third and a fitted slope, with
its verdict (flat / bounded / per operation / GROWS / UNBOUNDED) and the setting that
bounds it. One PNG per series lands in bench/results/soak/; the table in
bench/results/soak.txt, everything in bench/results/soak.json.

    python -m bench.soak [--minutes 30] [--rate R] [--interval S]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import tempfile
import time
from pathlib import Path

# Before gRPC loads (see bench/chaos.py): the stack forks while calls are in flight.
os.environ["GRPC_ENABLE_FORK_SUPPORT"] = "false"

from bench.report import RESULTS, Report
from ftops_devstack import soak

NAME = "soak"


def plot(run: soak.SoakRun, folder: Path) -> list[Path]:
    """One PNG per series: its samples, the first and last third's means, the verdict."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("*.png"):
        old.unlink()
    verdicts = {g.name: g for g in run.growth}
    written = []
    for series in run.series.values():
        growth = verdicts.get(series.name)
        fig, ax = plt.subplots(figsize=(6.4, 3.2), dpi=100)
        ax.plot(series.times_min, series.values, marker=".", linewidth=1)
        if growth is not None:
            third = max(1, len(series.times_min) // 3)
            ax.hlines(
                [growth.first, growth.last],
                [series.times_min[0], series.times_min[-third]],
                [series.times_min[third - 1], series.times_min[-1]],
                colors=["tab:green", "tab:red"],
                linestyles="dashed",
                label="first / last third",
            )
            ax.set_title(f"{series.name}: {growth.verdict}", fontsize=9)
        else:
            ax.set_title(series.name, fontsize=9)
        ax.set_xlabel("minutes")
        ax.set_ylabel(series.unit)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        path = folder / (re.sub(r"[^a-z0-9]+", "_", series.name.lower()).strip("_") + ".png")
        fig.savefig(path)
        plt.close(fig)
        written.append(path)
    return written


def report(run: soak.SoakRun, wall_s: float) -> Report:
    rep = Report(
        NAME,
        f"{run.minutes:g} min at {run.rate} req/s (50% of {run.capacity:.1f} measured), a "
        f"release every {run.release_every_s:.0f} s, a job every {run.job_every_s:.0f} s",
        "the run's own first third: each series' last third against it",
    )
    samples = sorted(run.samples, key=lambda s: s.started)
    if samples:
        t0, t1 = samples[0].started, samples[-1].started
        third = (t1 - t0) / 3 or 1.0
        for i, label in enumerate(("first", "middle", "last")):
            part = [s for s in samples if t0 + i * third <= s.started <= t0 + (i + 1) * third]
            ok = [s.latency_s for s in part if s.ok]
            if ok:
                failed = len(part) - len(ok)
                rep.add(f"requests, {label} third ({failed} failed)", ok, wall_s=third)
    failed = sum(1 for s in samples if not s.ok)
    rep.notes["requests (failed)"] = f"{len(samples)} ({failed})"
    errors = sorted({s.error for s in samples if not s.ok})
    if errors:
        rep.notes["request errors"] = " | ".join(errors[:5])
    states: dict[str, int] = {}
    for state in run.releases.values():
        states[state] = states.get(state, 0) + 1
    rep.notes["releases"] = ", ".join(f"{n} {s}" for s, n in sorted(states.items())) or "none"
    job_states: dict[str, int] = {}
    for state in run.jobs.values():
        job_states[state] = job_states.get(state, 0) + 1
    rep.notes["jobs"] = ", ".join(f"{n} {s}" for s, n in sorted(job_states.items())) or "none"
    rep.notes["registry database"] = run.registry_database
    rep.notes["sample interval (s)"] = run.interval_s
    if run.operation_errors:
        rep.notes["operation errors"] = " | ".join(run.operation_errors[:5])
    for growth in run.growth:
        rep.notes[growth.name] = growth.line() + ("" if growth.ok else "  <-- FAILS")
    return rep


async def main(minutes: float = 30.0, rate: float = 0.0, interval_s: float = 0.0) -> Path:
    from ftops_tinymodel import build

    started = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp:
        run = await soak.soak(
            Path(tmp),
            build(),
            minutes,
            rate=rate,
            interval_s=interval_s,
            progress=lambda line: print(f"[{time.monotonic() - started:6.0f} s] {line}"),
        )
    rep = report(run, minutes * 60)
    path = rep.write()
    series = {
        name: {"unit": s.unit, "bound": s.bound, "minutes": s.times_min, "values": s.values}
        for name, s in run.series.items()
    }
    payload = json.loads(path.read_text())
    payload["series"] = series
    payload["growth"] = [g.__dict__ for g in run.growth]
    path.write_text(json.dumps(payload, indent=2))
    pngs = plot(run, RESULTS / NAME)
    print(f"{len(pngs)} plots in {RESULTS / NAME}")
    return path


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--minutes", type=float, default=30.0, help="length (30: the full run)")
    parser.add_argument("--rate", type=float, default=0.0, help="req/s (default: 50%% capacity)")
    parser.add_argument("--interval", type=float, default=0.0, help="seconds between samples")
    args = parser.parse_args()
    asyncio.run(main(args.minutes, args.rate, args.interval))
