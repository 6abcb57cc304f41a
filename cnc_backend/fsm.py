"""The backend's state machine: STARTING, CONNECTED, RECONNECTING, DRAINING, STOPPED.

STARTING: the first connections to NATS and PostgreSQL are being made.
CONNECTED: both are up and batches flow. RECONNECTING: one of them failed;
the service retries with backoff and stores nothing meanwhile. DRAINING: a
stop was requested; the batch in hand is committed and acknowledged, then
the connections close. STOPPED: ``run()`` has returned.

The machine is defined here, apart from ``BackendService`` which drives it,
so that ``cnc-diagrams`` draws the same definition the service runs.
"""

from __future__ import annotations

from enum import Enum
from typing import Any

from transitions import Machine

from cnc_common.diagrams import MachineDefinition


class State(Enum):
    STARTING = "starting"
    CONNECTED = "connected"
    RECONNECTING = "reconnecting"
    DRAINING = "draining"
    STOPPED = "stopped"


TRANSITIONS: list[dict[str, Any]] = [
    {
        "trigger": "connection_ready",
        "source": [State.STARTING, State.RECONNECTING],
        "dest": State.CONNECTED,
    },
    {
        "trigger": "connection_lost",
        "source": [State.STARTING, State.CONNECTED, State.RECONNECTING],
        "dest": State.RECONNECTING,
    },
    {
        "trigger": "stop_requested",
        "source": [State.STARTING, State.CONNECTED, State.RECONNECTING],
        "dest": State.DRAINING,
    },
    {"trigger": "drain_finished", "source": State.DRAINING, "dest": State.STOPPED},
]


def build_machine(
    model: Any, machine_class: type[Machine] = Machine, **kwargs: Any
) -> Machine:
    """Attach the backend state machine to ``model``, starting in STARTING."""
    return machine_class(
        model=model,
        states=State,
        transitions=TRANSITIONS,
        initial=State.STARTING,
        auto_transitions=False,
        **kwargs,
    )


#: The machine that ``cnc-diagrams`` draws into ``fsm_diagrams/backend.*``
#: and the backend's ``/fsm`` endpoint serves.
DIAGRAM = MachineDefinition("backend", "cnc-backend", build_machine)
