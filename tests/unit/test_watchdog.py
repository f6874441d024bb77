"""The consumer's poll watchdog: a call that overruns is reported once, a call that returns is not."""

from __future__ import annotations

import threading

from pipeline.transport.watchdog import StallWatchdog


def test_a_call_that_overruns_is_reported_once():
    stalls: list[float] = []
    fired = threading.Event()
    dog = StallWatchdog(0.2, lambda s: (stalls.append(s), fired.set()), name="t", check_every_s=0.02)
    dog.enter()
    assert fired.wait(5)
    assert len(stalls) == 1 and stalls[0] > 0.2
    dog.close()


def test_calls_that_return_in_time_are_not_reported():
    stalls: list[float] = []
    dog = StallWatchdog(0.3, stalls.append, name="t", check_every_s=0.02)
    for _ in range(10):
        dog.enter()
        threading.Event().wait(0.05)
        dog.leave()
    threading.Event().wait(0.5)  # idle between calls is not a stall either
    dog.close()
    assert stalls == []
