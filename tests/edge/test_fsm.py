"""The edge state machine: every state, every trigger, invalid triggers raise."""

from __future__ import annotations

import pytest
from transitions import MachineError

from cnc_edge.fsm import TRANSITIONS, EdgeState, build_machine


class Model:
    state: EdgeState


def fresh(state: EdgeState) -> Model:
    model = Model()
    machine = build_machine(model)
    machine.set_state(state)
    return model


def test_starts_offline() -> None:
    model = Model()
    build_machine(model)
    assert model.state is EdgeState.OFFLINE


VALID = [
    (EdgeState.OFFLINE, "link_up", EdgeState.SYNCING),
    (EdgeState.SYNCING, "sync_done", EdgeState.ONLINE),
    (EdgeState.SYNCING, "link_down", EdgeState.OFFLINE),
    (EdgeState.SYNCING, "sync_failed", EdgeState.OFFLINE),
    (EdgeState.ONLINE, "link_down", EdgeState.OFFLINE),
]


@pytest.mark.parametrize(
    ("source", "trigger", "dest"), VALID, ids=lambda v: getattr(v, "name", v)
)
def test_valid_transition(source: EdgeState, trigger: str, dest: EdgeState) -> None:
    model = fresh(source)
    getattr(model, trigger)()
    assert model.state is dest


def _invalid_pairs() -> list[tuple[EdgeState, str]]:
    valid = {(source, trigger) for source, trigger, _ in VALID}
    triggers = {t["trigger"] for t in TRANSITIONS}
    return [(s, t) for s in EdgeState for t in sorted(triggers) if (s, t) not in valid]


@pytest.mark.parametrize(
    ("source", "trigger"), _invalid_pairs(), ids=lambda v: getattr(v, "name", v)
)
def test_invalid_trigger_raises(source: EdgeState, trigger: str) -> None:
    model = fresh(source)
    assert not getattr(model, f"may_{trigger}")()
    with pytest.raises(MachineError):
        getattr(model, trigger)()
    assert model.state is source


def test_table_covers_every_state() -> None:
    sources = {s for s, _, _ in VALID}
    dests = {d for _, _, d in VALID}
    assert sources == set(EdgeState)
    assert dests == set(EdgeState)
    assert len(VALID) == sum(
        len(t["source"]) if isinstance(t["source"], list) else 1 for t in TRANSITIONS
    )
