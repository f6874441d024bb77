"""Learner: paces the run with prompt tickets, trains on scored groups, publishes weights.

Loop:
1. Issue tickets while the tickets outstanding (issued, not yet decided) stay within
   ``max(1, max_staleness) x groups_per_step``, so producers cannot run ahead of what the learner
   can use without exceeding the staleness bound. This is AReaL's capacity rule,
   ``(max_staleness + 1) x batch``, less one version: our rollout picks up new weights between
   generate calls, so its behaviour version trails the learner's by up to one version, and the full
   AReaL budget made about a fifth of all groups arrive one version too stale (measured on the
   demo: 706 of 5,506 groups dropped). Every ticket is under a lease (`pipeline.tickets`): one whose
   group has not come back in time is issued again, same id, next attempt, so a message the broker
   lost or a worker that died holding it costs one lease, never the run. The position reached and
   the attempts are logged after every flush (`IssueLog`), so a resumed learner knows which
   tickets are already on the broker.
2. Poll scored groups and check them (`pipeline.validate`; invalid groups, groups of unknown tickets
   and groups claiming a policy version the learner has not published are dead-lettered; anything
   else one record provokes dead-letters that record). Each ticket gets exactly one fate, written
   to the ledger (`pipeline.ledger`): a second group for a decided ticket (re-delivery, a later
   attempt, a replayed reward batch) is a ``duplicate`` and ignored. A group's lag = learner policy
   version - its behaviour policy version; groups with lag > ``max_staleness`` are dropped
   (``dropped_stale``). With ERPO's `drop_all_wrong`, all-wrong groups are filtered out too.
3. Every ``groups_per_step`` groups: advantages (ERPO's RA: -delta for all-correct groups),
   decoupled PPO loss, optimiser update(s).
4. Every ``sync_every`` steps: publish safetensors weights (fp32, gathered across ranks) as a new
   policy version and announce it.
5. Every ``checkpoint_every`` steps: save model, optimiser and the learner state (counters, ticket
   position, outstanding tickets with their attempts, decided ticket ids, consumed offsets: per
   partition only up to the oldest group not yet trained) together; only then commit those
   offsets. A learner started on a run folder with a checkpoint resumes from it (``resume =
   "auto"``): it restores all of it, marks the ledger as resumed at the checkpoint (never
   truncating it), seeks to the saved offsets and announces the restored weights under a version
   above any announced before.
6. After the final step, drain: wait (``drain_timeout_s``, leases still running) for the
   outstanding tickets' groups and record them as ``unused``, so every issued ticket has a fate.

The model trains under a backend of `pipeline.trainer` (DeepSpeed by default, or plain torch). With
several ranks (`deepspeed`/`torchrun` launcher) rank 0 does all of the above and broadcasts each
batch to the others (`pipeline.trainer.BatchChannel`); every rank trains on its share of the groups.

Elsewhere: the learning step (`pipeline.learn`), tickets and leases (`pipeline.tickets`), the
checkpoint state and offsets (`pipeline.checkpoints`), the ledger (`pipeline.ledger`), metrics
(`services.learner_metrics`). This module is the wiring: `run` and rank 0's loop, `Lead`.
"""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import replace

import numpy as np
import torch

from pipeline.atomic import write_atomic
from pipeline.checkpoints import (
    LEARNER_STATE,
    LearnerState,
    OffsetTracker,
    checkpoint_root,
    latest_checkpoint,
    newest_published_version,
    save_checkpoint,
    start_fresh,
    weights_due,
)
from pipeline.config import RunConfig
from pipeline.erpo import drop_mask
from pipeline.failpoints import failpoint
from pipeline.learn import train_step
from pipeline.losses import KL_TERMS
from pipeline.model import export_pretrained
from pipeline.ledger import Ledger, ledger_path
from pipeline.tasks import train_problems
from pipeline.tickets import IssueLog, TicketBook, TicketSource, ticket_columns
from pipeline.transport import POLICY_KEY, Consumer, Delivery, Producer, topic_name
from pipeline.trainer import BatchChannel, Trainer, make_trainer
from pipeline.validate import Limits, check_groups
from pipeline.weights import publish
from schemas import POLICY_UPDATE, PROMPT_TICKET, Columns
from services.common import JsonlWriter, StopFlag, erpo_rule, initial_policy_path, load_initial_policy, set_threads, worker_id
from services.learner_metrics import (
    CHECKPOINT_SECONDS,
    GROUPS,
    IN_FLIGHT,
    LAG,
    LEASE,
    REISSUED,
    TICKETS,
    observe_step,
)
from services.metrics import serve

log = logging.getLogger(__name__)

SEEN_WINDOW = 20_000
"""Decided ticket ids remembered. A ticket before the issue position that is not outstanding is
decided whether remembered or not; the window is for tickets adopted ahead of the position (at
most about a capacity's worth) and for logs and checkpoints."""
def run(cfg: RunConfig) -> None:
    lc = cfg.learner
    rule = erpo_rule(cfg)
    set_threads(lc.torch_threads)
    torch.manual_seed(cfg.seed)
    model, tokenizer = load_initial_policy(cfg)
    model.train()
    if lc.gradient_checkpointing:
        model.config.use_cache = False
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ref_model = None
    if KL_TERMS[lc.kl].reference:
        ref_model, _ = load_initial_policy(cfg)
        ref_model.eval().requires_grad_(False)
    limits = Limits(vocab_size=int(model.config.vocab_size),
                    max_tokens=getattr(model.config, "max_position_embeddings", None))
    trainer = make_trainer(model, lc)
    if ref_model is not None:
        ref_model.to(trainer.device)  # the frozen reference computes beside the policy (a GPU learner's GPU)
    if lc.groups_per_step < lc.mini_batches * trainer.world_size:
        raise ValueError(f"learner.groups_per_step ({lc.groups_per_step}) must be at least mini_batches x ranks "
                         f"({lc.mini_batches} x {trainer.world_size}) so every rank gets a group in every update")
    state = LearnerState()
    ckpt = latest_checkpoint(cfg) if lc.resume != "fresh" else None
    if lc.resume == "require" and ckpt is None:
        raise FileNotFoundError(f"learner.resume = 'require' but {checkpoint_root(cfg)} holds no checkpoint")
    if ckpt is not None:
        trainer.load(ckpt / "trainer")
        state = LearnerState.from_json((ckpt / LEARNER_STATE).read_text())
        log.info("resumed from %s: step %d, policy v%d", ckpt, state.step, state.version)
    elif lc.resume == "fresh" and trainer.rank == 0:
        aside = start_fresh(cfg)
        if aside is not None:
            log.warning("learner.resume = 'fresh': starting over at step 0; the previous checkpoints and ledger "
                        "were moved to %s", aside)
    # Weights announced before (a previous life of this run) are replaced at once by the restored or
    # initial ones, under a version above any announced so far.
    announce_first = ckpt is not None or newest_published_version(cfg) > 0
    trainer.barrier()
    channel = BatchChannel(trainer)

    def learn(groups: list[Columns]) -> dict[str, float]:
        """Train on one batch and publish/checkpoint when due; the same on every rank."""
        rng = np.random.default_rng([cfg.seed, state.step])  # mini-batch order: a function of the step
        metrics = train_step(trainer, ref_model, groups, lc, rule, tokenizer.pad_token_id, rng, cfg.rollout.overlong)
        state.step += 1
        return metrics

    if trainer.rank != 0:
        if announce_first:
            trainer.full_state_dict()  # rank 0 announces these weights: a collective under ZeRO-3
        while (groups := channel.recv()) is not None:
            learn(groups)
            if any(weights_due(lc, state.step)):
                trainer.full_state_dict()  # a collective under ZeRO-3; rank 0 publishes or exports it
            if state.step % lc.checkpoint_every == 0 or state.step == lc.total_steps:
                save_checkpoint(cfg, trainer, state)
    else:
        Lead(cfg, trainer, state, learn, channel, limits, resumed=ckpt is not None).run(announce_first)
    trainer.close()


class Lead:
    """Rank 0: tickets and their leases, consumption, staleness, publication, checkpoints, commits,
    the ledger."""

    def __init__(self, cfg: RunConfig, trainer: Trainer, state: LearnerState, learn, channel: BatchChannel,
                 limits: Limits, resumed: bool) -> None:
        self.cfg, self.lc, self.trainer, self.state = cfg, cfg.learner, trainer, state
        self.learn, self.channel = learn, channel
        self.rule = erpo_rule(cfg)
        self.stop = StopFlag()
        self.capacity = max(1, self.lc.max_staleness) * self.lc.groups_per_step
        self.book = TicketBook(TicketSource(train_problems(cfg), cfg.seed), self.lc.lease_floor_s,
                               self.lc.lease_p99_factor, self.lc.max_attempts, adopt_window=4 * self.capacity,
                               decided_window=SEEN_WINDOW)
        self.limits = replace(limits, known_prompts=frozenset(p.prompt_id for p in self.book.source.problems))
        self.issue_log = IssueLog(cfg.workdir / "ledger" / "issued.json")
        # The ledger reads as the history of the surviving run: what happened after the checkpoint
        # is redone (the rows stay in the file; `read_ledger` leaves them out after this marker).
        self.ledger = Ledger(ledger_path(cfg.workdir))
        if resumed:
            self.ledger.resume(state.step, "learner restarted from its checkpoint")
        logged, attempts = self.issue_log.read() if resumed else (0, {})
        after = self.book.restore(state.ticket_position, state.outstanding, state.seen, logged, attempts,
                                  time.monotonic())
        if resumed:
            log.info("resume at step %d: %d tickets outstanding (%d issued after the checkpoint)", state.step,
                     len(self.book.outstanding), after)
        wid = worker_id()
        self.producer = Producer(cfg.kafka, client_id=f"{cfg.name}-learner-{wid}")
        self.restore_offsets = dict(state.offsets)
        self.consumer = Consumer(cfg.kafka, cfg.name, ["scored"], group_id=f"{cfg.name}.learner",
                                 client_id=f"{cfg.name}-learner-{wid}", deadletter=self.producer,
                                 on_assign=self._on_assign)
        self.metrics_address = serve(cfg, "learner", "0")
        self.progress = JsonlWriter(cfg.workdir / "progress" / "learner.jsonl")
        self.prompts_topic, self.policy_topic = topic_name(cfg.name, "prompts"), topic_name(cfg.name, "policy")
        self.offsets = OffsetTracker()
        self.ready: list[tuple[Columns, tuple[str, int, int]]] = []
        self.lags: list[int] = []
        # Weights go out in the rollout engine's dtype: a bf16 vLLM gets bf16 (half the bytes to
        # read and hash), everything else the fp32 masters.
        self.publish_dtype = ({"bfloat16": torch.bfloat16, "float16": torch.float16}.get(cfg.rollout.dtype)
                              if cfg.rollout.engine == "vllm" else None)

    def _on_assign(self, partitions: list[tuple[str, int]]) -> dict[tuple[str, int], int]:
        """The checkpoint's offsets, at the first assignment after a (re)start: later assignments
        continue from the group's commits, which are the checkpoints' offsets."""
        seeks = {p: self.restore_offsets.pop(p) for p in partitions if p in self.restore_offsets}
        self.restore_offsets.clear()
        return seeks

    def decide(self, group: Columns, fate: str, reason: str = "", lag: int | None = None) -> None:
        """Record a ticket's fate (trained at the step just done; others at the next step)."""
        tid = str(group["ticket_id"][0])
        if fate != "duplicate":
            self.book.decide(tid)
        GROUPS.labels(fate).inc()
        self.ledger.add({"step": self.state.step if fate == "trained" else self.state.step + 1, "ticket_id": tid,
                         "attempt": int(group["attempt"][0]), "group_id": str(group["group_id"][0]),
                         "prompt_id": str(group["prompt_id"][0]), "fate": fate, "reason": reason, "lag": lag})

    def accept(self, d: Delivery, draining: bool) -> None:
        """Check, de-duplicate and triage the groups of one delivery; queue the trainable ones."""
        state, lc = self.state, self.lc
        key = (d.topic, d.partition, d.offset)
        groups, rejected = check_groups(d.columns, self.limits)
        for r in rejected:
            # Dead-lettered; the ticket stays outstanding: a valid group (or its next attempt) can
            # still come, and a group that anyone could forge must not decide a ticket.
            self.consumer.dead_letter(d, r.columns, r.code, r.reason)
            state.invalid += 1
        for group in groups:
            tid, pid = str(group["ticket_id"][0]), str(group["prompt_id"][0])
            version = int(group["policy_version"][0])
            if version > state.version and not lc.offline:
                self.consumer.dead_letter(d, group, "future_version",
                                          f"invalid_group: future_version: policy_version {version} is ahead of the "
                                          f"learner's v{state.version}")
                continue
            verdict = self.book.arrival(tid, pid, int(group["attempt"][0]), time.monotonic())
            if verdict == "unknown":
                self.consumer.dead_letter(d, group, "unknown_ticket",
                                          f"invalid_group: unknown_ticket: {tid!r} is not a ticket of this run for "
                                          f"prompt {pid!r}")
                continue
            if verdict == "duplicate":
                state.duplicates += 1
                self.decide(group, "duplicate", "ticket already decided or queued")
                continue
            state.received += 1
            lag = state.version - version
            self.lags.append(lag)
            if not lc.offline:
                LAG.observe(lag)
            if draining:
                self.decide(group, "unused", "arrived after the final step", lag)
            elif lag > lc.max_staleness and not lc.offline:
                state.dropped += 1
                self.decide(group, "dropped_stale", f"lag {lag} > max_staleness {lc.max_staleness}", lag)
            elif drop_mask(np.asarray(group["group_pass_rate"][:1]), self.rule)[0]:
                state.filtered += 1  # all-wrong group, DAPO-style dynamic sampling
                self.decide(group, "dropped_all_wrong", "all samples wrong (erpo.drop_all_wrong)", lag)
            else:
                self.book.queue(tid)
                self.offsets.add(key, 1)
                self.ready.append((group, key))

    def export(self, weights: dict[str, torch.Tensor]) -> None:
        """A complete Hugging Face folder of these weights (`pipeline.model.export_pretrained`):
        ``export/step-<N>`` (the newest `keep_checkpoints` kept) and, after the final step,
        ``export/final``."""
        root = self.cfg.workdir / "export"
        t0 = time.monotonic()
        final = self.state.step == self.lc.total_steps
        out = export_pretrained(weights, initial_policy_path(self.cfg),
                                root / ("final" if final else f"step-{self.state.step:08d}"),
                                trust_remote_code=self.cfg.model.trust_remote_code)
        for old in sorted(root.glob("step-*"))[: -self.lc.keep_checkpoints]:
            shutil.rmtree(old, ignore_errors=True)
        log.info("exported %s (%.1fs): loads with transformers and vLLM as it is", out, time.monotonic() - t0)

    def announce(self, weights: dict[str, torch.Tensor] | None = None) -> None:
        state = self.state
        weights = self.trainer.full_state_dict() if weights is None else weights
        pub = publish(weights, self.cfg.workdir / "policies", state.version, self.lc.keep_policies, self.publish_dtype)
        failpoint("learner.publish")
        self.producer.send(self.policy_topic, POLICY_UPDATE, {
            "version": np.array([pub.version], dtype=np.int64),
            "step": np.array([state.step], dtype=np.int64),
            "uri": np.array([pub.uri], dtype=object),
            "sha256": np.array([pub.sha256], dtype=object),
            "dtype": np.array([pub.dtype], dtype=object),
            "created_at": np.array([time.time()], dtype=np.float64),
        }, key=POLICY_KEY)
        self.producer.flush()
        write_atomic(self.cfg.workdir / "final_policy.txt", f"{pub.version} {pub.sha256} {pub.uri}\n")

    def checkpoint(self) -> None:
        state = self.state
        self.producer.flush()  # dead letters of the records these offsets cover
        state.offsets = self.offsets.committable(self.consumer.positions())
        state.ticket_position = self.book.source.position
        state.outstanding = self.book.attempts()
        state.seen = list(self.book.decided)
        state.reissued = self.book.reissued
        t0 = time.monotonic()
        path = save_checkpoint(self.cfg, self.trainer, state)
        self.consumer.commit_offsets(state.offsets)  # only now: the checkpoint holds what they cover
        CHECKPOINT_SECONDS.observe(time.monotonic() - t0)
        log.info("checkpoint %s (%.1fs)", path, time.monotonic() - t0)

    def send_tickets(self, draining: bool) -> None:
        """New tickets within the capacity (not while draining), and the next attempt of every
        ticket whose lease ran out; flushed, then logged."""
        now = time.monotonic()
        needed = (self.lc.total_steps - self.state.step) * self.lc.groups_per_step
        new = [] if draining else self.book.issue(min(self.capacity, needed), now)
        again, abandoned = self.book.expired(now)
        for t in abandoned:
            log.error("ticket %s (prompt %s) given up after %d attempts without a valid group", t.ticket_id,
                      t.problem.prompt_id, t.attempt + 1)
            self.decide({"ticket_id": [t.ticket_id], "attempt": [t.attempt], "group_id": [""],
                         "prompt_id": [t.problem.prompt_id]}, "abandoned",
                        f"no valid group after {t.attempt + 1} attempts (learner.max_attempts)")
        if again:
            REISSUED.inc(len(again))
            log.warning("%d tickets had no group after their %.0f s lease; issued again (e.g. %s attempt %d)",
                        len(again), self.book.lease_s(), again[0].ticket_id, again[0].attempt)
        for t in new + again:
            self.producer.send(self.prompts_topic, PROMPT_TICKET, ticket_columns(t, self.state.version),
                               key=t.problem.prompt_id.encode())
        self.producer.flush()
        if new or again:
            TICKETS.inc(len(new))
            self.issue_log.write(self.book.source.position, self.book.attempts())
        LEASE.set(self.book.lease_s())
        IN_FLIGHT.set(len(self.book.outstanding))

    def train_ready(self, t_start: float) -> None:
        state, lc = self.state, self.lc
        while len(self.ready) >= lc.groups_per_step and state.step < lc.total_steps:
            batch, self.ready = self.ready[: lc.groups_per_step], self.ready[lc.groups_per_step:]
            t0 = time.monotonic()
            groups = [g for g, _ in batch]
            self.channel.send(groups)
            metrics = self.learn(groups)
            step_s = time.monotonic() - t0
            state.trained += len(batch)
            for group, key in batch:
                self.decide(group, "trained", lag=state.version - int(group["policy_version"].min()))
                self.offsets.done(key)
            self.ledger.flush()
            publish_due, export_due = weights_due(lc, state.step)
            weights = self.trainer.full_state_dict() if publish_due or export_due else None
            if publish_due:
                state.version += 1
                self.announce(weights)
            if export_due:
                self.export(weights)
            if state.step % lc.checkpoint_every == 0 or state.step == lc.total_steps:
                self.checkpoint()
            observe_step(state, metrics, step_s)
            elapsed = time.monotonic() - t_start
            lags = self.lags
            self.progress.write(step=state.step, version=state.version, step_s=step_s,
                                elapsed_s=elapsed, issued=self.book.source.position, received=state.received,
                                dropped=state.dropped, filtered=state.filtered, duplicates=state.duplicates,
                                invalid=state.invalid, reissued=self.book.reissued,
                                in_flight=len(self.book.outstanding),
                                lag_mean=float(np.mean(lags)) if lags else 0.0,
                                lag_max=max(lags) if lags else 0, groups_per_s=state.received / elapsed,
                                **metrics)
            lags.clear()
            log.info("step %d v%d reward=%.3f loss=%.4f dropped=%d", state.step, state.version,
                     metrics["reward"], metrics["loss"], state.dropped)

    def run(self, announce_first: bool) -> None:
        state, lc = self.state, self.lc
        log.info("learner ready: %d ranks, %s backend, capacity %d groups in flight, lease >= %.0f s, metrics %s",
                 self.trainer.world_size, lc.backend, self.capacity, lc.lease_floor_s, self.metrics_address)
        if announce_first:
            # Versions must keep rising past anything announced before, and rollouts should sample
            # from these weights at once.
            state.version = max(state.version, newest_published_version(self.cfg)) + 1
            self.announce()
        t_start = time.monotonic()
        drain_until = None
        try:
            while not self.stop:
                draining = state.step >= lc.total_steps
                if draining and drain_until is None:
                    for group, _ in self.ready:
                        self.decide(group, "unused", "the run had all its steps")
                    self.ready.clear()
                    drain_until = time.monotonic() + lc.drain_timeout_s
                    log.info("final step done: draining %d outstanding tickets (up to %.0f s)",
                             len(self.book.outstanding), lc.drain_timeout_s)
                if draining and (not self.book.outstanding or time.monotonic() >= drain_until):
                    break
                self.send_tickets(draining)
                for d in self.consumer.poll(timeout_ms=lc.poll_timeout_ms):
                    with self.consumer.guard(d):
                        self.accept(d, draining)
                self.ledger.flush()
                self.train_ready(t_start)
            if drain_until is not None:
                for tid in list(self.book.outstanding):
                    self.decide({"ticket_id": [tid], "attempt": [self.book.outstanding[tid].attempt],
                                 "group_id": [""], "prompt_id": [""]}, "unresolved",
                                f"no scored group within learner.drain_timeout_s={lc.drain_timeout_s}")
        finally:
            self.channel.send(None)
            self.consumer.close()
            self.producer.close()
            self.progress.close()
            self.ledger.close()
            log.info("learner stopped at step %d (policy v%d)", state.step, state.version)
