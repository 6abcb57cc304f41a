"""Helpers shared by the three child processes of the edge agent."""

from __future__ import annotations

import ctypes
import os
import signal
import time
from typing import Any

from cnc_common import logs
from cnc_edge.config import EdgeConfig


def child_setup(config: EdgeConfig, role: str) -> None:
    """Configure logging and signals in a freshly spawned child process.

    Children ignore SIGINT and SIGTERM, because Ctrl-C in a terminal and
    supervisord's stopasgroup signal the whole process group. The stop must
    run in order (poller first, then the buffer flushes to disk, then the
    publisher closes), and only the parent can coordinate that.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    set_process_name(f"cnc-edge-{role}")
    logs.configure(
        config.log.level, config.log.format, machine=config.machine.id, role=role
    )


def set_process_name(name: str) -> None:
    """Name this process in ``ps`` and ``top`` (Linux: at most 15 bytes).

    Spawned children otherwise all show as the Python interpreter.
    """
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(15, name.encode()[:15], 0, 0, 0)  # PR_SET_NAME = 15
    except (OSError, AttributeError):
        pass


def parent_alive(parent_pid: int) -> bool:
    """True while the process that spawned us is still our parent."""
    return os.getppid() == parent_pid


class StopFlag:
    """A flag the parent sets and child processes poll, with no lock inside.

    multiprocessing.Event is built on a lock and a condition. A child killed
    with SIGKILL while waiting on one leaves the lock held, so the parent's
    ``set()`` then blocks for ever. A RawValue is plain shared memory.
    """

    def __init__(self, ctx: Any) -> None:
        self._value = ctx.RawValue("b", 0)

    def set(self) -> None:
        self._value.value = 1

    def is_set(self) -> bool:
        return bool(self._value.value)

    def wait(self, timeout: float) -> bool:
        """Sleep up to ``timeout`` seconds, waking within 50 ms of ``set()``."""
        deadline = time.monotonic() + timeout
        while not self.is_set():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            time.sleep(min(0.05, remaining))
        return self.is_set()
