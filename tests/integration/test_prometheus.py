"""A real Prometheus server (Debian package `prometheus`) scrapes a short run of the real services
through the shipped scrape config and file-SD targets; its HTTP API then answers for a metric of
every service, with the run/service/worker labels.

CI installs Prometheus (`.ci/run`) and sets RLSTREAM_REQUIRE_PROMETHEUS=1, which turns a missing
binary into a failure instead of a skip.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from pipeline.transport.topics import ensure_topics
from test_services import _overrides

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
# One metric per service (and the transport layer), as Prometheus stores them.
WANTED = {
    "rollout": "rlstream_rollout_tokens_total",
    "reward": "rlstream_reward_verdicts_total",
    "erpo": "rlstream_erpo_table_prompts",
    "learner": "rlstream_learner_step",
    "transport": "rlstream_transport_messages_total",
}
SERVICE_OF = {"rollout": {"rollout"}, "reward": {"reward"}, "erpo": {"reward"}, "learner": {"learner"},
              "transport": {"rollout", "reward", "learner"}}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _query(base: str, expr: str) -> list[dict]:
    url = f"{base}/api/v1/query?{urllib.parse.urlencode({'query': expr})}"
    with urllib.request.urlopen(url, timeout=5) as r:
        body = json.loads(r.read())
    assert body["status"] == "success", body
    return body["data"]["result"]


def test_prometheus_scrapes_every_service(broker, kafka_cfg, run_name, tmp_path):
    binary = shutil.which("prometheus")
    if binary is None:
        if os.environ.get("RLSTREAM_REQUIRE_PROMETHEUS") == "1":
            pytest.fail("prometheus is not installed (apt-get install prometheus)")
        pytest.skip("prometheus is not installed (apt-get install prometheus)")
    workdir = tmp_path / "run"
    sets = _overrides(run_name, workdir, tmp_path / "cache", broker.bootstrap)
    sets += ["--set", "learner.total_steps=1000", "--set", 'learner.backend="torch"']
    cli = [sys.executable, "-m", "services.cli"]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    subprocess.run(cli + ["warmstart"] + sets, check=True, cwd=REPO, env=env, capture_output=True)
    ensure_topics(kafka_cfg, run_name)

    # The shipped scrape config, next to the targets folder the services write, scraping every 1s.
    metrics_dir = workdir / "metrics"
    (metrics_dir / "targets").mkdir(parents=True)
    config = (REPO / "infra/prometheus/prometheus.yml").read_text()
    (metrics_dir / "prometheus.yml").write_text(
        config.replace("scrape_interval: 5s", "scrape_interval: 1s").replace("refresh_interval: 5s", "refresh_interval: 1s"))
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    logs = {name: open(tmp_path / f"{name}.log", "wb") for name in ("prometheus", "learner", "reward", "rollout")}
    procs = {"prometheus": subprocess.Popen(
        [binary, f"--config.file={metrics_dir / 'prometheus.yml'}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
         f"--web.listen-address=127.0.0.1:{port}"], stdout=logs["prometheus"], stderr=subprocess.STDOUT)}
    for name in ("learner", "reward", "rollout"):
        procs[name] = subprocess.Popen(cli + [name] + sets, cwd=REPO, env=env, stdout=logs[name], stderr=subprocess.STDOUT)
    found: dict[str, list[dict]] = {}
    try:
        deadline = time.monotonic() + 180
        while len(found) < len(WANTED) and time.monotonic() < deadline:
            for name, proc in procs.items():
                assert proc.poll() is None, f"{name} exited:\n{(tmp_path / f'{name}.log').read_text()[-3000:]}"
            for key, metric in WANTED.items():
                if key in found:
                    continue
                try:
                    result = _query(base, f'{metric}{{run="{run_name}"}} > 0')
                except OSError:
                    break  # Prometheus still starting
                if result:
                    found[key] = result
            time.sleep(1)
    finally:
        for proc in procs.values():
            proc.terminate()
        for proc in procs.values():
            proc.wait(timeout=30)
    missing = sorted(set(WANTED) - set(found))
    assert not missing, (f"Prometheus never saw {missing}; targets: "
                         f"{sorted(p.name for p in (metrics_dir / 'targets').glob('*'))}\n"
                         + (tmp_path / "prometheus.log").read_text()[-2000:])
    for key, result in found.items():
        for series in result:
            labels = series["metric"]
            assert labels["run"] == run_name and labels["service"] in SERVICE_OF[key], (key, labels)
            assert labels["job"] == "rlstream" and "worker" in labels
