"""The small common runtime every ftops service shares: settings, the gRPC server
skeleton, the NATS JetStream event bus, telemetry, errors and retry helpers.

Services import this package and the generated contracts (``ftops.*``); never each other.
"""
