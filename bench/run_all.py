"""Run every benchmark in turn: `make bench`. Results land in bench/results/."""

from __future__ import annotations

import asyncio

from bench import (
    adapter_memory,
    backends,
    data_pipeline,
    event_bus,
    forgetting,
    gateway_overhead,
    hot_load,
    multi_adapter,
    release_under_load,
    rollback_speed,
    serving_while_loading,
    train_throughput,
    zero_downtime,
)


def main() -> None:
    asyncio.run(event_bus.main())
    asyncio.run(gateway_overhead.main())
    asyncio.run(hot_load.main())
    asyncio.run(serving_while_loading.main())
    asyncio.run(multi_adapter.main())
    asyncio.run(adapter_memory.main())
    asyncio.run(backends.main(["hf", "vllm"]))
    asyncio.run(rollback_speed.main())
    asyncio.run(zero_downtime.main())
    asyncio.run(release_under_load.main())
    data_pipeline.main()
    train_throughput.main()
    forgetting.main()


if __name__ == "__main__":
    main()
