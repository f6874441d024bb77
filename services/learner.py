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
batch to the others; every rank trains on its share of the groups.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from prometheus_client import Counter, Gauge, Histogram

from pipeline.atomic import fsync_dir, write_atomic
from pipeline.config import LearnerConfig, RunConfig
from pipeline.erpo import drop_mask
from pipeline.failpoints import failpoint
from pipeline.learn import train_step
from pipeline.model import export_pretrained
from pipeline.ledger import Ledger, ledger_path
from pipeline.tasks import Problem, arithmetic_problems, load_problems
from pipeline.tickets import IssueLog, Ticket, TicketBook, TicketSource
from pipeline.transport import POLICY_KEY, Consumer, Delivery, Producer, topic_name
from pipeline.trainer import Trainer, make_trainer
from pipeline.validate import Limits, check_groups
from pipeline.weights import publish, published_versions
from schemas import (
    POLICY_UPDATE,
    PROMPT_TICKET,
    SCORED_TRAJECTORY,
    Columns,
    concat,
    decode,
    encode,
    headers_for,
    split_groups,
)
from services.common import JsonlWriter, StopFlag, erpo_rule, initial_policy_path, load_initial_policy, set_threads, worker_id
from services.metrics import serve

log = logging.getLogger(__name__)

LEARNER_STATE = "learner.json"
SEEN_WINDOW = 20_000
"""Decided ticket ids remembered. A ticket before the issue position that is not outstanding is
decided whether remembered or not; the window is for tickets adopted ahead of the position (at
most about a capacity's worth) and for logs and checkpoints."""
STEP_SECONDS = Histogram("rlstream_learner_step_seconds", "Wall time of one training step.",
                         buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120))
STEP = Gauge("rlstream_learner_step", "Training steps done.")
VERSION = Gauge("rlstream_learner_policy_version", "Newest policy version published.")
TOKENS = Counter("rlstream_learner_tokens_total", "Completion tokens trained on.")
OVERLONG = Counter("rlstream_learner_overlong_total",
                   "Trained completions cut at rollout.max_new_tokens, by what the loss did with them "
                   "(rollout.overlong: kept or masked).", ["treatment"])
TICKETS = Counter("rlstream_learner_tickets_total", "Prompt tickets issued.")
IN_FLIGHT = Gauge("rlstream_learner_groups_in_flight", "Tickets issued and not yet trained or dropped.")
REISSUED = Counter("rlstream_learner_tickets_reissued_total",
                   "Tickets issued again (next attempt) because no group came back within their lease.")
LEASE = Gauge("rlstream_learner_lease_seconds", "Current ticket lease: max(floor, factor x p99 ticket-to-group latency).")
GROUPS = Counter("rlstream_learner_groups_total",
                 "Scored groups by fate (see pipeline.ledger: trained, dropped_stale, dropped_all_wrong, "
                 "abandoned, duplicate, unused, unresolved).", ["fate"])
LAG = Histogram("rlstream_learner_staleness_versions",
                "Policy-version lag of each scored group on arrival (learner - behaviour).",
                buckets=(0, 1, 2, 3, 4, 6, 8, 16))
LOSS_PARTS = Gauge("rlstream_learner_loss", "Latest step's loss and its parts.", ["part"])
POLICY_STATS = Gauge("rlstream_learner_policy_stat",
                     "Latest step's clip fraction and importance-weight statistics.", ["stat"])
CHECKPOINT_SECONDS = Histogram("rlstream_learner_checkpoint_seconds", "Time to write a checkpoint.",
                               buckets=(0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60))


def train_problems(cfg: RunConfig) -> list[Problem]:
    """The training prompt pool of the run."""
    t = cfg.task
    if t.kind == "arithmetic":
        return arithmetic_problems(t.train_pool, cfg.seed, t.difficulty_weights_map(), t.ops,
                                   "train", t.heldout_per_mille)
    return load_problems(t.train_path, t.question_field, t.answer_field, t.limit)


def ticket_columns(ticket: Ticket, version: int) -> Columns:
    problem = ticket.problem
    return {
        "ticket_id": np.array([ticket.ticket_id], dtype=object),
        "attempt": np.array([ticket.attempt], dtype=np.int32),
        "prompt_id": np.array([problem.prompt_id], dtype=object),
        "text": np.array([problem.text], dtype=object),
        "answer": np.array([problem.answer], dtype=object),
        "epoch": np.array([ticket.epoch], dtype=np.int32),
        "issued_version": np.array([version], dtype=np.int64),
        "issued_at": np.array([time.time()], dtype=np.float64),
    }


@dataclass
class OffsetTracker:
    """Which polled records are fully processed, so commits never pass an untrained group."""

    open_groups: dict[tuple[str, int, int], int] = field(default_factory=dict)
    """(topic, partition, offset) -> groups of that record not yet trained on or dropped."""

    def add(self, key: tuple[str, int, int], groups: int) -> None:
        if groups:
            self.open_groups[key] = self.open_groups.get(key, 0) + groups

    def done(self, key: tuple[str, int, int]) -> None:
        self.open_groups[key] -= 1
        if self.open_groups[key] == 0:
            del self.open_groups[key]

    def committable(self, positions: dict[tuple[str, int], int]) -> dict[tuple[str, int], int]:
        out = dict(positions)
        for (topic, part, offset) in self.open_groups:
            if (topic, part) in out:
                out[(topic, part)] = min(out[(topic, part)], offset)
        return out


class BatchChannel:
    """Rank 0 hands every training batch to the other ranks: Arrow IPC bytes broadcast as a
    uint8 tensor (never pickle), preceded by a header (byte count, stop flag). The tensors live on
    the rank's device (the trainer's): NCCL broadcasts only GPU tensors, gloo CPU ones."""

    def __init__(self, trainer: Trainer) -> None:
        self.world_size = trainer.world_size
        self.device = trainer.device

    def send(self, groups: list[Columns] | None) -> None:
        if self.world_size == 1:
            return
        import torch.distributed as dist

        payload = encode(SCORED_TRAJECTORY, concat(groups)) if groups else b""
        dist.broadcast(torch.tensor([len(payload), int(groups is None)], dtype=torch.int64, device=self.device), src=0)
        if payload:
            dist.broadcast(torch.frombuffer(bytearray(payload), dtype=torch.uint8).to(self.device), src=0)

    def recv(self) -> list[Columns] | None:
        import torch.distributed as dist

        header = torch.zeros(2, dtype=torch.int64, device=self.device)
        dist.broadcast(header, src=0)
        if int(header[1]):
            return None
        buf = torch.empty(int(header[0]), dtype=torch.uint8, device=self.device)
        dist.broadcast(buf, src=0)
        _, cols = decode(SCORED_TRAJECTORY, buf.cpu().numpy().tobytes(), headers_for(SCORED_TRAJECTORY))
        return split_groups(cols)


@dataclass
class LearnerState:
    """Everything besides model and optimiser that a checkpoint must restore."""

    step: int = 0
    version: int = 0
    received: int = 0
    trained: int = 0
    dropped: int = 0
    filtered: int = 0
    duplicates: int = 0
    invalid: int = 0
    """Groups dead-lettered by a check (their tickets stay outstanding)."""
    reissued: int = 0
    """Tickets issued again because their lease ran out."""
    ticket_position: int = 0
    """Tickets issued (the ticket source's position)."""
    outstanding: dict[str, int] = field(default_factory=dict)
    """Tickets issued and not yet decided (groups waiting in the batch included), with their attempt."""
    offsets: dict[tuple[str, int], int] = field(default_factory=dict)
    seen: list[str] = field(default_factory=list)
    """Tickets decided (trained, dropped or abandoned), oldest first, at most `SEEN_WINDOW`."""

    def to_json(self) -> str:
        d = {k: v for k, v in self.__dict__.items() if k != "offsets"}
        d["offsets"] = [[t, p, o] for (t, p), o in sorted(self.offsets.items())]
        return json.dumps(d)

    @classmethod
    def from_json(cls, text: str) -> LearnerState:
        d = json.loads(text)
        d["offsets"] = {(str(t), int(p)): int(o) for t, p, o in d["offsets"]}
        if isinstance(d.get("outstanding"), list):  # checkpoints before leases: every ticket at attempt 0
            d["outstanding"] = dict.fromkeys(d["outstanding"], 0)
        return cls(**d)


def checkpoint_root(cfg: RunConfig) -> Path:
    return cfg.workdir / "checkpoints"


def latest_checkpoint(cfg: RunConfig) -> Path | None:
    """The newest complete checkpoint (a `step-*` folder with its learner.json), or None."""
    done = [p for p in checkpoint_root(cfg).glob("step-*") if (p / LEARNER_STATE).exists()]
    return max(done, key=lambda p: int(p.name.split("-")[1])) if done else None


def save_checkpoint(cfg: RunConfig, trainer: Trainer, state: LearnerState) -> Path:
    """Model, optimiser and learner state together, written to a temporary folder and renamed,
    so a crash leaves the previous checkpoint intact. A collective: every rank calls it."""
    root = checkpoint_root(cfg)
    final, tmp = root / f"step-{state.step:08d}", root / f".step-{state.step:08d}.tmp"
    if trainer.rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    trainer.barrier()
    trainer.save(tmp / "trainer")
    trainer.barrier()
    if trainer.rank == 0:
        failpoint("learner.checkpoint")
        write_atomic(tmp / LEARNER_STATE, state.to_json())
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        fsync_dir(root)
        done = sorted((p for p in root.glob("step-*") if p.is_dir()), key=lambda p: int(p.name.split("-")[1]))
        for old in done[: -cfg.learner.keep_checkpoints]:
            shutil.rmtree(old, ignore_errors=True)
    trainer.barrier()
    return final


def newest_published_version(cfg: RunConfig) -> int:
    return max((v for v, _ in published_versions(cfg.workdir / "policies")), default=0)


def weights_due(lc: LearnerConfig, step: int) -> tuple[bool, bool]:
    """(publish, export) due after ``step``: every `sync_every` steps, every `export_every` steps
    (0: never), and both after the final step."""
    last = step == lc.total_steps
    return (step % lc.sync_every == 0 or last,
            (lc.export_every > 0 and step % lc.export_every == 0) or last)


def start_fresh(cfg: RunConfig) -> Path | None:
    """`learner.resume = "fresh"`: move the previous life's checkpoints and ledger aside (never
    deleted); returns where they went, None if there was nothing."""
    old = [p for p in (checkpoint_root(cfg), cfg.workdir / "ledger") if p.exists()]
    if not old:
        return None
    aside = cfg.workdir / time.strftime("previous-%Y%m%d-%H%M%S")
    aside.mkdir(parents=True)
    for p in old:
        p.rename(aside / p.name)
    return aside


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
    if lc.kl != "none":
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


def observe_step(state: LearnerState, metrics: dict[str, float], step_s: float) -> None:
    STEP_SECONDS.observe(step_s)
    STEP.set(state.step)
    VERSION.set(state.version)
    TOKENS.inc(metrics["tokens"])
    for name in ("loss", "pg_loss", "kl", "entropy", "reward", "grad_norm", "lr"):
        if name in metrics:
            LOSS_PARTS.labels(name).set(metrics[name])
    for name in ("clip_frac", "is_weight_mean", "is_weight_max", "is_truncated_frac", "is_masked_frac",
                 "overlong_frac"):
        POLICY_STATS.labels(name).set(metrics[name])
    cut = round(metrics["overlong_frac"] * metrics["samples"])
    OVERLONG.labels("masked").inc(metrics["overlong_masked"])
    OVERLONG.labels("kept").inc(cut - metrics["overlong_masked"])
