"""Shared fixtures: one real Tansu broker per test session, and a fresh run prefix per test."""

from __future__ import annotations

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
