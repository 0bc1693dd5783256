"""The ftops monitor: per-version sliding-window metrics from the gateway's request
results, release analysis, and the promote/rollback decisions that follow from it."""
