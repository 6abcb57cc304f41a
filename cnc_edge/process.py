"""Helpers shared by the three child processes of the edge agent."""

from __future__ import annotations

import os
import signal

from cnc_common import logs
from cnc_edge.config import EdgeConfig


def child_setup(config: EdgeConfig, role: str) -> None:
    """Configure logging and signals in a freshly spawned child process.

    Children ignore SIGINT and SIGTERM: Ctrl-C in a terminal and
    supervisord's stopasgroup signal the whole process group, and the stop
    must run in order (poller first, then the buffer flushes to disk, then
    the publisher closes), which only the parent can coordinate.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    logs.configure(
        config.log.level, config.log.format, machine=config.machine.id, role=role
    )


def parent_alive(parent_pid: int) -> bool:
    """True while the process that spawned us is still our parent."""
    return os.getppid() == parent_pid
