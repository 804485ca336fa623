"""The gateway's memory of refusals (`service/gateway/admission.py`), without a server: what stands,
for how long, the one request per hold that asks Redis again, and the pacing under pressure."""

from __future__ import annotations

import time
from contextlib import ExitStack

import pytest

from service.gateway.admission import Admission
from service.gateway.errors import QueueBytesFull, QueueFull

FULL = QueueFull("the queue of model 'm' is full (20 jobs waiting or running); retry later", 5)


def test_nothing_stands_until_the_script_refuses() -> None:
    admission = Admission(hold_s=60)
    assert not admission.armed and admission.crowded("m") is None
    with admission.reserve("m", 4):
        pass
    admission.refused("m", FULL)
    assert admission.armed and admission.crowded("other") is None
    for _ in range(2):  # a new error each time, with the script's answer
        with pytest.raises(QueueFull) as refused, admission.reserve("m", 1):
            pass
        assert refused.value.message == FULL.message and refused.value.retry_after_s == 5
    admission.admitted("m", room=3)
    assert admission.crowded("m") is None
    admission.refused("m", QueueBytesFull("bytes", 5))
    with pytest.raises(QueueBytesFull), admission.reserve("m", 1):
        pass
    admission.clear()
    assert not admission.armed


def test_one_request_per_hold_asks_again() -> None:
    admission = Admission(hold_s=0.05, pressure_s=60)
    admission.refused("m", FULL)
    assert admission.crowded("m") is not None
    time.sleep(0.06)
    assert admission.crowded("m") is None  # a peek (the HTTP middleware's) takes nothing
    with admission.reserve("m", 1):  # the same request, planned: it goes on to ask the script
        assert admission.crowded("m") is not None  # the others are refused meanwhile
        with pytest.raises(QueueFull), admission.reserve("m", 1):
            pass


def test_under_pressure_requests_on_their_way_are_paced_by_the_room_reported() -> None:
    admission = Admission(hold_s=0.01, pressure_s=0.2)
    admission.refused("m", FULL)
    time.sleep(0.02)
    admission.admitted("m", room=2)  # a probe went in; two more jobs fit
    with ExitStack() as flying:
        flying.enter_context(admission.reserve("m", 1))
        flying.enter_context(admission.reserve("m", 1))
        with pytest.raises(QueueFull), admission.reserve("m", 1):
            pass
    with admission.reserve("m", 1), admission.reserve("m", 1):  # answered meanwhile: room again
        pass
    time.sleep(0.21)  # the pressure is over: no pacing
    with ExitStack() as flying:
        for _ in range(5):
            flying.enter_context(admission.reserve("m", 1))
    assert not admission.armed
