"""Many timeouts through one loop timer (`pop/deadlines.py`)."""

from __future__ import annotations

import asyncio
import time

from egressd.pop import deadlines as module
from egressd.pop.deadlines import Deadlines


async def test_timeouts_fire_in_time_and_cancelled_ones_never() -> None:
    timeouts, fired = Deadlines(), []
    started = time.monotonic()
    timeouts.add(0.2, lambda: fired.append(("slow", time.monotonic() - started)))
    cancelled = timeouts.add(0.1, lambda: fired.append(("cancelled", 0.0)))
    timeouts.add(0.1, lambda: fired.append(("fast", time.monotonic() - started)))
    Deadlines.cancel(cancelled)
    await asyncio.sleep(0.4)
    assert [name for name, _ in fired] == ["fast", "slow"]
    for name, after in fired:
        expected = 0.1 if name == "fast" else 0.2
        assert expected <= after <= expected + module.LATE_BY + 0.1
    assert len(timeouts) == 0  # fired and cancelled entries are gone
    timeouts.close()


async def test_a_shorter_timeout_added_later_is_not_held_up_by_a_longer_one() -> None:
    timeouts, done = Deadlines(), asyncio.Event()
    timeouts.add(5.0, lambda: None)
    started = time.monotonic()
    timeouts.add(0.1, done.set)
    async with asyncio.timeout(2):
        await done.wait()
    assert time.monotonic() - started < 0.1 + module.LATE_BY + 0.1
    timeouts.close()
    assert len(timeouts) == 0


async def test_cancelled_entries_are_freed_by_the_periodic_sweep(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setattr(module, "SWEEP_EVERY", 0.05)
    timeouts = Deadlines()
    for _ in range(1000):
        Deadlines.cancel(timeouts.add(30.0, lambda: None))
    await asyncio.sleep(0.2)
    assert len(timeouts) == 0
    timeouts.close()


async def test_a_failing_callback_goes_to_the_exception_handler_and_others_still_fire() -> None:
    loop = asyncio.get_running_loop()
    reported: list[str] = []
    loop.set_exception_handler(lambda _loop, context: reported.append(context["message"]))
    timeouts, fired = Deadlines(), []

    def fail() -> None:
        raise RuntimeError("boom")

    timeouts.add(0.05, fail)
    timeouts.add(0.05, lambda: fired.append("after"))
    await asyncio.sleep(0.2)
    assert fired == ["after"] and len(reported) == 1 and "timeout callback" in reported[0]
    timeouts.close()


async def test_a_callback_may_add_a_timeout() -> None:
    timeouts, fired = Deadlines(), []
    timeouts.add(0.05, lambda: timeouts.add(0.05, lambda: fired.append("second")))
    await asyncio.sleep(0.3)
    assert fired == ["second"]
    timeouts.close()
