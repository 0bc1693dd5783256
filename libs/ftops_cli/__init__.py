"""``ftops``, the operator CLI over the public APIs (through ``ftops_client``).

Exit codes (ftops_cli.errors, docs/cli.md): 0 ok, 1 server failure or auth refused, 2 usage
or bad input, 3 unavailable (retry), 4 a watched job failed, 5 not found, 6 refused in the
current state, 130 Ctrl-C (jobs keep running).
"""
