"""``ftops-dev up`` leaves no process behind: stopped by SIGTERM or SIGHUP it stops its five
services and the NATS and Redis servers it started; SIGKILLed, they die with it.

Each case runs the real ``ftops-dev up --no-demo`` in a subprocess with its own servers on
free ports, notes every process under it, signals it and checks that none of those
processes is left."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ftops_devstack import lifetime
from ftops_devstack.lifetime import alive, descendants
from ftops_devstack.servers import free_port

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.timeout(400),
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc"),
]

# Five services, NATS and Redis.
PROCESSES = 7


def _start(workdir: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "ftops_devstack",
            "up",
            "--no-demo",
            "--workdir",
            str(workdir),
            "--nats-port",
            str(free_port()),
            "--redis-port",
            str(free_port()),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


def _wait_for_line(proc: subprocess.Popen[str], text: str, timeout: float) -> str:
    assert proc.stdout is not None
    seen: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        seen.append(line)
        if text in line:
            return "".join(seen)
    raise AssertionError(f"no {text!r} from ftops-dev:\n{''.join(seen)}")


def _wait_for_processes(pid: int, count: int, timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    while True:
        found = descendants(pid)
        if len(found) >= count or time.monotonic() > deadline:
            assert len(found) >= count, f"only {len(found)} processes under ftops-dev"
            return found
        time.sleep(0.2)


def _survivors(pids: list[int], within: float) -> list[str]:
    deadline = time.monotonic() + within
    while any(alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    left = [pid for pid in pids if alive(pid)]
    described = [f"{pid} {Path(f'/proc/{pid}/cmdline').read_bytes()[:80]!r}" for pid in left]
    for pid in left:  # clean up after a failure
        os.kill(pid, signal.SIGKILL)
    return described


def test_sigterm_after_start_stops_every_process(tmp_path: Path, tiny_model_dir: Path) -> None:
    proc = _start(tmp_path / "dev")
    try:
        _wait_for_line(proc, "stack is up", timeout=300)
        children = _wait_for_processes(proc.pid, PROCESSES, timeout=5)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 128 + signal.SIGTERM
        assert _survivors(children, within=5) == []
    finally:
        proc.kill()


@pytest.mark.parametrize("signum", [signal.SIGHUP, signal.SIGKILL], ids=["SIGHUP", "SIGKILL"])
def test_stopped_while_starting_leaves_nothing(
    tmp_path: Path, tiny_model_dir: Path, signum: signal.Signals
) -> None:
    if signum == signal.SIGKILL and not lifetime.supported():
        pytest.skip("children die with their parent only on Linux")
    proc = _start(tmp_path / "dev")
    try:
        children = _wait_for_processes(proc.pid, PROCESSES, timeout=120)
        proc.send_signal(signum)
        proc.wait(timeout=30)
        assert _survivors(children, within=5) == []
    finally:
        proc.kill()
