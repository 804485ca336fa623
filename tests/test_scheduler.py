"""The continuous-batching policy, pure: no Redis, no torch."""

from __future__ import annotations

import pytest

from service.worker.scheduler import Candidate, Scheduler

SMALL = ("m", 16, 16)
LARGE = ("m", 32, 32)


def job(key: str, deadline: float = 100.0, group: tuple = SMALL, arrived: float = 0.0, solo: bool = False):
    return Candidate(key, group, group[1] * group[2], deadline, arrived, solo, source=group[0])


def keys(candidates: list[Candidate]) -> list[str]:
    return [c.key for c in candidates]


def test_admits_earliest_deadline_first_up_to_max_batch() -> None:
    s = Scheduler(max_batch=3, pixel_budget=10**6, max_wait_s=0.0)
    for key, deadline in [("late", 50.0), ("soon", 10.0), ("mid", 20.0), ("latest", 90.0)]:
        s.offer(job(key, deadline))
    decision = s.decide(now=1.0)
    assert keys(decision.admit) == ["soon", "mid", "late"]
    assert list(s.waiting) == ["latest"]
    assert s.free_slots() == 0
    s.leave("soon")  # a member finished: the next step boundary takes the waiting job
    assert keys(s.decide(now=2.0).admit) == ["latest"]


def test_free_slots_counts_waiting_and_running() -> None:
    s = Scheduler(max_batch=4, pixel_budget=10**6, max_wait_s=0.0)
    assert s.free_slots() == 4
    s.offer(job("a"))
    s.offer(job("b"))
    assert s.free_slots() == 2
    s.decide(now=1.0)
    s.offer(job("c"))
    assert s.free_slots() == 1


def test_pixel_budget_limits_the_batch_but_a_large_job_still_runs_alone() -> None:
    s = Scheduler(max_batch=8, pixel_budget=600, max_wait_s=0.0)  # two 16x16 latents fit, not three
    for key in "abc":
        s.offer(job(key, deadline=ord(key)))
    assert keys(s.decide(now=1.0).admit) == ["a", "b"]
    s = Scheduler(max_batch=8, pixel_budget=600, max_wait_s=0.0)
    s.offer(job("big", group=LARGE))  # 1024 latent pixels: over the budget on its own
    s.offer(job("small", deadline=200.0))
    assert keys(s.decide(now=1.0).admit) == ["big"]


def test_only_compatible_jobs_join_and_an_earlier_incompatible_one_goes_next() -> None:
    s = Scheduler(max_batch=8, pixel_budget=10**6, max_wait_s=0.0)
    s.offer(job("small1", deadline=10.0))
    assert keys(s.decide(now=1.0).admit) == ["small1"]
    s.offer(job("large", deadline=20.0, group=LARGE))
    s.offer(job("small2", deadline=30.0))
    # The earliest waiting job cannot join: nothing joins, the batch drains and it starts next.
    assert s.decide(now=2.0).admit == []
    s.leave("small1")
    assert keys(s.decide(now=3.0).admit) == ["large"]
    assert s.decide(now=4.0).admit == []
    s.leave("large")
    assert keys(s.decide(now=5.0).admit) == ["small2"]


def test_other_models_are_incompatible() -> None:
    s = Scheduler(max_batch=8, pixel_budget=10**6, max_wait_s=0.0)
    s.offer(job("a", deadline=1.0, group=("m1", 16, 16)))
    s.offer(job("b", deadline=2.0, group=("m2", 16, 16)))
    assert keys(s.decide(now=0.5).admit) == ["a"]


def test_a_lone_job_waits_at_most_max_wait_for_batch_mates() -> None:
    s = Scheduler(max_batch=4, pixel_budget=10**6, max_wait_s=0.05)
    s.offer(job("a", arrived=10.0))
    decision = s.decide(now=10.01)
    assert decision.admit == []
    assert decision.wait_s == pytest.approx(0.04)
    s.offer(job("b", arrived=10.03))
    assert s.decide(now=10.04).admit == []  # still within a's wait
    assert keys(s.decide(now=10.05).admit) == ["a", "b"]  # a's wait is over: both go


def test_a_lone_job_does_not_wait_when_its_stream_holds_nothing_else() -> None:
    s = Scheduler(max_batch=4, pixel_budget=10**6, max_wait_s=0.05)
    s.offer(job("a", arrived=10.0))
    assert s.decide(now=10.0, drained={"other model"}).admit == []  # its own stream may hold more
    assert keys(s.decide(now=10.001, drained={"m"}).admit) == ["a"]  # nothing else can join now


def test_a_drained_stream_admits_the_mates_already_held() -> None:
    s = Scheduler(max_batch=4, pixel_budget=10**6, max_wait_s=10.0)
    s.offer(job("a", arrived=0.0))
    s.offer(job("b", arrived=0.0))
    assert keys(s.decide(now=0.0, drained={"m"}).admit) == ["a", "b"]


def test_batch_admission_still_waits_for_mates_and_admits_only_into_an_empty_batch() -> None:
    s = Scheduler(max_batch=4, pixel_budget=10**6, max_wait_s=0.05, admission="batch")
    s.offer(job("a", arrived=0.0))
    # A late job would wait for the whole batch: the wait stays even when the stream is drained.
    assert s.decide(now=0.01, drained={"m"}).wait_s == pytest.approx(0.04)
    assert keys(s.decide(now=0.05).admit) == ["a"]
    assert s.free_slots() == 0  # nothing is claimed while the batch runs
    s.offer(job("b", arrived=0.06))
    assert s.decide(now=0.1).admit == []  # does not join the running batch
    s.leave("a")
    assert s.free_slots() == 3
    assert keys(s.decide(now=0.2).admit) == ["b"]  # waited past max_wait_s already


def test_step_admission_joins_a_running_batch_where_batch_admission_does_not() -> None:
    for admission, joins in (("step", ["b"]), ("batch", [])):
        s = Scheduler(max_batch=4, pixel_budget=10**6, max_wait_s=0.0, admission=admission)  # type: ignore[arg-type]
        s.offer(job("a"))
        s.decide(now=0.0)
        s.offer(job("b"))
        assert keys(s.decide(now=1.0).admit) == joins


def test_unknown_admission_is_refused() -> None:
    with pytest.raises(ValueError, match="admission"):
        Scheduler(max_batch=4, pixel_budget=10**6, max_wait_s=0.0, admission="greedy")  # type: ignore[arg-type]


def test_a_full_batch_does_not_wait() -> None:
    s = Scheduler(max_batch=2, pixel_budget=10**6, max_wait_s=10.0)
    s.offer(job("a", arrived=0.0))
    s.offer(job("b", arrived=0.0))
    assert keys(s.decide(now=0.001).admit) == ["a", "b"]


def test_joining_a_running_batch_does_not_wait() -> None:
    s = Scheduler(max_batch=4, pixel_budget=10**6, max_wait_s=10.0)
    s.offer(job("a", arrived=0.0))
    s.offer(job("b", arrived=0.0))
    s.offer(job("c", arrived=0.0))
    s.offer(job("d", arrived=0.0))
    assert len(s.decide(now=0.0).admit) == 4
    s.leave("a")
    s.offer(job("e", arrived=1.0))
    assert keys(s.decide(now=1.0).admit) == ["e"]


def test_a_job_past_its_deadline_is_expired_not_run() -> None:
    s = Scheduler(max_batch=4, pixel_budget=10**6, max_wait_s=0.0)
    s.offer(job("late", deadline=5.0))
    s.offer(job("ok", deadline=50.0))
    decision = s.decide(now=6.0)
    assert keys(decision.expire) == ["late"]
    assert keys(decision.admit) == ["ok"]
    assert "late" not in s.waiting and "late" not in s.running


def test_a_running_job_is_not_expired() -> None:
    s = Scheduler(max_batch=4, pixel_budget=10**6, max_wait_s=0.0)
    s.offer(job("a", deadline=5.0))
    s.decide(now=1.0)
    assert s.decide(now=100.0).expire == []
    assert "a" in s.running


def test_a_suspect_job_runs_alone_and_blocks_claiming() -> None:
    s = Scheduler(max_batch=4, pixel_budget=10**6, max_wait_s=0.0)
    s.offer(job("a", deadline=1.0))
    s.decide(now=0.0)
    s.offer(job("suspect", deadline=2.0, solo=True))
    assert s.free_slots() == 0  # nothing else is claimed while a suspect is held
    s.offer(job("b", deadline=3.0))
    assert s.decide(now=0.1).admit == []  # waits for the batch to drain
    s.leave("a")
    assert keys(s.decide(now=0.2).admit) == ["suspect"]
    assert s.decide(now=0.3).admit == []  # and nothing joins it
    s.leave("suspect")
    assert keys(s.decide(now=0.4).admit) == ["b"]


def test_draining_admits_nothing_and_gives_back_the_waiting() -> None:
    s = Scheduler(max_batch=4, pixel_budget=10**6, max_wait_s=0.0)
    s.offer(job("a"))
    assert s.decide(now=0.0, draining=True).admit == []
    assert keys(s.take_waiting()) == ["a"]
    assert s.free_slots() == 4
