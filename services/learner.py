"""Learner: paces the run with prompt tickets, trains on scored groups, publishes weights.

Loop:
1. Issue tickets while in-flight groups (issued - trained - dropped) stay within
   ``max(1, max_staleness) x groups_per_step``, so producers cannot run ahead of what the learner
   can use without exceeding the staleness bound. This is AReaL's capacity rule,
   ``(max_staleness + 1) x batch``, less one version: our rollout picks up new weights between
   generate calls, so its behaviour version trails the learner's by up to one version, and the full
   AReaL budget made about a fifth of all groups arrive one version too stale (measured on the
   demo: 706 of 5,506 groups dropped).
2. Poll scored groups. A group's lag = learner policy version - its behaviour policy version;
   groups with lag > ``max_staleness`` are dropped and counted. Groups already seen (by group id;
   at-least-once delivery) are ignored.
   With ERPO's `drop_all_wrong`, all-wrong groups are filtered out too (counted).
3. Every ``groups_per_step`` groups: advantages (ERPO's RA: -delta for all-correct groups),
   decoupled PPO loss, optimiser update(s).
4. Every ``sync_every`` steps: publish safetensors weights as a new policy version and announce it.
5. Commit, per partition, only offsets whose groups have all been trained on or dropped.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections import OrderedDict, defaultdict
from dataclasses import dataclass, field

import numpy as np
import torch

from pipeline.advantages import get_advantage
from pipeline.config import LearnerConfig, RunConfig
from pipeline.erpo import ErpoRule, drop_mask, ra_advantages
from pipeline.engine import pack, scatter_completion, token_logprobs
from pipeline.losses import PolicyLossInputs, decoupled_ppo_loss, masked_mean
from pipeline.tasks import Problem, arithmetic_problems, load_problems
from pipeline.transport import Consumer, Producer, topic_name
from pipeline.weights import publish
from schemas import POLICY_UPDATE, PROMPT_TICKET, Columns, concat, take
from services.common import JsonlWriter, StopFlag, erpo_rule, initial_policy_path, set_threads, worker_id

log = logging.getLogger(__name__)


def train_problems(cfg: RunConfig) -> list[Problem]:
    """The training prompt pool of the run."""
    t = cfg.task
    if t.kind == "arithmetic":
        return arithmetic_problems(t.train_pool, cfg.seed, t.difficulty_weights_map(), t.ops,
                                   "train", t.heldout_per_mille)
    return load_problems(t.train_path, t.question_field, t.answer_field, t.limit)


class TicketSource:
    """Endless tickets over the prompt pool, reshuffled each epoch (seeded)."""

    def __init__(self, problems: list[Problem], seed: int) -> None:
        if not problems:
            raise ValueError("the training prompt pool is empty")
        self._problems = problems
        self._seed = seed
        self.epoch = -1
        self._order: list[int] = []

    def next(self) -> tuple[Problem, int]:
        if not self._order:
            self.epoch += 1
            self._order = list(np.random.default_rng(self._seed + self.epoch).permutation(len(self._problems)))
        return self._problems[self._order.pop()], self.epoch


def ticket_columns(problem: Problem, epoch: int, version: int) -> Columns:
    return {
        "ticket_id": np.array([uuid.uuid4().hex], dtype=object),
        "prompt_id": np.array([problem.prompt_id], dtype=object),
        "text": np.array([problem.text], dtype=object),
        "answer": np.array([problem.answer], dtype=object),
        "epoch": np.array([epoch], dtype=np.int32),
        "issued_version": np.array([version], dtype=np.int64),
        "issued_at": np.array([time.time()], dtype=np.float64),
    }


def split_groups(columns: Columns) -> list[Columns]:
    """The rows of one message, one Columns per group id (in order of first appearance)."""
    ids = columns["group_id"]
    _, first, inverse = np.unique(ids, return_index=True, return_inverse=True)
    order = np.argsort(first)
    return [take(columns, np.flatnonzero(inverse == g)) for g in order]


def train_step(model, opt, sched, groups: list[Columns], lc: LearnerConfig, rule: ErpoRule,
               pad_id: int) -> dict[str, float]:
    """One training step on a batch of groups: advantages (with ERPO's RA for all-correct groups),
    decoupled PPO, ``mini_batches`` updates."""
    cols = concat(groups)
    _, group_index = np.unique(cols["group_id"], return_inverse=True)
    rewards = torch.as_tensor(np.asarray(cols["shaped_reward"], dtype=np.float32))
    advantages = get_advantage(lc.advantage)(rewards, torch.as_tensor(group_index))
    advantages = torch.as_tensor(ra_advantages(np.asarray(cols["group_pass_rate"]), advantages.numpy(), rule))
    n = len(rewards)
    batch = pack([cols["prompt_token_ids"][i] for i in range(n)],
                 [cols["completion_token_ids"][i] for i in range(n)],
                 np.asarray(cols["temperature"], dtype=np.float32), pad_id)
    behavior = scatter_completion(cols["behavior_logprobs"].values, batch.completion_mask)
    with torch.no_grad():
        proximal, _ = token_logprobs(model, batch)
    slices = np.array_split(np.random.permutation(int(group_index.max()) + 1), lc.mini_batches)
    sums: dict[str, float] = defaultdict(float)
    for groups_in_slice in slices:
        rows = torch.as_tensor(np.flatnonzero(np.isin(group_index, groups_in_slice)))
        sub = batch.select(rows)
        logprobs, entropy = token_logprobs(model, sub)
        loss, metrics = decoupled_ppo_loss(
            PolicyLossInputs(logprobs, proximal[rows], behavior[rows], advantages[rows], sub.completion_mask),
            eps_low=lc.eps_low, eps_high=lc.eps_high, tis_cap=lc.tis_cap, aggregation=lc.aggregation)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), lc.grad_clip)
        opt.step()
        sched.step()
        for k, v in metrics.items():
            sums[k] += v / lc.mini_batches
        sums["loss"] += float(loss) / lc.mini_batches
        sums["entropy"] += float(masked_mean(entropy.detach(), sub.completion_mask)) / lc.mini_batches
        sums["grad_norm"] += float(grad_norm) / lc.mini_batches
    rates = np.asarray(cols["group_pass_rate"])
    sums["reward"] = float(rewards.mean())
    sums["all_correct_frac"] = float(np.mean(rates >= 1.0))
    sums["all_wrong_frac"] = float(np.mean(rates <= 0.0))
    sums["completion_len"] = float(batch.completion_mask.sum() / n)
    sums["lr"] = float(sched.get_last_lr()[0])
    return dict(sums)


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


def run(cfg: RunConfig) -> None:
    stop = StopFlag()
    lc = cfg.learner
    rule = erpo_rule(cfg)
    set_threads(lc.torch_threads)
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    from pipeline.model import load_policy

    model, tokenizer = load_policy(initial_policy_path(cfg))
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lc.lr, betas=(0.9, 0.99), weight_decay=lc.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(1, lc.warmup_steps)))
    problems = train_problems(cfg)
    tickets = TicketSource(problems, cfg.seed)
    wid = worker_id()
    producer = Producer(cfg.kafka, client_id=f"{cfg.name}-learner-{wid}")
    consumer = Consumer(cfg.kafka, cfg.name, ["scored"], group_id=f"{cfg.name}.learner",
                        client_id=f"{cfg.name}-learner-{wid}", deadletter=producer)
    progress = JsonlWriter(cfg.workdir / "progress" / "learner.jsonl")
    prompts_topic, policy_topic = topic_name(cfg.name, "prompts"), topic_name(cfg.name, "policy")
    capacity = max(1, lc.max_staleness) * lc.groups_per_step
    seen: OrderedDict[str, None] = OrderedDict()
    offsets = OffsetTracker()
    ready: list[tuple[Columns, tuple[str, int, int]]] = []
    issued = received = trained = dropped = filtered = duplicates = 0
    version = step = 0
    lags: list[int] = []
    t_start = time.monotonic()
    log.info("learner ready: %d prompts, capacity %d groups in flight", len(problems), capacity)

    def announce(step: int) -> None:
        pub = publish(model.state_dict(), cfg.workdir / "policies", version, lc.keep_policies)
        producer.send(policy_topic, POLICY_UPDATE, {
            "version": np.array([pub.version], dtype=np.int64),
            "step": np.array([step], dtype=np.int64),
            "uri": np.array([pub.uri], dtype=object),
            "sha256": np.array([pub.sha256], dtype=object),
            "dtype": np.array([pub.dtype], dtype=object),
            "created_at": np.array([time.time()], dtype=np.float64),
        })
        producer.flush()
        (cfg.workdir / "final_policy.txt").write_text(f"{pub.version} {pub.sha256} {pub.uri}\n")

    try:
        while step < lc.total_steps and not stop:
            needed = (lc.total_steps - step) * lc.groups_per_step
            while issued - trained - dropped - filtered < min(capacity, needed):
                problem, epoch = tickets.next()
                producer.send(prompts_topic, PROMPT_TICKET, ticket_columns(problem, epoch, version),
                              key=problem.prompt_id.encode())
                issued += 1
            producer.flush()
            for d in consumer.poll(timeout_ms=lc.poll_timeout_ms):
                key = (d.topic, d.partition, d.offset)
                for group in split_groups(d.columns):
                    gid = str(group["group_id"][0])
                    if gid in seen:
                        duplicates += 1
                        continue
                    seen[gid] = None
                    if len(seen) > 100_000:
                        seen.popitem(last=False)
                    received += 1
                    lag = version - int(group["policy_version"].min())
                    lags.append(lag)
                    if lag > lc.max_staleness:
                        dropped += 1
                        continue
                    if drop_mask(np.asarray(group["group_pass_rate"][:1]), rule)[0]:
                        filtered += 1  # all-wrong group, DAPO-style dynamic sampling
                        continue
                    offsets.add(key, 1)
                    ready.append((group, key))
            while len(ready) >= lc.groups_per_step and step < lc.total_steps:
                batch, ready = ready[: lc.groups_per_step], ready[lc.groups_per_step:]
                t0 = time.monotonic()
                metrics = train_step(model, opt, sched, [g for g, _ in batch], lc, rule, tokenizer.pad_token_id)
                step += 1
                if step % lc.sync_every == 0 or step == lc.total_steps:
                    version += 1
                    announce(step)
                trained += len(batch)
                for _, key in batch:
                    offsets.done(key)
                consumer.commit_offsets(offsets.committable(consumer.positions()))
                elapsed = time.monotonic() - t_start
                progress.write(step=step, version=version, step_s=time.monotonic() - t0,
                               elapsed_s=elapsed, issued=issued, received=received, dropped=dropped, filtered=filtered,
                               duplicates=duplicates, lag_mean=float(np.mean(lags)) if lags else 0.0,
                               lag_max=max(lags) if lags else 0, groups_per_s=received / elapsed,
                               **metrics)
                lags.clear()
                log.info("step %d v%d reward=%.3f loss=%.4f dropped=%d", step, version,
                         metrics["reward"], metrics["loss"], dropped)
    finally:
        consumer.close()
        producer.close()
        progress.close()
        log.info("learner stopped at step %d (policy v%d)", step, version)
