"""Reward/verification consumer: trajectories in, scored groups and ERPO temperatures out.

Loop: poll whole groups from the `trajectories` consumer group, verify every completion against its
reference answer in the math-verify process pool (a verifier error or timeout is its own
`verify_status`, never a silent 0), score the groups (pass rate, residual kind), apply the batch to
the ERPO prompt-history table (`erpo.HistoryStore`, one vectorised update per batch), send one
ScoredTrajectory message per group and one TemperatureUpdate per changed prompt (key =
prompt_id), flush; every `erpo.snapshot_every` batches snapshot the table with the consumed offsets, then
commit those offsets (commits never run ahead of the snapshot).

Every group is checked first (`pipeline.validate`): an invalid one goes to the dead-letter topic
with its reason and the rest of its message goes on. A group whose ticket this worker has already
scored (a ticket re-delivered to a second rollout, or re-issued by a resumed learner) is skipped,
so the ERPO table counts each ticket once; the ids are kept with the snapshot.

On start the service loads the snapshot and seeks to its offsets, so the batches after it are
applied to the table exactly once more (their scored groups are sent again; the learner ignores
tickets it has decided).

Metrics (Prometheus, see `services.metrics`): verdicts by status, verification and ERPO update
latency, groups by residual kind and the residual fractions of the latest batch, reactivations,
temperature updates by reason, table size, prompts whose latest group was residual, and the
distribution of the table's temperatures (a gauge histogram).
"""

from __future__ import annotations

import logging
import time
from collections import Counter, OrderedDict

import numpy as np
import polars as pl

from prometheus_client import REGISTRY, Gauge, Histogram
from prometheus_client import Counter as PromCounter
from prometheus_client.core import GaugeHistogramMetricFamily

from pipeline import erpo
from pipeline.config import RunConfig
from pipeline.scoring import RESIDUAL_ALL_CORRECT, RESIDUAL_ALL_WRONG, score
from pipeline.transport import Consumer, Producer, topic_name
from pipeline.verifier import VerifierPool
from pipeline.validate import check_groups
from schemas import SCORED_TRAJECTORY, TEMPERATURE_UPDATE, Columns, concat
from services import metrics
from services.common import JsonlWriter, StopFlag, erpo_rule, worker_id

log = logging.getLogger(__name__)

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
VERDICTS = PromCounter("rlstream_reward_verdicts_total", "Verified completions by status.", ["status"])
VERIFY_SECONDS = Histogram("rlstream_reward_verify_seconds", "Verification time of one batch.",
                           buckets=LATENCY_BUCKETS)
GROUPS = PromCounter("rlstream_erpo_groups_total",
                     "Scored groups by residual kind (all_correct, all_wrong, informative).", ["kind"])
RESIDUAL_FRACTION = Gauge("rlstream_erpo_residual_fraction",
                          "Fraction of the latest batch's groups that were residual, by kind.", ["kind"])
RESIDUAL_PROMPTS = Gauge("rlstream_erpo_residual_prompts",
                         "Prompts whose latest group was residual, by kind.", ["kind"])
REACTIVATIONS = PromCounter("rlstream_erpo_reactivations_total",
                            "Informative groups right after an all-correct group of the same prompt.")
TEMP_UPDATES = PromCounter("rlstream_erpo_temperature_updates_total",
                           "Temperature updates sent, by reason.", ["reason"])
GROUP_FATES = PromCounter("rlstream_reward_groups_total",
                          "Trajectory groups received, by fate: scored, duplicate (ticket already scored), "
                          "invalid (dead-lettered).", ["fate"])
TABLE_PROMPTS = Gauge("rlstream_erpo_table_prompts", "Prompts in the ERPO history table.")
UPDATE_SECONDS = Histogram("rlstream_erpo_update_seconds", "Time to apply one batch to the ERPO table.",
                           buckets=LATENCY_BUCKETS)
TEMPERATURE_BUCKETS = (0.5, 0.75, 1.0, 1.1, 1.2, 1.3, 1.4, 1.5, 1.75, 2.0)


class TemperatureDistribution:
    """`rlstream_erpo_prompt_temperature`: a gauge histogram of the table's temperatures (how
    many prompts currently sit at or below each bound), refreshed by the service loop."""

    def __init__(self) -> None:
        self._buckets: list[tuple[str, float]] = []
        self._sum = 0.0

    def refresh(self, temperatures: np.ndarray) -> None:
        counts = np.searchsorted(np.sort(temperatures), TEMPERATURE_BUCKETS, side="right")
        self._buckets = [(str(b), float(c)) for b, c in zip(TEMPERATURE_BUCKETS, counts)]
        self._buckets.append(("+Inf", float(temperatures.size)))
        self._sum = float(temperatures.sum(dtype=np.float64))

    def collect(self):
        yield GaugeHistogramMetricFamily("rlstream_erpo_prompt_temperature",
                                         "Prompts of the ERPO table by current temperature.",
                                         buckets=self._buckets or [("+Inf", 0.0)], gsum_value=self._sum)


TEMPERATURES = TemperatureDistribution()
REGISTRY.register(TEMPERATURES)


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
    snap, offsets = erpo.load_snapshot(snapshot_path)
    store = erpo.HistoryStore(rule, snap)
    if offsets:
        consumer.seek(offsets)
        log.info("resumed ERPO table of %d prompts from %s at %s", len(store), snapshot_path, offsets)
    # Tickets whose group this worker applied, oldest first: a second group for one of them (a
    # ticket re-delivered to another rollout, or re-issued by a resumed learner) is not scored
    # again, so the ERPO table counts every ticket once.
    seen: OrderedDict[str, None] = OrderedDict.fromkeys(erpo.snapshot_seen_tickets(snapshot_path))

    def admit(d) -> list[Columns]:
        """The valid groups of a delivery whose ticket is new; invalid ones are dead-lettered."""
        groups, rejected = check_groups(d.columns)
        for r in rejected:
            consumer.dead_letter(d, r.columns, r.code, r.reason)
            GROUP_FATES.labels("invalid").inc()
        fresh = []
        for group in groups:
            tid = str(group["ticket_id"][0])
            if tid in seen:
                GROUP_FATES.labels("duplicate").inc()
                continue
            seen[tid] = None
            if len(seen) > rc.dedup_window:
                seen.popitem(last=False)
            GROUP_FATES.labels("scored").inc()
            fresh.append(group)
        return fresh

    def save() -> None:
        """Snapshot the table with the offsets it covers, then commit exactly those offsets: the
        group's commits never run ahead of a snapshot, so a worker that restarts (or takes over
        partitions) without one re-reads from where the table it has stops."""
        positions = consumer.positions()
        erpo.snapshot(store.to_frame(), positions, snapshot_path, list(seen))
        consumer.commit_offsets(positions)

    metrics.serve(cfg, "reward", str(worker_index))
    reactivated = int(store.column("times_reactivated").sum())
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
                scored, sources = [], []
                for d in deliveries:
                    fresh = admit(d)
                    if not fresh:
                        continue
                    cols = concat(fresh)
                    verdicts = pool.verify(list(zip(cols["completion_text"], cols["answer"])))
                    scored.append(score(cols, verdicts))
                    sources.append(d)
                    batch_statuses = Counter(v.status.value for v in verdicts)
                    statuses.update(batch_statuses)
                    for status, n in batch_statuses.items():
                        VERDICTS.labels(status).inc(n)
                if scored:
                    t_erpo = time.monotonic()
                    VERIFY_SECONDS.observe(t_erpo - t0)
                    batch_groups = group_rows(scored)
                    updates = store.apply(batch_groups, time.time())
                    erpo_s = time.monotonic() - t_erpo
                    UPDATE_SECONDS.observe(erpo_s)
                    for d, cols in zip(sources, scored):
                        producer.send(scored_topic, SCORED_TRAJECTORY, cols, key=d.key)
                    for i in range(updates.height):
                        producer.send(temp_topic, TEMPERATURE_UPDATE, update_columns(updates, i),
                                      key=str(updates["prompt_id"][i]).encode())
                producer.flush()  # scored groups, temperatures and dead letters
                batches += 1
                if batches % cfg.erpo.snapshot_every == 0:
                    save()
                in_batch = False
                if not scored:  # only duplicates and dead letters
                    continue
                groups += batch_groups.height
                temp_updates += updates.height
                rates = batch_groups["pass_rate"].to_numpy()
                kinds = {RESIDUAL_ALL_CORRECT: int((rates >= 1).sum()), RESIDUAL_ALL_WRONG: int((rates <= 0).sum())}
                kinds["informative"] = rates.size - kinds[RESIDUAL_ALL_CORRECT] - kinds[RESIDUAL_ALL_WRONG]
                residual.update(kinds)
                for kind, n in kinds.items():
                    GROUPS.labels(kind).inc(n)
                    RESIDUAL_FRACTION.labels(kind).set(n / rates.size)
                for reason, n in updates["reason"].value_counts().iter_rows():
                    TEMP_UPDATES.labels(reason).inc(n)
                now_reactivated = int(store.column("times_reactivated").sum())
                REACTIVATIONS.inc(now_reactivated - reactivated)
                reactivated = now_reactivated
                temps = store.column("temperature")
                TABLE_PROMPTS.set(len(store))
                RESIDUAL_PROMPTS.labels(RESIDUAL_ALL_CORRECT).set(int(store.column("was_residual").sum()))
                RESIDUAL_PROMPTS.labels(RESIDUAL_ALL_WRONG).set(int((store.column("all_wrong_streak") > 0).sum()))
                TEMPERATURES.refresh(temps)
                progress.write(groups=groups, batch_s=time.monotonic() - t0, erpo_update_ms=erpo_s * 1000,
                               statuses=dict(statuses), deadlettered=consumer.stats["deadlettered"],
                               all_correct_groups=residual[RESIDUAL_ALL_CORRECT],
                               all_wrong_groups=residual[RESIDUAL_ALL_WRONG],
                               temperature_updates=temp_updates, table_prompts=len(store),
                               reactivations=reactivated,
                               mean_temperature=float(temps.mean()) if temps.size else 0.0,
                               max_temperature=float(temps.max()) if temps.size else 0.0)
        finally:
            if batches and not in_batch:  # never record offsets past results not yet sent
                save()
            consumer.close()
            producer.close()
            progress.close()
            log.info("reward %s stopped after %d groups; statuses %s", wid, groups, dict(statuses))
