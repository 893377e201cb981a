"""Faults from outside: find a real process by what it runs, kill it, wait for what a test needs.

Ray titles its workers by what they run (``ray::commit_episode`` while a task of that function
runs, ``ray::MapWorker(MapBatches(EmbedActor))`` for an actor of the job's pool), so a test finds
the process it means to kill the way an operator would, and SIGKILLs it at a moment it observed.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from typing import TypeVar

import psutil

T = TypeVar("T")


def wait_for(what: str, probe: Callable[[], T], timeout_s: float = 300.0, every_s: float = 0.05) -> T:
    """``probe()`` once it returns something truthy. It polls an event the test needs (a file, a
    held request, a process); ``timeout_s`` only bounds a test that is broken."""
    deadline = time.monotonic() + timeout_s
    while True:
        got = probe()
        if got:
            return got
        if time.monotonic() > deadline:
            raise TimeoutError(f"waited {timeout_s} s for {what}")
        time.sleep(every_s)


def titled(fragment: str) -> list[psutil.Process]:
    """Live processes whose title (Ray's ``ray::...``) contains ``fragment``."""
    found = []
    for proc in psutil.process_iter(["cmdline", "status"]):
        cmdline = proc.info.get("cmdline") or []
        if proc.info.get("status") == psutil.STATUS_ZOMBIE or not cmdline:
            continue
        if cmdline[0].startswith("ray::") and fragment in " ".join(cmdline):
            found.append(proc)
    return found


def owner_of_port(port: int) -> psutil.Process | None:
    """The process whose TCP socket on 127.0.0.1 has local port ``port`` (a client's side)."""
    for conn in psutil.net_connections(kind="tcp4"):
        if conn.laddr and conn.laddr.port == port and conn.pid:
            return psutil.Process(conn.pid)
    return None


def sigkill(proc: psutil.Process | int, timeout_s: float = 60.0) -> int:
    """SIGKILL ``proc`` and wait until it is gone; its pid."""
    proc = proc if isinstance(proc, psutil.Process) else psutil.Process(proc)
    os.kill(proc.pid, signal.SIGKILL)
    psutil.wait_procs([proc], timeout=timeout_s)
    assert not proc.is_running() or proc.status() == psutil.STATUS_ZOMBIE, f"pid {proc.pid} survived SIGKILL"
    return proc.pid
