"""The ftops gateway: routes requests to adapter versions by per-alias routing tables kept
in Redis, forwards them to inference replicas, reports per-request results, and applies
the monitor's release decisions."""
