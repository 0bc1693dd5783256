"""Run every benchmark in turn: `make bench`. Results land in bench/results/."""

from __future__ import annotations

import asyncio

from bench import event_bus, gateway_overhead, hot_load


def main() -> None:
    asyncio.run(event_bus.main())
    asyncio.run(gateway_overhead.main())
    asyncio.run(hot_load.main())


if __name__ == "__main__":
    main()
