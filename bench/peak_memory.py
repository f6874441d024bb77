"""Peak memory of one piece of work inside a long-lived process (Linux).

`ru_maxrss` cannot do this: it only grows, and Linux carries it over from the parent process. The
kernel's peak resident set (`VmHWM`) can be reset to the current size by writing 5 to
`/proc/self/clear_refs`; the rise of the peak over the resident set before the work is what the
work itself allocated on top of what the process already held.
"""

from __future__ import annotations

import gc
from collections.abc import Callable
from pathlib import Path


def status_kb(field: str) -> int:
    """A `/proc/self/status` figure, in KiB (`VmRSS`, `VmHWM`)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def peak_rise_mb(fn: Callable[[], object]) -> float | None:
    """Run ``fn()``; the rise of the peak resident set during it over the resident set before it
    (MB), or None where the kernel's peak cannot be reset (then ``fn`` still runs)."""
    gc.collect()
    try:
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM starts again from VmRSS
    except OSError:
        fn()
        return None
    before = status_kb("VmRSS")
    fn()
    return (status_kb("VmHWM") - before) / 1024
