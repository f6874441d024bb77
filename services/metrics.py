"""Prometheus metrics of a service process: the HTTP endpoint and its discovery target.

Every process calls :func:`serve` once. It binds `/metrics` on `metrics.host:metrics.port`
(loopback and a free port by default) and writes a Prometheus file-SD target
`<workdir>/metrics/targets/<service>-<worker>.json` with the labels run, service and worker, so
one scrape config (`infra/prometheus/prometheus.yml`) finds every process of every run without a
port plan. The file is removed on a clean exit; a killed process leaves it behind and Prometheus
marks the target down, which is what an operator wants to see.

Metric names follow Prometheus conventions: an `rlstream_` prefix, the unit in the name,
`_total` for counters. Identity (run, service, worker) comes from the target labels, not from
labels on every series.
"""

from __future__ import annotations

import atexit
import json
import logging
from pathlib import Path

from prometheus_client import REGISTRY, Gauge, start_http_server

from pipeline.atomic import write_atomic
from pipeline.config import RunConfig

log = logging.getLogger(__name__)

INFO = Gauge("rlstream_process_info", "Constant 1; the labels identify the process.",
             ["run", "service", "worker"])


def target_dir(cfg: RunConfig) -> Path:
    return cfg.workdir / "metrics" / "targets"


def serve(cfg: RunConfig, service: str, worker: str) -> str | None:
    """Start the metrics endpoint of this process; returns ``host:port`` (None if disabled)."""
    INFO.labels(cfg.name, service, worker).set(1)
    if not cfg.metrics.enabled:
        return None
    httpd, _ = start_http_server(cfg.metrics.port, addr=cfg.metrics.host, registry=REGISTRY)
    address = f"{cfg.metrics.host}:{httpd.server_port}"
    path = target_dir(cfg) / f"{service}-{worker}.json"
    # Prometheus never reads a partial file
    write_atomic(path, json.dumps([{"targets": [address],
                                    "labels": {"run": cfg.name, "service": service, "worker": worker}}]))
    atexit.register(_remove, path)
    log.info("metrics on http://%s/metrics", address)
    return address


def _remove(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass
