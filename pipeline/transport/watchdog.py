"""The consumer's poll watchdog: a Kafka client can stop returning from `poll` (wedged on a dead
connection) without raising, and a service blocked there is silent forever. `StallWatchdog`
notices a call that overruns; `exit_wedged` ends the process then, with `EXIT_WEDGED`, for a
restart (a crash the services are built to survive)."""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable

log = logging.getLogger(__name__)

EXIT_WEDGED = 75
"""Exit status of a service whose Kafka client stopped returning from poll (EX_TEMPFAIL)."""


class StallWatchdog:
    """Calls ``on_stall(seconds)`` from a daemon thread when a call bracketed by `enter`/`leave`
    has lasted longer than ``stall_s``. A thread cannot be interrupted safely out of a blocked
    client call, so the consumer's ``on_stall`` ends the process (a crash the services are built
    to survive) instead of leaving it silent forever."""

    def __init__(self, stall_s: float, on_stall, name: str, check_every_s: float | None = None) -> None:
        self.stall_s = stall_s
        self._on_stall = on_stall
        self._started: float | None = None
        self._closed = threading.Event()
        self._every = check_every_s if check_every_s is not None else min(5.0, stall_s / 4)
        threading.Thread(target=self._watch, name=name, daemon=True).start()

    def enter(self) -> None:
        self._started = time.monotonic()

    def leave(self) -> None:
        self._started = None

    def close(self) -> None:
        self._closed.set()

    def _watch(self) -> None:
        while not self._closed.wait(self._every):
            started = self._started
            if started is not None and time.monotonic() - started > self.stall_s:
                self._on_stall(time.monotonic() - started)
                return


def exit_wedged(client_id: str) -> Callable[[float], None]:
    """The consumer's ``on_stall``: log why, flush the logs and end the process with `EXIT_WEDGED`
    (`os._exit`: it runs on the watchdog's thread while the main thread is stuck in the client)."""
    def on_stall(seconds: float) -> None:
        log.critical("consumer %s: poll has not returned for %.0f s; the Kafka client is wedged "
                     "(kafka.poll_stall_timeout_s). Exiting with status %d for a restart.",
                     client_id, seconds, EXIT_WEDGED)
        for h in logging.getLogger().handlers:
            h.flush()
        os._exit(EXIT_WEDGED)
    return on_stall
