"""Named places where a test can make the process die as if killed with SIGKILL.

Set ``CNC_TEST_CRASH_AT=<name>`` (or ``<name>:<n>`` for the n-th time the
point is reached) in the agent's environment. Production runs never set it;
the check is one dictionary lookup. The host clock has a test seam of its
own, ``CNC_TEST_CLOCK_FILE`` (see ``hostclock``).
"""

from __future__ import annotations

import os
import signal

_target, _, _nth = os.environ.get("CNC_TEST_CRASH_AT", "").partition(":")
_remaining = int(_nth) if _nth else 1


def crash_point(name: str) -> None:
    """Kill this process with SIGKILL if the environment names this point."""
    global _remaining
    if name != _target:
        return
    _remaining -= 1
    if _remaining <= 0:
        os.kill(os.getpid(), signal.SIGKILL)
