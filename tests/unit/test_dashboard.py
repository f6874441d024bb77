"""The Grafana dashboard only uses metrics that some rlstream process exports, and every
service's core metrics appear on it."""

from __future__ import annotations

import json
import re
from pathlib import Path

from prometheus_client import REGISTRY

import pipeline.transport.metrics  # noqa: F401  (registers the transport metrics)
import services.learner  # noqa: F401
import services.metrics  # noqa: F401
import services.reward  # noqa: F401
import services.rollout  # noqa: F401
import services.supervisor  # noqa: F401

DASHBOARD = Path(__file__).resolve().parents[2] / "infra" / "grafana" / "dashboards" / "rlstream.json"
SUFFIXES = {"counter": ["_total"], "histogram": ["_bucket", "_count", "_sum"], "gauge": [""],
            "gaugehistogram": ["_bucket", "_gcount", "_gsum"], "info": ["_info"]}


def exported() -> set[str]:
    """Series names the rlstream metric families can expose (from their names and types)."""
    names = set()
    for family in REGISTRY.collect():
        if family.name.startswith("rlstream_"):
            names |= {family.name + s for s in SUFFIXES[family.type]}
    return names


def dashboard_metrics() -> set[str]:
    dash = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    exprs += [v["query"] for v in dash["templating"]["list"] if v["type"] == "query"]
    return {m for e in exprs for m in re.findall(r"\brlstream_[a-z0-9_]+", e)}


def test_every_dashboard_metric_is_exported():
    missing = dashboard_metrics() - exported()
    assert not missing, f"dashboard uses metrics no service exports: {sorted(missing)}"


def test_every_service_appears_on_the_dashboard():
    used = dashboard_metrics()
    for prefix in ("rlstream_rollout_", "rlstream_reward_", "rlstream_erpo_", "rlstream_learner_", "rlstream_transport_"):
        assert any(m.startswith(prefix) for m in used), prefix


def test_metric_names_follow_prometheus_conventions():
    for family in REGISTRY.collect():
        if not family.name.startswith("rlstream_"):
            continue
        assert re.fullmatch(r"rlstream_[a-z0-9_]+", family.name), family.name
        if family.type == "histogram" and "temperature" not in family.name and "versions" not in family.name:
            assert family.name.endswith("_seconds"), f"{family.name}: a duration histogram names its unit"
        assert not family.name.endswith("_total"), f"{family.name}: counters get _total from the client"
