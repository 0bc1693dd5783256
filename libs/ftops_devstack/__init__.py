"""Local development stack: starts NATS, Redis and the five services as processes, and
runs the demo of the whole update loop. Also used by the tests to start real servers."""
