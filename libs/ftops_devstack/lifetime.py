"""Processes started by the dev stack and the tests end with their parent.

A service started in a session of its own (so a Ctrl-C in the terminal does not reach it
before the stack drains it) no longer gets the signals sent to the stack's process group:
if the stack dies without running its cleanup (SIGKILL, a crash, an OOM kill), its children
live on, and a next stack on the same ports meets them. ``die_with_parent()`` gives a
``preexec_fn`` that asks Linux to SIGKILL the child when the thread that started it exits:
nothing is left to drain for once the parent is gone. Elsewhere it does nothing.

Linux sends the signal when the parent *thread* exits: start children from a thread that
lives as long as they should (the main thread, or the event loop's).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path

PR_SET_PDEATHSIG = 1


def _load_prctl() -> Callable[..., int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    except OSError:
        return None
    prctl: Callable[..., int] = libc.prctl
    return prctl


# Loaded once here: the preexec_fn runs between fork and exec, where loading a library
# (taking the import lock, allocating) is not safe.
_PRCTL = _load_prctl()


def supported() -> bool:
    """Whether children can be tied to their parent's life on this platform."""
    return _PRCTL is not None


def die_with_parent() -> Callable[[], None] | None:
    """A ``preexec_fn`` that has the child SIGKILLed when this process (the calling thread)
    exits; ``None`` where the platform cannot (pass it as is: no preexec_fn at all)."""
    prctl = _PRCTL
    if prctl is None:
        return None
    parent = os.getpid()

    def preexec() -> None:
        prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
        # The parent may have died between fork and prctl: then nobody will signal us.
        if os.getppid() != parent:
            os._exit(1)

    return preexec


def descendants(pid: int) -> list[int]:
    """Every process under ``pid`` (children, their children, ...), read from /proc (Linux);
    a new session does not take a process out of this tree, only its parent's death."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, ValueError, IndexError):
                # The command name (field 2) may hold spaces: the fields after it are safe.
                stat = (entry / "stat").read_text()
                parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    found: list[int] = []
    frontier = [pid]
    while frontier:
        parent = frontier.pop()
        children = [child for child, ppid in parents.items() if ppid == parent]
        found += children
        frontier += children
    return found


def alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie, dead but not yet reaped, does not count)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"
