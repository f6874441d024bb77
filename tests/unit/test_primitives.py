"""Small shared primitives: the bounded set, atomic writes, cache locks, failpoint specs."""

from __future__ import annotations

import multiprocessing
import time

import pytest

from pipeline.atomic import file_lock, write_atomic
from pipeline.dedupe import BoundedSet
from pipeline.failpoints import parse


def test_bounded_set_keeps_the_newest():
    s = BoundedSet(3, ["a", "b"])
    assert s.add("c") and not s.add("a") and s.add("d")
    assert list(s) == ["b", "c", "d"] and "a" not in s and len(s) == 3
    s.discard("c")
    assert list(s) == ["b", "d"]
    with pytest.raises(ValueError):
        BoundedSet(0)


def test_write_atomic_replaces_whole_files(tmp_path):
    path = tmp_path / "sub" / "state.json"
    write_atomic(path, "one")
    write_atomic(path, b"two")
    assert path.read_text() == "two" and [p.name for p in path.parent.iterdir()] == ["state.json"]


def _hold(path, seconds, out):
    with file_lock(path):
        out.put(("in", time.monotonic()))
        time.sleep(seconds)
        out.put(("out", time.monotonic()))


def test_file_lock_serialises_processes(tmp_path):
    ctx = multiprocessing.get_context("fork")
    q = ctx.Queue()
    procs = [ctx.Process(target=_hold, args=(tmp_path / "x.lock", 0.3, q)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(10)
    events = sorted((q.get(timeout=5) for _ in range(4)), key=lambda e: e[1])
    assert [e[0] for e in events] == ["in", "out", "in", "out"]  # never both inside


def test_failpoint_specs():
    assert parse("") == {} and parse("learner.checkpoint@3, rollout.produced@1") == {
        "learner.checkpoint": 3, "rollout.produced": 1}
    for bad in ("nowhere@1", "learner.checkpoint", "learner.checkpoint@0", "learner.checkpoint@\u0663"):
        with pytest.raises(ValueError):
            parse(bad)
