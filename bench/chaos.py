"""Chaos (issue 17): each fault injected once into the whole stack under open-loop load,
with the figures the issue asks for.

Two gateways, two inference replicas, one of every other service, NATS with JetStream on
disk and Redis with an append-only file (ftops_devstack.chaos). Load: half the capacity
measured closed-loop at the start, at most 20 req/s, unary and streaming alternating,
through one client channel balancing over both gateways with health checks and retries.
One fault at a time, each leaving the stack whole:

  inference   an inference replica SIGKILLed mid-canary, restarted
  gateway     a gateway SIGKILLed mid-canary, restarted
  redis       Redis SIGKILLed for --redis-down seconds (30), restarted on its file
  nats        NATS SIGKILLed mid-canary, restarted on the same JetStream store
  monitor     the monitor SIGKILLed mid-canary, restarted
  trainer     the trainer SIGKILLed mid-job, restarted
  registry    the registry SIGKILLed while a job trains and registers, restarted
  postgres    the registry's Postgres unreachable for --outage seconds (30) as a job
              registers its version (a proxy in front of it resets every connection and
              refuses new ones); skipped when no Postgres is reachable
              (FTOPS_TEST_POSTGRES_URL or 127.0.0.1:5432)
  nats-unreachable  NATS unreachable for --outage seconds (30) mid-canary while a job
              trains (the same kind of proxy; the server keeps its state)

Reported per fault: requests and failed requests (with the first errors), release events
published vs applied (matched by id: the gateway's route.changed against the registry's
history; lost and duplicated ids), the release's end state against the expected one, the
job's outcome, and the time to recover. The table's rows are the latency of the requests
that succeeded during each fault.

    python -m bench.chaos [--rate R] [--redis-down 30] [--outage 30] [--only nats,postgres]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
from pathlib import Path

# Before gRPC loads: services are restarted (fork + exec) while this process has calls in
# flight; gRPC's fork handlers then abort the child now and then.
os.environ["GRPC_ENABLE_FORK_SUPPORT"] = "false"

from bench.report import Report
from ftops_devstack import chaos

NAME = "chaos"


async def _run(
    rate: float, redis_down_s: float, outage_s: float, only: list[str], report: Report
) -> None:
    from ftops_tinymodel import build

    postgres = chaos.postgres_admin_url()
    with tempfile.TemporaryDirectory() as tmp:
        env = await chaos.start_env(Path(tmp), build(), rate, postgres_admin=postgres)
        report.notes["registry database"] = "Postgres (proxied)" if postgres else "SQLite"
        try:
            report.notes["capacity (closed loop, req/s)"] = round(env.capacity, 1)
            report.notes["rate (req/s, open loop)"] = env.rate
            for name, fault in chaos.FAULTS.items():
                if only and name not in only:
                    continue
                if name == "redis":
                    result = await chaos.fault_redis_down(env, down_s=redis_down_s)
                elif name == "postgres":
                    if env.postgres is None:
                        report.notes["postgres"] = "skipped: no Postgres reachable"
                        continue
                    result = await chaos.fault_postgres_down(env, down_s=outage_s)
                elif name == "nats-unreachable":
                    result = await chaos.fault_nats_unreachable(env, down_s=outage_s)
                else:
                    result = await fault(env)
                for key, value in result.summary().items():
                    report.notes[f"{result.fault}: {key}"] = str(value)
                if result.failures:
                    report.notes[f"{result.fault}: errors"] = " | ".join(result.failures)
                report.add(f"{name} ({result.failed_requests} failed)", result.latencies_s or [0.0])
        finally:
            await chaos.stop_env(env)


async def main(
    rate: float = 0.0, redis_down_s: float = 30.0, outage_s: float = 30.0, only: str = ""
) -> Path:
    report = Report(
        NAME,
        "one fault at a time into 2 gateways / 2 inference replicas under open-loop load",
        "none in-run: each fault's figures stand against its target (0 failed requests, "
        "0 lost or duplicated events, recovery <= 10 s)",
    )
    await _run(rate, redis_down_s, outage_s, [o for o in only.split(",") if o], report)
    return report.write()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--rate", type=float, default=0.0, help="req/s (default: 50%% capacity)")
    parser.add_argument("--redis-down", type=float, default=30.0, help="seconds Redis is down")
    parser.add_argument(
        "--outage", type=float, default=30.0, help="seconds Postgres and NATS are unreachable"
    )
    parser.add_argument("--only", default="", help="comma-separated faults (default: all)")
    args = parser.parse_args()
    asyncio.run(main(args.rate, args.redis_down, args.outage, args.only))
