"""The one recycle decision, fed figures directly: what the worker's check, the
middleware and the master's watchdog each act on."""

from __future__ import annotations

from memguard.recycle import RecycleDecision

MiB = 1 << 20


def started(soft: int | None = 100 * MiB, hard: int | None = None) -> RecycleDecision:
    decision = RecycleDecision(soft, hard)
    decision.start(10 * MiB, 30 * MiB)
    for rss in (30 * MiB, 31 * MiB):  # past its first requests
        decision.observe(rss)
    return decision


def test_a_worker_is_recycled_at_its_soft_limit_not_before() -> None:
    decision = started()
    assert decision.judge(90 * MiB, age=60) is None
    verdict = decision.judge(100 * MiB, age=60)
    assert verdict is not None and verdict.reason == "soft_limit" and not verdict.urgent
    # Requests in flight count ahead: their growth would pass the limit while it drains.
    assert started().judge(90 * MiB, ahead=10 * MiB, age=60) is not None


def test_a_replacement_is_asked_for_a_boot_ahead_of_the_soft_limit() -> None:
    """With ``lead`` (what the worker grows while a replacement boots), the early ask is
    due that far before the limit, while the verdict itself still waits for the limit."""
    decision = started()
    decision.lead = 20 * MiB
    assert not decision.due_early(75 * MiB, age=60)
    assert decision.due_early(80 * MiB, age=60)
    assert decision.due_early(75 * MiB, ahead=5 * MiB, age=60)
    assert decision.judge(85 * MiB, age=60) is None  # no room: it serves on to its limit
    # The next sample is due halfway to where the early ask is, not to the limit.
    decision.sample(40 * MiB, 60 * MiB)
    decision.arm()
    assert decision.next_check_rss == 60 * MiB + (80 * MiB - 40 * MiB) // 2
    # Once answered (a replacement boots), only the wait's own limit is watched.
    decision.answered(85 * MiB, 30 * MiB)
    assert not decision.due_early(90 * MiB, age=60)
    assert decision.judge(116 * MiB, age=60) is not None  # past its wait: it leaves


def test_no_early_ask_without_a_lead_or_for_a_worker_born_over() -> None:
    assert not started().due_early(99 * MiB, age=60)
    born_over = RecycleDecision(100 * MiB, None)
    assert born_over.start(120 * MiB, 140 * MiB) is True
    born_over.lead = 20 * MiB
    born_over.observe(140 * MiB)
    born_over.observe(141 * MiB)
    assert not born_over.due_early(130 * MiB, age=60)
    # A worker that just started and grew a little is warming up, not leaking.
    warming = started()
    warming.lead = 20 * MiB
    assert not warming.due_early(14 * MiB, ahead=70 * MiB, age=1)
