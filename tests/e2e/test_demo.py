"""End to end: `rlstream demo` on the embedded default, asserting that the policy learned, while a
hostile producer writes 10,000 bad records into every topic of the running demo.

The demo warm-starts the tiny model (cached in .cache/rlstream), evaluates it on 400 held-out
problems, runs broker + learner + reward + rollout as processes, and evaluates again. We assert on
sampled pass@1 (4 samples per problem at T=1), the quantity GRPO optimises.

Margin, from measured spread (2-core CPU, 300 steps, seed 0 unless noted): 15 runs of the shipped
demo over two sessions gained +7.8, +7.6, +7.7, +5.9 (seed 1), +7.6 (seed 2), +6.0, +8.7, +8.7,
+6.9, +1.5, +9.3, +5.7, +8.0, +7.8 and +7.8 points; the asynchronous dataflow makes every run
different, and one in fifteen landed far below the rest. One evaluation (400 problems x 4
samples) has a standard error of about 1.2 points. We require +1 point: the test guards that RL
through the whole system improves held-out accuracy at all, and fails on a broken pipeline (no
learning gives 0 +- 1.7) rather than on the spread of a working one.

Meanwhile `tests/hostile.py` writes 10,000 records as a buggy or hostile producer would, into all
six topics: bytes that are not Arrow, truncated or doubled streams, missing, unknown or non-UTF-8
headers, another kind's payload, nulls, zero rows, list offsets out of range, batches the Kafka
client cannot read (bad CRC, snappy/lz4 without their libraries, a header key that is not UTF-8),
records just under the broker's size limit, and values each consumer must refuse (ticket ids with
Unicode digits, bad attempts, empty or over-long prompts, NaN/negative/too-high temperatures,
NaN rewards, unknown tickets, policy versions from the future, weight folders outside the run,
FIFOs, symlinks, manifests that do not hash). The demo must still end with its RESULT line, no
service may have died (no supervisor restarts), every hostile record outside the dead-letter
topic itself must be in the dead-letter topic with a reason, and the reconciliation must be
clean. The recorded lake is then replayed into a new learner. About 5 minutes here with the
warm-start cached, 7 without.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from pipeline.config import KafkaConfig
from pipeline.lake.store import read_topic

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
MARGIN = 0.01


def _last(path: Path) -> dict:
    return json.loads(path.read_text().splitlines()[-1])


HOSTILE_PER_TOPIC = {"prompts": 2000, "trajectories": 3000, "scored": 2000, "temperature": 1500, "policy": 1000,
                     "deadletter": 500}


def _inject(bootstrap: str, run_dir: Path, out: dict) -> None:
    """The hostile producer (a thread): every topic, interleaved, then two oversized records."""
    from hostile import Injector, prepare_policy_traps

    prepare_policy_traps(run_dir / "policies")
    rng = np.random.default_rng(15)
    from pipeline.config import load_config
    from services.cli import shipped_config
    from pipeline.data.tasks import train_problems

    prompt_ids = [p.prompt_id for p in train_problems(load_config(shipped_config()))]
    injector = Injector(bootstrap, "demo", run_dir / "policies", KafkaConfig().max_message_bytes, prompt_ids)
    order = [t for t, n in HOSTILE_PER_TOPIC.items() for _ in range(n)]
    rng.shuffle(order)
    t0 = time.monotonic()
    try:
        for i, topic in enumerate(order):
            injector.one(topic, rng)
            if i % 200 == 199:
                injector.flush()
        for topic in ("prompts", "trajectories"):
            injector.oversized(topic)
    finally:
        injector.close()
    out["sent"], out["seconds"] = injector.sent, time.monotonic() - t0


def test_demo_learns_through_10k_hostile_records_records_its_lake_and_replays(tmp_path: Path, broker):
    cmd = [sys.executable, "-m", "services.cli", "demo",
           "--set", f'workdir="{tmp_path}"', "--set", "demo.progress_every_s=30"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=dict(os.environ, PYTHONUNBUFFERED="1"))
    lines, injected = [], {}
    injector = None
    for line in proc.stdout:
        lines.append(line)
        m = re.search(r"^broker (\S+); services", line)
        if m and injector is None:
            run_dir = Path(re.search(r"in (\S+)\n", lines[0]).group(1))
            injector = threading.Thread(target=_inject, args=(m.group(1), run_dir, injected), daemon=True)
            injector.start()
    assert proc.wait(timeout=1500) == 0, "".join(lines)[-4000:]
    out = "".join(lines)
    print(out[-3000:])
    assert injector is not None, "the demo never printed its broker address"
    injector.join(60)
    assert "sent" in injected, "the hostile producer did not finish"
    m = re.search(r"^RESULT acc_before=([\d.]+) acc_after=([\d.]+) wall_s=(\d+) greedy_before=([\d.]+) "
                  r"greedy_after=([\d.]+)", out, re.M)
    assert m, f"no RESULT line in:\n{out[-2000:]}"
    before, after, greedy_before, greedy_after = (float(m.group(i)) for i in (1, 2, 4, 5))
    assert 0.1 < before < 0.5, f"warm-start accuracy {before} is outside the range the demo is tuned for"
    assert after - before > MARGIN, f"held-out pass@1 went {before:.3f} -> {after:.3f}"
    assert greedy_after - greedy_before > MARGIN, f"held-out greedy accuracy went {greedy_before:.3f} -> {greedy_after:.3f}"
    run_dir = Path(re.search(r"in (\S+)\n", out).group(1))
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["restarts"] == {}, f"services died (and were restarted): {summary['restarts']}"

    # Every hostile record outside the dead-letter topic is there now, with a reason.
    lake = run_dir / "lake"
    dead = read_topic(lake, "deadletter")
    letters = {(str(t).rsplit(".", 1)[-1], int(p), int(o)): str(r) for t, p, o, r in
               dead.select("source_topic", "source_partition", "source_offset", "reason").iter_rows()}
    sent = [s for s in injected["sent"] if s[0] != "deadletter"]
    missing = [s for s in sent if s[:3] not in letters]
    reasons: dict[str, int] = {}
    for s in sent:
        code = letters.get(s[:3], "MISSING").split(": ")
        key = code[1] if code[0] in ("invalid_group", "invalid_message") else code[0]
        reasons[key] = reasons.get(key, 0) + 1
    classes = {}
    for s in injected["sent"]:
        classes[s[3]] = classes.get(s[3], 0) + 1
    print(f"hostile records: {len(injected['sent'])} in {injected['seconds']:.0f} s, {len(classes)} classes; "
          f"dead letters by reason: {dict(sorted(reasons.items()))}")
    assert len(injected["sent"]) >= 10_000 and not missing, f"{len(missing)} hostile records not dead-lettered: " \
        f"{missing[:10]}"
    assert all(r.strip() for r in letters.values())
    cut = dead.filter(pl.col("payload_bytes") > pl.col("payload").bin.size())
    assert cut.height >= 2, "the oversized records' dead letters were not cut to fit"

    # The lake holds exactly what flowed: every ticket, trajectory group and scored group (and,
    # left out here, the hostile records: each is one message, dead-lettered).
    hostile = pl.DataFrame([(t, p, o) for t, p, o, _ in injected["sent"]], orient="row",
                           schema={"topic": pl.String, "_partition": pl.Int32, "_offset": pl.Int64})

    def used(topic: str) -> pl.DataFrame:
        return read_topic(lake, topic).join(hostile.filter(pl.col("topic") == topic).drop("topic"),
                                            on=["_partition", "_offset"], how="anti")

    learner = _last(run_dir / "progress" / "learner.jsonl")
    scored = used("scored")
    groups = scored["group_id"].n_unique()
    assert used("prompts").filter(pl.col("attempt") == 0).height == learner["issued"]
    assert used("trajectories")["group_id"].n_unique() == _last(run_dir / "progress" / "rollout-0.jsonl")["groups"]
    # The reward service counts the groups it applied to ERPO's table: each ticket's first scored
    # attempt. A ticket issued again when its lease ran out can be scored twice (both are sent).
    assert scored["ticket_id"].n_unique() == _last(run_dir / "progress" / "reward-0.jsonl")["groups"] <= groups
    assert learner["received"] <= groups and learner["step"] * 16 <= learner["received"]
    assert used("policy").height == learner["version"]
    assert "report: " in out and (run_dir / "report" / "index.html").exists()
    assert (run_dir / "report" / "overview.png").stat().st_size > 10_000
    # Every issued ticket has exactly one fate in the learner's ledger; none trained twice.
    assert re.search(r"^reconcile: .* no violations$", out, re.M), out[-2000:]

    # Replay the scored groups into a fresh run; a new learner trains offline on the same groups.
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    sets = ["--set", 'name="replayed"', "--set", f'kafka.bootstrap_servers="{broker.bootstrap}"',
            "--set", "kafka.session_timeout_ms=2000", "--set", f'workdir="{tmp_path / "replayed"}"',
            "--set", "learner.total_steps=10", "--set", 'learner.backend="torch"',
            "--set", "learner.tickets.drain_timeout_s=0", "--set", "learner.offline=true"]
    subprocess.run([sys.executable, "-m", "services.cli", "replay", str(lake)] + sets, cwd=REPO, check=True,
                   env=env, timeout=300)
    subprocess.run([sys.executable, "-m", "services.cli", "learner"] + sets, cwd=REPO, check=True, env=env,
                   timeout=600, capture_output=True)
    replayed = _last(tmp_path / "replayed" / "progress" / "learner.jsonl")
    # A ticket issued again when its lease ran out can have two scored groups in the lake: the
    # replayed learner trains the first it reads and ignores the other as a duplicate.
    extra_copies = groups - scored["ticket_id"].n_unique()
    assert replayed["step"] == 10 and replayed["duplicates"] <= extra_copies, (replayed, extra_copies)
    saved = json.loads((tmp_path / "replayed" / "checkpoints" / "step-00000010" / "learner.json").read_text())
    trained = pl.Series(saved["seen"])  # tickets decided: the replayed run's, trained offline
    assert trained.len() >= 10 * 16 and trained.is_in(scored["ticket_id"].unique().implode()).all()
    assert not trained.is_duplicated().any()  # no ticket decided twice
