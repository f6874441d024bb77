"""The supervisor restarts crashed children with backoff, leaves finished ones alone, gives up on
a crash loop. Real (tiny) child processes; the clock of `tend` is injected."""

from __future__ import annotations

import sys
import time

import pytest

from services.supervisor import GaveUp, Supervisor


def _wait(sup, name):
    for _ in range(200):
        if sup.proc(name).poll() is not None:
            return
        time.sleep(0.02)


def test_crashes_restart_with_doubling_backoff_and_success_is_left_alone(tmp_path):
    sup = Supervisor(tmp_path, backoff_s=(1, 2, 4), max_restarts=5, window_s=100, quick_s=60)
    sup.start("crasher", [sys.executable, "-c", "import sys; print('boom'); sys.exit(3)"])
    sup.start("done", [sys.executable, "-c", "pass"])
    _wait(sup, "crasher"), _wait(sup, "done")
    t = time.monotonic()
    assert sup.tend(t) == []  # crash seen, restart scheduled in 1 s
    assert sup.tend(t + 0.5) == [] and sup.tend(t + 1.0) == ["crasher"]
    _wait(sup, "crasher")
    t2 = time.monotonic()
    assert sup.tend(t2) == [] and sup.tend(t2 + 1.9) == [] and sup.tend(t2 + 2.0) == ["crasher"]
    assert sup.restarts == {"crasher": 2} and sup.finished("done")
    _wait(sup, "crasher")
    assert (tmp_path / "crasher.log").read_text().count("boom") == 3
    sup.stop()


def test_a_crash_loop_is_given_up_with_its_log(tmp_path):
    sup = Supervisor(tmp_path, backoff_s=(0,), max_restarts=2, window_s=100)
    sup.start("bad", [sys.executable, "-c", "raise SystemExit('cannot start: no config')"])
    with pytest.raises(GaveUp, match="cannot start: no config"):
        for _ in range(50):
            _wait(sup, "bad")
            sup.tend()
    sup.stop()


def test_stopped_children_are_not_restarted(tmp_path):
    sup = Supervisor(tmp_path, backoff_s=(0,))
    sup.start("sleeper", [sys.executable, "-c", "import time; time.sleep(60)"])
    codes = sup.stop(timeout_s=5)
    assert codes["sleeper"] != 0 and sup.tend() == [] and sup.restarts == {}
