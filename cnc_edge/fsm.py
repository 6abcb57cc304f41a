"""The edge agent's state machine: ONLINE, OFFLINE, SYNCING.

OFFLINE: readings are appended to ``current.jsonl``. SYNCING: the link is
back; the journal is rotated into ``sync/`` and replayed, oldest file first,
and the state only becomes ONLINE once every journaled reading has a PubAck.
ONLINE: readings go straight to the publisher.

The machine is built here, apart from the buffer process that drives it, so
that diagrams can be generated from the same definition.
"""

from __future__ import annotations

import enum
from typing import Any

from transitions import Machine

from cnc_common.diagrams import MachineDefinition


class EdgeState(enum.Enum):
    OFFLINE = "OFFLINE"
    SYNCING = "SYNCING"
    ONLINE = "ONLINE"


TRANSITIONS: list[dict[str, Any]] = [
    # The publisher has a connection and the stream responds.
    {"trigger": "link_up", "source": EdgeState.OFFLINE, "dest": EdgeState.SYNCING},
    # A publish failed or timed out, or the connection dropped.
    {
        "trigger": "link_down",
        "source": [EdgeState.ONLINE, EdgeState.SYNCING],
        "dest": EdgeState.OFFLINE,
    },
    # Every file in sync/ is acknowledged and deleted, current.jsonl is empty.
    {"trigger": "sync_done", "source": EdgeState.SYNCING, "dest": EdgeState.ONLINE},
    # The sync failed for a reason other than the link (for example sync/ is
    # not writable); everything stays on disk and the sync is retried.
    {"trigger": "sync_failed", "source": EdgeState.SYNCING, "dest": EdgeState.OFFLINE},
]


def build_machine(
    model: Any, machine_class: type[Machine] = Machine, **kwargs: Any
) -> Machine:
    """Attach the edge state machine to ``model``, starting OFFLINE.

    Triggers that are invalid in the current state raise MachineError; the
    buffer checks ``may_<trigger>()`` where an event can legitimately repeat.
    """
    return machine_class(
        model=model,
        states=EdgeState,
        transitions=TRANSITIONS,
        initial=EdgeState.OFFLINE,
        auto_transitions=False,
        name="edge",
        **kwargs,
    )


#: The machine that ``cnc-diagrams`` draws into ``fsm_diagrams/edge.*`` and
#: the agent's ``/fsm`` endpoint serves.
DIAGRAM = MachineDefinition("edge", "cnc-edge agent", build_machine)
