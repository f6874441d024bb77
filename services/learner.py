"""Learner: paces the run with prompt tickets, trains on scored groups, publishes weights.

Loop (rank 0, `Lead`):
1. Issue tickets while those outstanding (issued, not yet decided) stay within the staleness
   budget's capacity (`pipeline.flow.staleness.StalenessBudget`). Every ticket is under a lease
   (`pipeline.flow.tickets`): one whose group has not come back in time is issued again, same id, next
   attempt, so a lost message or a dead worker costs one lease, never the run. The position reached
   and the attempts are logged after every flush (`IssueLog`) for a resumed learner.
2. Poll scored groups, check them (`pipeline.flow.validate`) and triage each (`pipeline.flow.intake`):
   forged, unknown or future-version groups are dead-lettered; every ticket gets exactly one fate in
   the ledger (`pipeline.flow.ledger`); a later group of a decided ticket is a ``duplicate``; groups with
   lag > ``staleness.max_versions`` are ``dropped_stale``.
3. Every ``groups_per_step`` groups: the learning step (`pipeline.rl.learn`).
4. Every ``sync_every`` steps: publish the weights (gathered across ranks) as a new policy version
   (`services.learner_publish`).
5. Every ``checkpoint.every`` steps: save model, optimiser and the learner state together
   (`pipeline.rl.checkpoints`; consumed offsets only up to the oldest group not yet trained), then
   commit those offsets. A learner started on a run folder with a checkpoint resumes from it
   (``resume = "auto"``), marks the ledger as resumed, seeks to the saved offsets and announces the
   restored weights under a version above any announced before.
6. After the final step, drain: wait (``drain_timeout_s``, leases running) for the outstanding
   tickets' groups and record them as ``unused``, so every issued ticket has a fate.

The model trains under a backend of `pipeline.rl.trainer` (DeepSpeed or plain torch). With several
ranks rank 0 does all of the above and broadcasts each batch to the others
(`pipeline.rl.trainer.BatchChannel`); every rank trains on its share of the groups.
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace

import numpy as np
import torch

from pipeline.config import RunConfig
from pipeline.data.tasks import train_problems
from pipeline.flow.commit import Committer
from pipeline.flow.intake import DEAD_LETTER, QUEUED, triage
from pipeline.flow.ledger import Ledger, ledger_path
from pipeline.flow.staleness import StalenessBudget
from pipeline.flow.tickets import IssueLog, TicketBook, TicketSource, ticket_columns
from pipeline.flow.validate import Limits, check_groups
from pipeline.rl.checkpoints import (LearnerState, OffsetTracker, after_step, newest_published_version,
                                     restore_learner, save_checkpoint)
from pipeline.rl.learn import bf16_native, resolved_autocast, train_step
from pipeline.rl.trainer import BatchChannel, Trainer, make_trainer
from pipeline.transport.consumer import Consumer, Delivery
from pipeline.transport.producer import Producer
from pipeline.transport.topics import topic_name
from schemas import PROMPT_TICKET, Columns
from services.common import JsonlWriter, StopFlag, erpo_rule, load_learner_models, set_threads, worker_id
from services.learner_metrics import (CHECKPOINT_SECONDS, GENERATION_SPEED, GROUPS, IN_FLIGHT, LAG, LEASE, REISSUED,
                                      TICKETS, observe_step, progress_row)
from services.learner_publish import Publisher
from services.metrics import serve

log = logging.getLogger(__name__)

def run(cfg: RunConfig) -> None:
    lc = cfg.learner
    rule = erpo_rule(cfg)
    set_threads(lc.torch_threads)
    torch.manual_seed(cfg.seed)
    model, ref_model, tokenizer = load_learner_models(cfg)
    limits = Limits(vocab_size=int(model.config.vocab_size),
                    max_tokens=getattr(model.config, "max_position_embeddings", None))
    trainer = make_trainer(model, lc)
    if ref_model is not None:
        ref_model.to(trainer.device)  # the frozen reference computes beside the policy (a GPU learner's GPU)
    precision = resolved_autocast(lc.autocast, trainer.device)
    log.info("learner matmuls: %s (learner.autocast = %r)", "bfloat16 autocast" if precision == "bfloat16" else "fp32",
             lc.autocast)
    if precision == "bfloat16" and not bf16_native(trainer.device):
        log.warning("learner.autocast = \"bfloat16\" on a %s without native bf16 matrix instructions (oneDNN reports "
                    "none: no AVX512-BF16 or AMX): torch falls back to a reference kernel, several times slower than "
                    "fp32. Use learner.autocast = \"auto\" or \"off\" here.", trainer.device)
    if lc.groups_per_step < lc.mini_batches * trainer.world_size:
        raise ValueError(f"learner.groups_per_step ({lc.groups_per_step}) must be at least mini_batches x ranks "
                         f"({lc.mini_batches} x {trainer.world_size}) so every rank gets a group in every update")
    state, resumed = restore_learner(cfg, trainer)
    # Weights announced before (a previous life of this run) are replaced at once by the restored or
    # initial ones, under a version above any announced so far.
    announce_first = resumed or newest_published_version(cfg) > 0
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
            due = after_step(state.step, lc)  # rank 0 decides the same (`Lead.train_ready`)
            if due.weights:
                trainer.full_state_dict()  # a collective under ZeRO-3; rank 0 publishes or exports it
            if due.checkpoint:
                save_checkpoint(cfg, trainer, state)
    else:
        Lead(cfg, trainer, state, learn, channel, limits, resumed).run(announce_first)
    trainer.close()


class Lead:
    """Rank 0: tickets and their leases, consumption, staleness, publication, checkpoints, commits,
    the ledger."""

    def __init__(self, cfg: RunConfig, trainer: Trainer, state: LearnerState, learn, channel: BatchChannel,
                 limits: Limits, resumed: bool) -> None:
        self.cfg, self.lc, self.trainer, self.state = cfg, cfg.learner, trainer, state
        self.learn, self.channel = learn, channel
        self.stop = StopFlag()
        self.staleness = StalenessBudget.of(self.lc)
        self.capacity = self.staleness.capacity
        tc = self.lc.tickets
        self.book = TicketBook(TicketSource(train_problems(cfg), cfg.seed), tc.lease_floor_s, tc.lease_p99_factor,
                               tc.max_attempts, adopt_window=4 * self.capacity,
                               ticket_tokens=cfg.rollout.group_size * cfg.rollout.max_new_tokens,
                               first_group_s=tc.first_group_s)
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
        self.committer = Committer(self.consumer, [self.producer])  # dead letters flushed before each commit
        self.metrics_address = serve(cfg, "learner", "0")
        self.progress = JsonlWriter(cfg.workdir / "progress" / "learner.jsonl")
        self.prompts_topic = topic_name(cfg.name, "prompts")
        self.publisher = Publisher(cfg, self.producer)
        self.offsets = OffsetTracker()
        self.ready: list[tuple[Columns, tuple[str, int, int]]] = []
        self.lags: list[int] = []

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
        """Check, de-duplicate and triage the groups of one delivery (`pipeline.flow.intake`); queue the
        trainable ones."""
        state, lc = self.state, self.lc
        key = (d.topic, d.partition, d.offset)
        groups, rejected = check_groups(d.columns, self.limits)
        for r in rejected:
            # Dead-lettered; the ticket stays outstanding: a valid group (or its next attempt) can
            # still come, and a group that anyone could forge must not decide a ticket.
            self.consumer.dead_letter(d, r.columns, r.code, r.reason)
            state.invalid += 1
        for group in groups:
            # Once one group is queued or decided, a failure must dead-letter only its own group.
            with self.consumer.guard_part(d, group):
                self.accept_group(d, key, group, draining)

    def accept_group(self, d: Delivery, key: tuple, group, draining: bool) -> None:
        state, lc = self.state, self.lc
        out = triage(group, book=self.book, learner_version=state.version, now=time.monotonic(),
                     draining=draining, offline=lc.offline, staleness=self.staleness,
                     dynamic_sampling=lc.dynamic_sampling)
        if out.fate == DEAD_LETTER:
            self.consumer.dead_letter(d, group, out.code, out.reason)
            return
        state.tally(out.fate)
        if out.received:
            self.lags.append(out.lag)
            if not lc.offline:
                LAG.observe(out.lag)
        if out.fate == QUEUED:
            self.offsets.add(key, 1)
            self.ready.append((group, key))
        else:
            self.decide(group, out.fate, out.reason, out.lag)

    def checkpoint(self) -> None:
        """Flush the dead letters, save the checkpoint, then commit the offsets it holds
        (`pipeline.flow.commit`)."""
        state = self.state
        t0 = time.monotonic()

        def save(positions: dict[tuple[str, int], int]) -> dict[tuple[str, int], int]:
            state.offsets = self.offsets.committable(positions)
            state.ticket_position = self.book.source.position
            state.outstanding = self.book.attempts()
            state.seen = list(self.book.decided)
            state.reissued = self.book.reissued
            path = save_checkpoint(self.cfg, self.trainer, state)
            log.info("checkpoint %s (%.1fs)", path, time.monotonic() - t0)
            return state.offsets

        self.committer.commit(save)
        CHECKPOINT_SECONDS.observe(time.monotonic() - t0)

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
                        f"no valid group after {t.attempt + 1} attempts (learner.tickets.max_attempts)")
        if again:
            REISSUED.inc(len(again))
            speed = self.book.speed.tokens_per_s()
            log.warning("%d tickets had no group within their lease (generation %s); issued again (e.g. %s attempt "
                        "%d)", len(again), f"at {speed:.0f} tokens/s" if speed else "speed not measured yet",
                        again[0].ticket_id, again[0].attempt)
        for t in new + again:
            self.producer.send(self.prompts_topic, PROMPT_TICKET, ticket_columns(t, self.state.version),
                               key=t.problem.prompt_id.encode())
        self.producer.flush()
        if new or again:
            TICKETS.inc(len(new))
            self.issue_log.write(self.book.source.position, self.book.attempts())
        LEASE.set(self.book.lease_s(self.book.awaited() + 1))
        GENERATION_SPEED.set(self.book.speed.tokens_per_s() or 0.0)
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
            due = after_step(state.step, lc)  # the other ranks decide the same (`run`)
            weights = self.trainer.full_state_dict() if due.weights else None
            if due.publish:
                state.version += 1
                self.publisher.announce(weights, state.version, state.step)
            if due.export:
                self.publisher.export(weights, state.step)
            if due.checkpoint:
                self.checkpoint()
            observe_step(state, metrics, step_s)
            self.progress.write(**progress_row(state, self.book, self.lags, step_s, time.monotonic() - t_start,
                                               metrics))
            self.lags.clear()
            log.info("step %d v%d reward=%.3f loss=%.4f dropped=%d", state.step, state.version,
                     metrics["reward"], metrics["loss"], state.dropped)

    def run(self, announce_first: bool) -> None:
        state, lc = self.state, self.lc
        log.info("learner ready: %d ranks, %s backend, capacity %d groups in flight, lease >= %.0f s, metrics %s",
                 self.trainer.world_size, lc.backend, self.capacity, lc.tickets.lease_floor_s, self.metrics_address)
        if announce_first:
            # Versions must keep rising past anything announced before, and rollouts should sample
            # from these weights at once.
            state.version = max(state.version, newest_published_version(self.cfg)) + 1
            self.publisher.announce(self.trainer.full_state_dict(), state.version, state.step)
        t_start = time.monotonic()
        drain_until = None
        try:
            while not self.stop:
                draining = state.step >= lc.total_steps
                if draining and drain_until is None:
                    for group, _ in self.ready:
                        self.decide(group, "unused", "the run had all its steps")
                    self.ready.clear()
                    drain_until = time.monotonic() + lc.tickets.drain_timeout_s
                    log.info("final step done: draining %d outstanding tickets (up to %.0f s)",
                             len(self.book.outstanding), lc.tickets.drain_timeout_s)
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
                                f"no scored group within learner.tickets.drain_timeout_s={lc.tickets.drain_timeout_s}")
        finally:
            self.channel.send(None)
            self.consumer.close()
            self.producer.close()
            self.progress.close()
            self.ledger.close()
            log.info("learner stopped at step %d (policy v%d)", state.step, state.version)
