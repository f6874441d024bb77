"""The services of one run as child processes, restarted with backoff when they crash.

Every service is built to survive its own death (offsets committed after results, state
snapshotted, the learner resuming from its checkpoint), so the right answer to a crash is a
restart, not the end of the run: the demo launcher and the fault matrix both tend their children
with this supervisor. A service that exits with status 0 has finished (the learner after its last
step, any service after SIGTERM) and is left alone; one that exits otherwise, or dies of a signal,
is started again with the same command after a backoff that doubles while it keeps failing
quickly (1 s, 2 s, ... 30 s), and counted (`restarts`, the metric
`rlstream_supervisor_restarts_total{service}`, and the run's `summary.json`). A service that
crashes more than `max_restarts` times within `window_s` is given up on (`GaveUp`), with its log.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

from prometheus_client import Counter

log = logging.getLogger(__name__)

RESTARTS = Counter("rlstream_supervisor_restarts_total", "Services restarted after a crash, by service.",
                   ["service"])


class GaveUp(RuntimeError):
    """A service kept crashing; the message holds the end of its log."""


def tail(path: Path, n: int = 25) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except FileNotFoundError:
        return "(no log)"


@dataclass
class Child:
    argv: list[str]
    env: dict[str, str]
    proc: subprocess.Popen | None = None
    started_at: float = 0.0
    quick_failures: int = 0
    """Crashes in a row, each within `Supervisor.quick_s` of its start (sets the backoff)."""
    restart_at: float | None = None
    """When a crashed child is due to start again."""
    crashes: deque = field(default_factory=deque)
    exit_codes: list[int] = field(default_factory=list)
    stopped: bool = False
    """Stopped on purpose (`Supervisor.stop`): never restarted."""


class Supervisor:
    """Starts named services, restarts crashed ones (`tend`), stops them."""

    def __init__(self, log_dir: Path, env: dict[str, str] | None = None, cwd: Path | None = None,
                 max_restarts: int = 10, window_s: float = 300.0, quick_s: float = 60.0,
                 backoff_s: tuple[float, ...] = (1, 2, 4, 8, 16, 30), preexec_fn=None) -> None:
        self.log_dir = Path(log_dir)
        self.env = dict(os.environ if env is None else env)
        self.cwd = cwd
        self.max_restarts, self.window_s, self.quick_s, self.backoff_s = max_restarts, window_s, quick_s, backoff_s
        self.preexec_fn = preexec_fn
        self.children: dict[str, Child] = {}
        self.restarts: dict[str, int] = {}

    def start(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> None:
        """Start service ``name`` (its output appended to ``<log_dir>/<name>.log``)."""
        child = self.children.get(name) or Child(argv, dict(self.env, RLSTREAM_WORKER=name, PYTHONUNBUFFERED="1",
                                                            **(env or {})))
        child.argv, child.stopped = argv, False
        self.children[name] = child
        self._spawn(name, child)

    def _spawn(self, name: str, child: Child) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        with open(self.log_dir / f"{name}.log", "ab") as out:
            child.proc = subprocess.Popen(child.argv, stdout=out, stderr=subprocess.STDOUT, env=child.env,
                                          cwd=self.cwd, preexec_fn=self.preexec_fn)
        child.started_at, child.restart_at = time.monotonic(), None

    def proc(self, name: str) -> subprocess.Popen:
        return self.children[name].proc

    def finished(self, name: str) -> bool:
        """Whether the service exited with status 0."""
        p = self.children[name].proc
        return p is not None and p.poll() == 0

    def tend(self, now: float | None = None) -> list[str]:
        """Schedule a restart of every service that crashed, start those that are due; the names
        restarted. `GaveUp` for a service that crashed too often."""
        now = time.monotonic() if now is None else now
        started = []
        for name, child in self.children.items():
            if child.stopped:
                continue
            code = child.proc.poll() if child.proc is not None else None
            if child.restart_at is None and child.proc is not None and code not in (None, 0):
                child.exit_codes.append(code)
                child.crashes.append(now)
                while child.crashes and now - child.crashes[0] > self.window_s:
                    child.crashes.popleft()
                if len(child.crashes) > self.max_restarts:
                    raise GaveUp(f"{name} crashed {len(child.crashes)} times in {self.window_s:.0f} s (exit codes "
                                 f"{child.exit_codes[-5:]}); last lines of its log:\n"
                                 f"{tail(self.log_dir / f'{name}.log')}")
                child.quick_failures = child.quick_failures + 1 if now - child.started_at < self.quick_s else 1
                delay = self.backoff_s[min(child.quick_failures, len(self.backoff_s)) - 1]
                child.restart_at = now + delay
                child.proc = None
                log.warning("%s exited with %s; restarting in %.0f s", name, _describe(code), delay)
            if child.restart_at is not None and now >= child.restart_at:
                self._spawn(name, child)
                self.restarts[name] = self.restarts.get(name, 0) + 1
                RESTARTS.labels(name).inc()
                started.append(name)
        return started

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        """Send ``sig`` to a running service and wait for it (fault tests); `tend` restarts it."""
        p = self.children[name].proc
        if p is not None and p.poll() is None:
            p.send_signal(sig)
            p.wait()

    def stop(self, names: list[str] | None = None, timeout_s: float = 15.0) -> dict[str, int | None]:
        """SIGTERM the services (all by default), wait up to ``timeout_s``, then SIGKILL; their
        exit codes. Stopped services are not restarted."""
        names = list(self.children) if names is None else names
        procs = {n: self.children[n].proc for n in names}
        for n in names:
            self.children[n].restart_at, self.children[n].stopped = None, True
        for p in procs.values():
            if p is not None and p.poll() is None:
                p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        codes: dict[str, int | None] = {}
        for n, p in procs.items():
            if p is None:
                codes[n] = None
                continue
            try:
                codes[n] = p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                codes[n] = p.wait()
        return codes


def _describe(code: int) -> str:
    if code < 0:
        try:
            return f"signal {signal.Signals(-code).name}"
        except ValueError:
            return f"signal {-code}"
    return f"status {code}"
