"""Reward/verification consumer: trajectories in, scored groups and ERPO temperatures out.

Loop: poll whole groups from the `trajectories` consumer group, verify every completion against its
reference answer in the math-verify process pool (a verifier error or timeout is its own
`verify_status`, never a silent 0), score the groups (pass rate, residual kind), apply the batch to
the ERPO prompt-history table (one pure, vectorised update), send one ScoredTrajectory message per
group and one TemperatureUpdate per changed prompt (key = prompt_id), flush, snapshot the table
with the consumed offsets every `erpo.snapshot_every` batches, then commit.

On start the service loads the snapshot and seeks to its offsets, so the batches after it are
applied to the table exactly once more (their scored groups are sent again; the learner ignores
group ids it has seen).
"""

from __future__ import annotations

import logging
import time
from collections import Counter

import numpy as np
import polars as pl

from pipeline import erpo
from pipeline.config import RunConfig
from pipeline.scoring import RESIDUAL_ALL_CORRECT, RESIDUAL_ALL_WRONG, score
from pipeline.transport import Consumer, Producer, topic_name
from pipeline.verifier import VerifierPool
from schemas import SCORED_TRAJECTORY, TEMPERATURE_UPDATE, Columns
from services.common import JsonlWriter, StopFlag, erpo_rule, worker_id

log = logging.getLogger(__name__)


def group_rows(scored: list[Columns]) -> pl.DataFrame:
    """One row per scored group (prompt_id, pass_rate, policy_version), in arrival order."""
    prompt_ids, rates, versions = [], [], []
    for cols in scored:
        _, first = np.unique(cols["group_id"], return_index=True)
        first.sort()
        prompt_ids += list(cols["prompt_id"][first])
        rates += cols["group_pass_rate"][first].tolist()
        versions += cols["policy_version"][first].tolist()
    return pl.DataFrame({"prompt_id": prompt_ids, "pass_rate": rates, "policy_version": versions},
                        schema=erpo.GROUP_SCHEMA)


def update_columns(updates: pl.DataFrame, row: int) -> Columns:
    """TemperatureUpdate columns of one row of an `erpo.update` result."""
    one = updates.slice(row, 1)
    return {name: one[name].to_numpy() for name in erpo.UPDATE_SCHEMA}


def run(cfg: RunConfig, worker_index: int = 0) -> None:
    stop = StopFlag()
    rc = cfg.reward
    rule = erpo_rule(cfg)
    wid = worker_id()
    producer = Producer(cfg.kafka, client_id=f"{cfg.name}-reward-{wid}")
    consumer = Consumer(cfg.kafka, cfg.name, ["trajectories"], group_id=f"{cfg.name}.reward",
                        client_id=f"{cfg.name}-reward-{wid}", deadletter=producer)
    snapshot_path = cfg.workdir / "erpo" / f"table-{worker_index}.parquet"
    table, offsets = erpo.load_snapshot(snapshot_path)
    if offsets:
        consumer.seek(offsets)
        log.info("resumed ERPO table of %d prompts from %s at %s", table.height, snapshot_path, offsets)
    progress = JsonlWriter(cfg.workdir / "progress" / f"reward-{worker_index}.jsonl")
    scored_topic, temp_topic = topic_name(cfg.name, "scored"), topic_name(cfg.name, "temperature")
    statuses: Counter[str] = Counter()
    residual: Counter[str] = Counter()
    groups = batches = temp_updates = 0
    in_batch = False
    with VerifierPool(rc.verifier_workers, rc.verify_timeout_s, rc.max_chars) as pool:
        log.info("reward %s ready: %d verifier workers, timeout %.1fs, ERPO %s", wid,
                 rc.verifier_workers, rc.verify_timeout_s, "on" if rule.enabled else "off")
        try:
            while not stop:
                deliveries = consumer.poll(timeout_ms=rc.poll_timeout_ms)
                if not deliveries:
                    continue
                t0 = time.monotonic()
                in_batch = True
                scored = []
                for d in deliveries:
                    cols = d.columns
                    verdicts = pool.verify(list(zip(cols["completion_text"], cols["answer"])))
                    scored.append(score(cols, verdicts))
                    statuses.update(v.status.value for v in verdicts)
                t_erpo = time.monotonic()
                batch_groups = group_rows(scored)
                table, updates = erpo.update(table, batch_groups, rule, time.time())
                erpo_ms = (time.monotonic() - t_erpo) * 1000
                for d, cols in zip(deliveries, scored):
                    producer.send(scored_topic, SCORED_TRAJECTORY, cols, key=d.key)
                for i in range(updates.height):
                    producer.send(temp_topic, TEMPERATURE_UPDATE, update_columns(updates, i),
                                  key=str(updates["prompt_id"][i]).encode())
                producer.flush()
                batches += 1
                if batches % cfg.erpo.snapshot_every == 0:
                    erpo.snapshot(table, consumer.positions(), snapshot_path)
                consumer.commit()
                in_batch = False
                groups += batch_groups.height
                temp_updates += updates.height
                rates = batch_groups["pass_rate"].to_numpy()
                residual.update({RESIDUAL_ALL_CORRECT: int((rates >= 1).sum()),
                                 RESIDUAL_ALL_WRONG: int((rates <= 0).sum())})
                progress.write(groups=groups, batch_s=time.monotonic() - t0, erpo_update_ms=erpo_ms,
                               statuses=dict(statuses), deadlettered=consumer.stats["deadlettered"],
                               all_correct_groups=residual[RESIDUAL_ALL_CORRECT],
                               all_wrong_groups=residual[RESIDUAL_ALL_WRONG],
                               temperature_updates=temp_updates, table_prompts=table.height,
                               reactivations=int(table["times_reactivated"].sum()),
                               mean_temperature=float(table["temperature"].mean() or 0.0),
                               max_temperature=float(table["temperature"].max() or 0.0))
        finally:
            if batches and not in_batch:  # never record offsets past results not yet sent
                erpo.snapshot(table, consumer.positions(), snapshot_path)
            consumer.close()
            producer.close()
            progress.close()
            log.info("reward %s stopped after %d groups; statuses %s", wid, groups, dict(statuses))
