"""``ftops``, the operator CLI over the public APIs (through ``ftops_client``).

Exit codes: 0 ok, 1 server-side failure (gRPC error), 2 usage or input error, 3 the stack
is unreachable, 4 a watched job ended FAILED or CANCELLED, 130 Ctrl-C (jobs keep running).
"""
