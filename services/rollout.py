"""Rollout producer: prompt tickets in, whole groups of trajectories out.

Loop: poll a batch of tickets from the `prompts` consumer group; take the newest announced policy
and the latest per-prompt temperatures (ERPO, from the `temperature` topic, read whole by every
rollout process); generate G samples per ticket, each prompt at its own temperature; send one
Trajectory message per group (key = prompt_id), flush (acks), then commit the tickets' offsets. A
process that dies before the commit leaves its tickets to be re-delivered to another member of the
group. Weights and temperatures never change during a generate call.

Every record is checked where it enters (`pipeline.flow.validate`): a ticket with a malformed id, an
empty or over-long prompt (longer than the engine's context allows: that ticket is refused, not its
batch), a temperature that is NaN, negative or above the engine's range, a policy announcement
whose folder is not this run's own `policies/v<version>` of regular files matching their hashes
(`pipeline.model.weights`) goes to the dead-letter topic with its reason, and the loop goes on. A ticket
attempt this process already answered is skipped ((ticket, attempt): a re-issued ticket's next
attempt is generated again, since its previous group may have been lost).
"""

from __future__ import annotations

import logging
import time
import uuid
from pathlib import Path

import numpy as np
from prometheus_client import Counter, Gauge, Histogram

from pipeline.config import RunConfig
from pipeline.dedupe import BoundedSet
from pipeline.flow.commit import Committer
from pipeline.flow.validate import Limits, check_message
from pipeline.model.prompts import PromptFormat
from pipeline.model.weight_store import PolicySource, StoreUnavailable, policy_source
from pipeline.model.weights import PolicyMissing, WeightsError
from pipeline.rollout.engine import Sample, TorchEngine
from pipeline.transport.consumer import Consumer, Delivery
from pipeline.transport.deadletters import RecordRejected
from pipeline.transport.producer import Producer
from pipeline.transport.topics import topic_name
from schemas import TRAJECTORY, Columns, Ragged, take
from services.common import JsonlWriter, StopFlag, initial_policy_path, load_initial_policy, set_threads, worker_id
from services.metrics import serve

log = logging.getLogger(__name__)

GEN_SECONDS = Histogram("rlstream_rollout_generate_seconds", "Wall time of one generate call (a batch of prompts).",
                        buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60))
TOKENS = Counter("rlstream_rollout_tokens_total", "Completion tokens generated.")
GROUPS = Counter("rlstream_rollout_groups_total", "Groups generated and sent.")
POLICY_VERSION = Gauge("rlstream_rollout_policy_version", "Policy version the engine samples with.")
BATCH_PROMPTS = Gauge("rlstream_rollout_batch_prompts", "Prompts in the latest generate call (engine fill).")
SKIPPED = Counter("rlstream_rollout_tickets_skipped_total",
                  "Tickets not generated again because this process already answered them.")
POLICY_WAIT = Histogram("rlstream_rollout_policy_wait_seconds",
                        "Lockstep: time a batch waited for the weights its tickets were issued at.",
                        buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60))
DONE_WINDOW = 50_000
SAMPLE_TEMPERATURE = Histogram("rlstream_rollout_sample_temperature", "Temperature each prompt was sampled at.",
                               buckets=(0.5, 0.75, 1.0, 1.1, 1.2, 1.3, 1.4, 1.5, 1.75, 2.0))


def group_columns(samples: list[Sample], ticket: dict, version: int, temperature: float,
                  group_size: int, now: float) -> Columns:
    """Trajectory columns of one group (the samples of one ticket)."""
    n = len(samples)

    def const(value, dtype=object):
        return np.full(n, value, dtype=dtype)

    return {
        "traj_id": np.array([uuid.uuid4().hex for _ in range(n)], dtype=object),
        "group_id": const(uuid.uuid4().hex),
        "ticket_id": const(ticket["ticket_id"]),
        "attempt": const(ticket["attempt"], np.int32),
        "prompt_id": const(ticket["prompt_id"]),
        "sample_idx": np.array([s.sample_idx for s in samples], dtype=np.int32),
        "group_size": const(group_size, np.int32),
        "policy_version": const(version, np.int64),
        "temperature": const(temperature, np.float32),
        "prompt_text": const(ticket["text"]),
        "prompt_token_ids": Ragged.from_list([s.prompt_token_ids for s in samples], np.int32),
        "completion_token_ids": Ragged.from_list([s.completion_token_ids for s in samples], np.int32),
        "behavior_logprobs": Ragged.from_list([s.behavior_logprobs for s in samples], np.float32),
        "completion_text": np.array([s.text for s in samples], dtype=object),
        "finish_reason": np.array([s.finish_reason for s in samples], dtype=object),
        "answer": const(ticket["answer"]),
        "created_at": const(now, np.float64),
    }


def _check(d: Delivery, limits: Limits = Limits()) -> None:
    """Raise `RecordRejected` (inside `consumer.guard`) if the message's values are unusable."""
    problem = check_message(d.kind, d.columns, limits)
    if problem is not None:
        raise RecordRejected(problem.code, problem.message_reason)


def drain(consumer: Consumer, apply, timeout_ms: int, max_polls: int) -> int:
    """Poll until nothing more comes (at most ``max_polls`` times); ``apply`` each delivery whose
    values pass `_check`, dead-lettering any that fail or break ``apply``. Returns the rows applied."""
    n = 0
    for _ in range(max_polls):
        deliveries = consumer.poll(timeout_ms=timeout_ms)
        if not deliveries:
            break
        for d in deliveries:
            with consumer.guard(d):
                _check(d)
                apply(d)
                n += len(d.columns[d.kind.schema.names[0]])
    return n


STORE_ATTEMPTS = 5
"""Refreshes in a row an announced version may fail for want of an answer from the object store
before it is dead-lettered (`weights_unavailable`)."""


class PolicyFollower:
    """Tracks the newest PolicyUpdate on the `policy` topic and loads it into an engine.

    Only this run's version folder (local, or in the object store: `pipeline.model.weight_store`)
    that passes `verify_published` is loaded; an
    announcement that fails is dead-lettered and the next newest is tried, so a forged "version
    10^9" cannot stop a rollout from following the learner. A folder that is gone (pruned) is
    skipped with a warning."""

    def __init__(self, policies: Consumer, source: PolicySource) -> None:
        self._policies = policies
        self._source = source
        self._pending: list[tuple[int, Delivery]] = []
        self._store_failures: dict[int, int] = {}

    def refresh(self, engine, timeout_ms: int = 0, max_polls: int = 10) -> None:
        """Load the newest announced weights if newer than the engine's (hashes checked first)."""
        drain(self._policies, lambda d: self._pending.append((int(d.columns["version"][0]), d)), timeout_ms, max_polls)
        self._pending.sort(key=lambda vd: vd[0], reverse=True)
        retry: list[tuple[int, Delivery]] = []
        while self._pending and self._pending[0][0] > engine.version:
            version, d = self._pending.pop(0)
            uri, sha = str(d.columns["uri"][0]), str(d.columns["sha256"][0])
            try:
                t0 = time.monotonic()
                files = self._source.files(uri, sha, version)
                engine.load_files(files, version)
                log.debug("loaded policy v%d in %.3fs", version, time.monotonic() - t0)
                break
            except PolicyMissing as e:
                log.warning("skipping policy v%d: %s", version, e)
            except StoreUnavailable as e:
                # The store did not answer: try this version again at the next refresh (older
                # pending ones meanwhile), but not forever: an announcement of a key the store
                # never answers for (a forged "v10^9" where a missing key reads as 403) must not
                # hold the rollout.
                failures = self._store_failures[version] = self._store_failures.get(version, 0) + 1
                if failures >= STORE_ATTEMPTS:
                    self._policies.reject(d, "weights_unavailable", f"weights_unavailable: policy v{version}: "
                                          f"{failures} attempts: {e}")
                else:
                    log.warning("policy v%d not fetched (attempt %d of %d), will retry: %s", version, failures,
                                STORE_ATTEMPTS, e)
                    retry.append((version, d))
            except (WeightsError, OSError, ValueError, RuntimeError) as e:
                self._policies.reject(d, "bad_weights", f"bad_weights: policy v{version}: {type(e).__name__}: {e}")
        self._pending = [vd for vd in self._pending + retry if vd[0] > engine.version]
        self._store_failures = {v: n for v, n in self._store_failures.items() if v > engine.version}

    def close(self) -> None:
        self._policies.close()


class TemperatureFollower:
    """The latest temperature of every prompt, from the `temperature` topic (all partitions)."""

    def __init__(self, consumer: Consumer, default: float) -> None:
        self._consumer = consumer
        self.default = default
        self.temperatures: dict[str, float] = {}

    def refresh(self, timeout_ms: int = 0, max_polls: int = 20) -> int:
        """Apply what has arrived (waiting up to `timeout_ms` per poll); returns updates read."""
        return drain(self._consumer,
                     lambda d: self.temperatures.update(zip(d.columns["prompt_id"], d.columns["temperature"].tolist())),
                     timeout_ms, max_polls)

    def catch_up(self, idle_ms: int = 500) -> None:
        """Read the topic up to its current end before the first batch. Tansu's "latest" offset
        is unreliable, so the end is where polls of `idle_ms` come back empty twice."""
        empty = 0
        while empty < 2:
            empty = 0 if self.refresh(timeout_ms=idle_ms, max_polls=1) else empty + 1

    def lookup(self, prompt_ids) -> list[float]:
        return [self.temperatures.get(p, self.default) for p in prompt_ids]

    def close(self) -> None:
        self._consumer.close()


TICKET_FIELDS = ("ticket_id", "attempt", "prompt_id", "text", "answer", "issued_version")


def ticket_row(d: Delivery, row: dict) -> Columns:
    """Delivery ``d``'s ticket ``row`` (found by ticket id and attempt) as one-row columns."""
    ids, attempts = d.columns["ticket_id"], d.columns["attempt"]
    i = next(i for i in range(len(ids)) if ids[i] == row["ticket_id"] and int(attempts[i]) == int(row["attempt"]))
    return take(d.columns, np.array([i]))


class Rollout:
    """One rollout worker: its engine, consumers and the tickets it has answered."""

    def __init__(self, cfg: RunConfig, worker_index: int) -> None:
        rc = self.rc = cfg.rollout
        self.cfg = cfg
        self.stop = StopFlag()
        set_threads(rc.torch_threads)
        policy_path = initial_policy_path(cfg)
        model, tokenizer = load_initial_policy(cfg)
        self.tokenizer = tokenizer
        prompt_format = PromptFormat(tokenizer, cfg.prompt)
        if rc.engine == "vllm":
            from pipeline.rollout.engine_vllm import VllmEngine

            del model
            # In process on CPU, on the `torch_threads` set above (see pipeline/rollout/engine_vllm.py).
            self.engine = VllmEngine(
                policy_path, tokenizer, rc.max_new_tokens, seed=rc.seed + worker_index, version=0, dtype=rc.dtype,
                max_model_len=rc.max_model_len, kv_cache_gib=rc.kv_cache_gib, prompt_format=prompt_format,
                gpu_memory_utilization=rc.gpu_memory_utilization, tensor_parallel_size=rc.tensor_parallel_size,
                enable_prefix_caching=rc.enable_prefix_caching, enforce_eager=rc.enforce_eager,
                trust_remote_code=cfg.model.trust_remote_code)
        else:
            import torch

            if torch.cuda.is_available():
                model.to("cuda")
            self.engine = TorchEngine(model, tokenizer, rc.max_new_tokens, seed=rc.seed + worker_index, version=0,
                                      prompt_format=prompt_format)
        log.info("prompts: %s template; completions end at token ids %s or after %d tokens (overlong: %s)",
                 prompt_format.kind, self.engine.stop_ids, rc.max_new_tokens, rc.overlong)
        self.wid = wid = worker_id()
        self.producer = Producer(cfg.kafka, client_id=f"{cfg.name}-rollout-{wid}")
        self.tickets = Consumer(cfg.kafka, cfg.name, ["prompts"], group_id=f"{cfg.name}.rollout",
                                client_id=f"{cfg.name}-rollout-{wid}", deadletter=self.producer)
        self.committer = Committer(self.tickets, [self.producer], flushed_failpoint="rollout.produced")
        self.follower = PolicyFollower(
            Consumer(cfg.kafka, cfg.name, ["policy"], group_id=None, client_id=f"{cfg.name}-rollout-policy-{wid}",
                     deadletter=self.producer),
            policy_source(cfg, f"rollout-{worker_index}"))
        self.temperatures = TemperatureFollower(
            Consumer(cfg.kafka, cfg.name, ["temperature"], group_id=None,
                     client_id=f"{cfg.name}-rollout-temperature-{wid}", deadletter=self.producer),
            default=cfg.erpo.tau0)
        self.limits = Limits(max_chars=rc.max_prompt_chars)
        self.progress = JsonlWriter(cfg.workdir / "progress" / f"rollout-{worker_index}.jsonl")
        serve(cfg, "rollout", str(worker_index))
        self.out_topic = topic_name(cfg.name, "trajectories")
        self.done = BoundedSet(DONE_WINDOW)
        """(ticket, attempt) answered by this process."""
        self.groups = self.tokens = 0

    def admit(self, deliveries: list[Delivery]) -> list[tuple[Delivery, dict]]:
        """The tickets to generate, each with its delivery; bad ones are dead-lettered, attempts
        answered already skipped."""
        out = []
        for d in deliveries:
            with self.tickets.guard(d):
                _check(d, self.limits)
                rows = [{k: d.columns[k][i] for k in TICKET_FIELDS} for i in range(len(d.columns["ticket_id"]))]
                lengths = [len(ids) for ids in self.engine.format.encode([r["text"] for r in rows])]
                if max(lengths) > self.engine.max_prompt_tokens:
                    raise RecordRejected("prompt_too_long",
                                         f"prompt_too_long: {max(lengths)} prompt tokens; this engine "
                                         f"takes at most {self.engine.max_prompt_tokens} (context - max_new_tokens)")
                for r in rows:
                    if (r["ticket_id"], int(r["attempt"])) in self.done:
                        # Its group is on the broker already: a copy re-delivered after a rebalance.
                        SKIPPED.inc()
                        continue
                    out.append((d, r))
        return out

    def await_policy(self, version: int) -> None:
        """Lockstep: load announced weights until the engine's are at least `version`, for at
        most `learner.staleness.lockstep_wait_s` (then generate with what there is)."""
        t0 = time.monotonic()
        wait_s = self.cfg.learner.staleness.lockstep_wait_s
        while self.engine.version < version and not self.stop:
            if time.monotonic() - t0 > wait_s:
                log.warning("lockstep: no policy v%d after %.0f s (learner.staleness.lockstep_wait_s); generating "
                            "with v%d", version, wait_s, self.engine.version)
                break
            self.follower.refresh(self.engine, timeout_ms=100, max_polls=1)
        POLICY_WAIT.observe(time.monotonic() - t0)

    def generate(self, batch: list[tuple[Delivery, dict]], temps: list[float]) -> list[list[Sample]]:
        """G samples per ticket, grouped by ticket. If the batch's engine call fails, each ticket
        is generated alone and the one that fails is dead-lettered (an empty list in its place)."""
        n = len(batch)
        by_ticket: list[list[Sample]] = [[] for _ in range(n)]
        try:
            samples = self.engine.generate([r["text"] for _, r in batch], temps, self.rc.group_size)
        except Exception:  # noqa: BLE001 -- find the ticket that breaks the engine
            log.exception("generate failed on a batch of %d tickets; generating them one by one", n)
            for i, ((d, r), t) in enumerate(zip(batch, temps)):
                # the record's other tickets may be generated: dead-letter this ticket alone
                with self.tickets.guard_part(d, ticket_row(d, r)):
                    by_ticket[i] = self.engine.generate([r["text"]], [t], self.rc.group_size)
            return by_ticket
        for s in samples:
            by_ticket[s.prompt_index].append(s)
        return by_ticket

    def step(self) -> None:
        """One poll, generate, produce, commit."""
        rc = self.rc
        deliveries = self.tickets.poll(timeout_ms=rc.poll_timeout_ms, max_records=rc.max_prompts_per_batch)
        if not deliveries:
            return
        # Take the newest announced policy just before generating, so samples are as fresh as
        # possible; weights never change during a generate call.
        self.follower.refresh(self.engine)
        self.temperatures.refresh()
        batch = self.admit(deliveries)
        if not batch:
            self.committer.commit()  # the dead letters flushed, the skipped tickets committed
            return
        if self.cfg.learner.staleness.lockstep:
            self.await_policy(max(int(r["issued_version"]) for _, r in batch))
        temps = self.temperatures.lookup([r["prompt_id"] for _, r in batch])
        t0 = time.monotonic()
        by_ticket = self.generate(batch, temps)
        gen_s = time.monotonic() - t0
        now = time.time()
        produced, new_tokens = 0, 0
        for (d, r), t, group in zip(batch, temps, by_ticket):
            if not group:
                continue
            cols = group_columns(group, r, self.engine.version, t, rc.group_size, now)
            self.producer.send(self.out_topic, TRAJECTORY, cols, key=str(r["prompt_id"]).encode())
            produced += 1
            new_tokens += sum(len(s.completion_token_ids) for s in group)
        self.committer.commit()
        for _, r in batch:
            self.done.add((r["ticket_id"], int(r["attempt"])))
        self.groups += produced
        self.tokens += new_tokens
        GEN_SECONDS.observe(gen_s)
        TOKENS.inc(new_tokens)
        GROUPS.inc(produced)
        POLICY_VERSION.set(self.engine.version)
        BATCH_PROMPTS.set(len(batch))
        for t in temps:
            SAMPLE_TEMPERATURE.observe(t)
        self.progress.write(groups=self.groups, tokens=self.tokens, policy_version=self.engine.version,
                            batch_groups=produced, gen_s=gen_s, tok_per_s=new_tokens / max(gen_s, 1e-9))

    def run(self) -> None:
        # A (re)started rollout first catches up on announced temperatures and weights.
        self.temperatures.catch_up()
        self.follower.refresh(self.engine, timeout_ms=500)
        log.info("rollout %s ready: engine=%s G=%d policy v%d, %d prompt temperatures", self.wid, self.rc.engine,
                 self.rc.group_size, self.engine.version, len(self.temperatures.temperatures))
        try:
            while not self.stop:
                self.step()
        finally:
            self.tickets.close()
            self.follower.close()
            self.temperatures.close()
            self.producer.close()
            self.progress.close()
            log.info("rollout %s stopped after %d groups", self.wid, self.groups)


def run(cfg: RunConfig, worker_index: int = 0) -> None:
    Rollout(cfg, worker_index).run()
