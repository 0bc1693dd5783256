"""The NATS and Redis servers that the tests and the dev stack start die with the process
that started them, even when it is SIGKILLed (no cleanup runs): a crashed test run leaves
no servers behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from ftops_devstack import lifetime
from ftops_devstack.lifetime import alive

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not lifetime.supported(), reason="parent-death signal is Linux only"),
]

LAUNCHER = textwrap.dedent(
    """
    import sys, time
    from ftops_devstack.servers import start_nats, start_redis
    servers = [start_nats(), start_redis()]
    print(" ".join(str(s.proc.pid) for s in servers), flush=True)
    time.sleep(120)
    """
)


def test_servers_die_with_a_killed_launcher() -> None:
    launcher = subprocess.Popen([sys.executable, "-c", LAUNCHER], stdout=subprocess.PIPE, text=True)
    try:
        assert launcher.stdout is not None
        pids = [int(pid) for pid in launcher.stdout.readline().split()]
        assert len(pids) == 2, "the launcher did not start its servers"
        launcher.send_signal(signal.SIGKILL)
        launcher.wait()
        deadline = time.monotonic() + 5
        while any(alive(pid) for pid in pids) and time.monotonic() < deadline:
            time.sleep(0.1)
        left = [pid for pid in pids if alive(pid)]
        for pid in left:  # clean up after a failure
            os.kill(pid, signal.SIGKILL)
        assert left == [], "servers outlived the process that started them"
    finally:
        launcher.kill()
        launcher.wait()
