"""Reward/verification consumer: trajectories in, scored groups and ERPO temperatures out.

Loop: poll whole groups from the `trajectories` consumer group, verify every completion against its
reference answer in the math-verify process pool (a verifier error or timeout is its own
`verify_status`, never a silent 0), score the groups (pass rate), apply the batch to
the ERPO prompt-history table of each group's partition (`pipeline.erpo.partitions`: a worker
keeps one table per `trajectories` partition it owns, restored from that partition's snapshot when
the group assigns it and snapshotted when it is revoked, so several workers never split a
prompt's history), send one ScoredTrajectory message per group and one TemperatureUpdate per
changed prompt (key = prompt_id), flush; a partition is snapshotted with its offset every
`erpo.snapshot_every` batches that touched it, then that offset is committed (commits never run
ahead of a snapshot).

Every group is checked first (`pipeline.flow.validate`): an invalid one goes to the dead-letter topic
with its reason and the rest of its message goes on; a record whose processing raises is
dead-lettered whole. A group whose (ticket, attempt) this partition has scored already is skipped;
a later attempt of a ticket is scored and sent (its first attempt's group may have been lost) but
not applied to the table, so ERPO counts every ticket once.

Metrics (Prometheus, see `services.metrics`): verdicts by status, verification and ERPO update
latency, groups by residual kind and the residual fractions of the latest batch, reactivations,
temperature updates by reason, table size, prompts whose latest group was residual, and the
distribution of the table's temperatures (a gauge histogram).
"""

from __future__ import annotations

import logging
import time
from collections import Counter

import numpy as np
import polars as pl

from prometheus_client import REGISTRY, Gauge, Histogram
from prometheus_client import Counter as PromCounter
from prometheus_client.core import GaugeHistogramMetricFamily

from pipeline.config import RunConfig
from pipeline.erpo.partitions import PartitionedHistory
from pipeline.erpo.store import GROUP_SCHEMA, UPDATE_SCHEMA
from pipeline.failpoints import failpoint
from pipeline.flow.commit import Committer
from pipeline.flow.validate import check_groups
from pipeline.transport.consumer import Consumer, Delivery
from pipeline.transport.producer import Producer
from pipeline.transport.topics import topic_name
from pipeline.verify.residual import ALL_CORRECT, ALL_WRONG, INFORMATIVE, residual
from pipeline.verify.scoring import score
from pipeline.verify.verifier import VerifierPool
from schemas import SCORED_TRAJECTORY, TEMPERATURE_UPDATE, Columns, concat, split_groups
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
                          "Trajectory groups received, by fate: scored (and applied to ERPO's table), resent (a "
                          "later attempt of a ticket the table counted: scored and sent only), duplicate (this "
                          "attempt was scored already), invalid (dead-lettered).", ["fate"])
PARTITIONS = Gauge("rlstream_reward_partitions", "Trajectory partitions (and their ERPO state) this worker owns.")
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


def group_frame(groups: list[Columns]) -> pl.DataFrame:
    """One row per scored group (prompt_id, pass_rate, policy_version), in order."""
    return pl.DataFrame({"prompt_id": [str(g["prompt_id"][0]) for g in groups],
                         "pass_rate": [float(g["group_pass_rate"][0]) for g in groups],
                         "policy_version": [int(g["policy_version"][0]) for g in groups]}, schema=GROUP_SCHEMA)


def update_columns(updates: pl.DataFrame, row: int) -> Columns:
    """TemperatureUpdate columns of one row of a `pipeline.erpo.store.HistoryStore.apply` result."""
    one = updates.slice(row, 1)
    return {name: one[name].to_numpy() for name in UPDATE_SCHEMA}


class Reward:
    """One reward worker: its consumer, its partitions' ERPO state, the verifier pool."""

    def __init__(self, cfg: RunConfig, worker_index: int) -> None:
        self.cfg, self.rc = cfg, cfg.reward
        self.rule = erpo_rule(cfg)
        self.wid, self.worker_index = worker_id(), worker_index
        self.history = PartitionedHistory(self.rule, cfg.workdir / "erpo", self.rc.dedup_window,
                                          cfg.erpo.snapshot_every)
        self.producer = Producer(cfg.kafka, client_id=f"{cfg.name}-reward-{self.wid}")
        self.consumer = Consumer(cfg.kafka, cfg.name, ["trajectories"], group_id=f"{cfg.name}.reward",
                                 client_id=f"{cfg.name}-reward-{self.wid}", deadletter=self.producer,
                                 on_assign=self._on_assign, on_revoke=self._on_revoke)
        self.committer = Committer(self.consumer, [self.producer], flushed_failpoint="reward.produced")
        self.scored_topic = topic_name(cfg.name, "scored")
        self.temp_topic = topic_name(cfg.name, "temperature")
        self.progress = JsonlWriter(cfg.workdir / "progress" / f"reward-{worker_index}.jsonl")
        self.statuses: Counter[str] = Counter()
        self.group_kinds: Counter[str] = Counter()
        self.groups = self.temp_updates = self.reactivations = 0
        self.failed = False
        """A step raised: nothing is snapshotted or committed from here on (see `_on_revoke`)."""

    def _on_assign(self, partitions: list[tuple[str, int]]) -> dict[tuple[str, int], int]:
        """Restore each partition's state from its snapshot and continue from the snapshot's offset."""
        seeks = {key: self.history.assign(key[1]).position for key in partitions}
        PARTITIONS.set(len(self.history.parts))
        return seeks

    def _on_revoke(self, partitions: list[tuple[str, int]]) -> None:
        """Hand the partitions over: snapshot them before another member takes them. Not after a
        failure: the client revokes on close too, and the positions may then be past results that
        were never sent, so the state is dropped unsaved and the next owner redoes those records
        from the last snapshot."""
        if self.failed:
            for _, p in partitions:
                self.history.revoke(p)
        else:
            self._snapshot([p for _, p in partitions], revoke=True)
        PARTITIONS.set(len(self.history.parts))

    def _snapshot(self, partitions: list[int], revoke: bool = False) -> None:
        """Flush the results, snapshot these partitions at their current positions (every record
        before them is applied), then commit exactly those offsets (`pipeline.flow.commit`)."""

        def save(positions: dict[tuple[str, int], int]) -> dict[tuple[str, int], int]:
            offsets = {}
            for p in partitions:
                if p in self.history.parts:
                    key = ("trajectories", p)
                    offsets[key] = positions.get(key, self.history.parts[p].position)
                    self.history.save(p, offsets[key])
                    if revoke:
                        self.history.revoke(p)
            if revoke:
                failpoint("reward.revoke")
            return offsets

        self.committer.commit(save)

    def score_delivery(self, d: Delivery, pool: VerifierPool) -> list[tuple[Columns, bool]]:
        """The delivery's valid, not yet scored groups, scored, each with whether it goes into the
        ERPO table (the ticket's first group); invalid groups are dead-lettered."""
        groups, rejected = check_groups(d.columns)
        for r in rejected:
            self.consumer.dead_letter(d, r.columns, r.code, r.reason)
            GROUP_FATES.labels("invalid").inc()
        fresh = []
        for g in groups:
            pid = str(g["prompt_id"][0])
            if d.key is None or d.key != pid.encode():
                # A prompt's ERPO history lives in the partition its key hashes to: a group under
                # another key would start a second history of its prompt elsewhere.
                self.consumer.dead_letter(d, g, "miskeyed", f"miskeyed: record key {d.key!r} is not the group's "
                                                            f"prompt_id {pid!r}")
                GROUP_FATES.labels("invalid").inc()
            elif (home := self.consumer.home_partition(d.topic, d.key)) is not None and home != d.partition:
                # The right key in the wrong partition (a producer that chose the partition): the
                # same split history.
                self.consumer.dead_letter(d, g, "miskeyed", f"miskeyed: key {d.key!r} belongs in partition {home}, "
                                                            f"the record was in partition {d.partition}")
                GROUP_FATES.labels("invalid").inc()
            elif self.history.scored_already(d.partition, str(g["ticket_id"][0]), int(g["attempt"][0])):
                GROUP_FATES.labels("duplicate").inc()
            else:
                fresh.append(g)
        if not fresh:
            return []
        cols = concat(fresh)
        verdicts = pool.verify(list(zip(cols["completion_text"], cols["answer"])))
        scored = score(cols, verdicts, overlong=self.cfg.rollout.overlong)
        batch_statuses = Counter(scored["verify_status"])
        self.statuses.update(batch_statuses)
        for status, n in batch_statuses.items():
            VERDICTS.labels(status).inc(n)
        out = []
        for g in split_groups(scored):
            fate = self.history.classify(d.partition, str(g["ticket_id"][0]), int(g["attempt"][0]))
            GROUP_FATES.labels("scored" if fate == "apply" else "resent").inc()
            out.append((g, fate == "apply"))
        return out

    def step(self, pool: VerifierPool) -> None:
        deliveries = self.consumer.poll(timeout_ms=self.rc.poll_timeout_ms)
        if not deliveries:
            return
        t0 = time.monotonic()
        to_send: list[tuple[Delivery, Columns]] = []
        to_apply: dict[int, list[Columns]] = {}
        for d in deliveries:
            with self.consumer.guard(d):
                for g, apply in self.score_delivery(d, pool):
                    to_send.append((d, g))
                    if apply:
                        to_apply.setdefault(d.partition, []).append(g)
        t_erpo = time.monotonic()
        VERIFY_SECONDS.observe(t_erpo - t0)
        applied = [self.history.apply(p, group_frame(gs), time.time()) for p, gs in to_apply.items()]
        updates = [u for u, _ in applied]
        reactivated = sum(r for _, r in applied)
        self.reactivations += reactivated
        REACTIVATIONS.inc(reactivated)
        erpo_s = time.monotonic() - t_erpo
        UPDATE_SECONDS.observe(erpo_s)
        for d, g in to_send:
            self.producer.send(self.scored_topic, SCORED_TRAJECTORY, g, key=d.key)
        for u in updates:
            for i in range(u.height):
                self.producer.send(self.temp_topic, TEMPERATURE_UPDATE, update_columns(u, i),
                                   key=str(u["prompt_id"][i]).encode())
        self.history.processed({d.partition for d in deliveries})
        self._snapshot(self.history.due())  # flushes scored groups, temperatures and dead letters
        if to_apply:
            self.observe([g for gs in to_apply.values() for g in gs], updates, time.monotonic() - t0, erpo_s)

    def observe(self, applied: list[Columns], updates: list, batch_s: float, erpo_s: float) -> None:
        batch_groups = group_frame(applied)
        n_updates = sum(u.height for u in updates)
        self.groups += batch_groups.height
        self.temp_updates += n_updates
        all_correct, all_wrong = residual(batch_groups["pass_rate"].to_numpy())
        kinds = {ALL_CORRECT: int(all_correct.sum()), ALL_WRONG: int(all_wrong.sum())}
        kinds[INFORMATIVE] = all_correct.size - kinds[ALL_CORRECT] - kinds[ALL_WRONG]
        self.group_kinds.update(kinds)
        for kind, n in kinds.items():
            GROUPS.labels(kind).inc(n)
            RESIDUAL_FRACTION.labels(kind).set(n / all_correct.size)
        for u in updates:
            for reason, n in u["reason"].value_counts().iter_rows():
                TEMP_UPDATES.labels(reason).inc(n)
        temps = self.history.column("temperature")
        TABLE_PROMPTS.set(len(self.history))
        RESIDUAL_PROMPTS.labels(ALL_CORRECT).set(int(self.history.column("was_residual").sum()))
        RESIDUAL_PROMPTS.labels(ALL_WRONG).set(int((self.history.column("all_wrong_streak") > 0).sum()))
        TEMPERATURES.refresh(temps)
        self.progress.write(groups=self.groups, batch_s=batch_s, erpo_update_ms=erpo_s * 1000,
                            statuses=dict(self.statuses), deadlettered=self.consumer.stats["deadlettered"],
                            all_correct_groups=self.group_kinds[ALL_CORRECT],
                            all_wrong_groups=self.group_kinds[ALL_WRONG],
                            temperature_updates=self.temp_updates, table_prompts=len(self.history),
                            partitions=sorted(self.history.parts), reactivations=self.reactivations,
                            mean_temperature=float(temps.mean()) if temps.size else 0.0,
                            max_temperature=float(temps.max()) if temps.size else 0.0)

    def run(self) -> None:
        stop = StopFlag()
        metrics.serve(self.cfg, "reward", str(self.worker_index))
        rc = self.rc
        with VerifierPool(rc.verifier_workers, rc.verify_timeout_s, rc.max_chars) as pool:
            log.info("reward %s ready: %d verifier workers, timeout %.1fs, ERPO %s", self.wid,
                     rc.verifier_workers, rc.verify_timeout_s, "on" if self.rule.enabled else "off")
            try:
                while not stop:
                    self.step(pool)
            except BaseException:
                self.failed = True
                raise
            finally:
                if not self.failed:  # hand every partition back with its state (never past results not sent)
                    self._snapshot(sorted(self.history.parts))
                self.consumer.close()  # revokes what it still owns (`_on_revoke`)
                self.producer.close()
                self.progress.close()
                log.info("reward %s stopped after %d groups; statuses %s", self.wid, self.groups,
                         dict(self.statuses))


def run(cfg: RunConfig, worker_index: int = 0) -> None:
    Reward(cfg, worker_index).run()
