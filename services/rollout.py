"""Rollout producer: prompt tickets in, whole groups of trajectories out.

Loop: poll a batch of tickets from the `prompts` consumer group; take the newest announced policy
and the latest per-prompt temperatures (ERPO, from the `temperature` topic, read whole by every
rollout process); generate G samples per ticket, each prompt at its own temperature; send one
Trajectory message per group (key = prompt_id), flush (acks), then commit the tickets' offsets. A
process that dies before the commit leaves its tickets to be re-delivered to another member of the
group. Weights and temperatures never change during a generate call.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections import OrderedDict

import numpy as np
from prometheus_client import Counter, Gauge, Histogram

from pipeline.config import RunConfig
from pipeline.engine import Sample, TorchEngine
from pipeline.transport import Consumer, Producer, topic_name
from pipeline.weights import WeightsError
from schemas import TRAJECTORY, Columns, Ragged, concat, take
from services.common import JsonlWriter, StopFlag, initial_policy_path, set_threads, worker_id
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


class PolicyFollower:
    """Tracks the newest PolicyUpdate on the `policy` topic and loads it into an engine."""

    def __init__(self, policies: Consumer) -> None:
        self._policies = policies
        self.latest: dict | None = None

    def refresh(self, engine, timeout_ms: int = 0) -> None:
        """Load the newest announced weights if newer than the engine's (hash checked first)."""
        for d in self._policies.poll(timeout_ms=timeout_ms):
            i = int(np.argmax(d.columns["version"]))
            if self.latest is None or int(d.columns["version"][i]) > self.latest["version"]:
                self.latest = {k: d.columns[k][i] for k in ("version", "uri", "sha256")}
                self.latest["version"] = int(self.latest["version"])
        if self.latest is None or self.latest["version"] <= engine.version:
            return
        try:
            t0 = time.monotonic()
            engine.load_published(self.latest["uri"], self.latest["sha256"], self.latest["version"])
            log.debug("loaded policy v%d in %.3fs", engine.version, time.monotonic() - t0)
        except WeightsError as e:
            log.warning("skipping policy v%d: %s", self.latest["version"], e)


class TemperatureFollower:
    """The latest temperature of every prompt, from the `temperature` topic (all partitions)."""

    def __init__(self, consumer: Consumer, default: float) -> None:
        self._consumer = consumer
        self.default = default
        self.temperatures: dict[str, float] = {}

    def refresh(self, timeout_ms: int = 0, max_polls: int = 20) -> int:
        """Apply what has arrived (waiting up to `timeout_ms` per poll); returns updates read."""
        n = 0
        for _ in range(max_polls):
            deliveries = self._consumer.poll(timeout_ms=timeout_ms)
            if not deliveries:
                break
            for d in deliveries:
                self.temperatures.update(zip(d.columns["prompt_id"], d.columns["temperature"].tolist()))
                n += len(d.columns["prompt_id"])
        return n

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


def run(cfg: RunConfig, worker_index: int = 0) -> None:
    stop = StopFlag()
    rc = cfg.rollout
    set_threads(rc.torch_threads)
    from pipeline.model import load_policy

    policy_path = initial_policy_path(cfg)
    model, tokenizer = load_policy(policy_path)
    engine_name = rc.engine
    if engine_name == "vllm":
        from pipeline.engine_vllm import VllmEngine

        del model
        # In process on CPU, on the `torch_threads` set above (see pipeline/engine_vllm.py).
        engine = VllmEngine(policy_path, tokenizer, rc.max_new_tokens, seed=rc.seed + worker_index, version=0,
                            dtype=rc.dtype)
    else:
        engine = TorchEngine(model, tokenizer, rc.max_new_tokens, seed=rc.seed + worker_index, version=0)
    wid = worker_id()
    producer = Producer(cfg.kafka, client_id=f"{cfg.name}-rollout-{wid}")
    tickets = Consumer(cfg.kafka, cfg.name, ["prompts"], group_id=f"{cfg.name}.rollout",
                       client_id=f"{cfg.name}-rollout-{wid}", deadletter=producer)
    policies = Consumer(cfg.kafka, cfg.name, ["policy"], group_id=None,
                        client_id=f"{cfg.name}-rollout-policy-{wid}", deadletter=None)
    follower = PolicyFollower(policies)
    temperatures = TemperatureFollower(
        Consumer(cfg.kafka, cfg.name, ["temperature"], group_id=None,
                 client_id=f"{cfg.name}-rollout-temperature-{wid}", deadletter=None),
        default=cfg.erpo.tau0)
    progress = JsonlWriter(cfg.workdir / "progress" / f"rollout-{worker_index}.jsonl")
    serve(cfg, "rollout", str(worker_index))
    out_topic = topic_name(cfg.name, "trajectories")
    groups = tokens = 0
    done: OrderedDict[str, None] = OrderedDict()  # tickets answered by this process, oldest first
    # A (re)started rollout first catches up on announced temperatures and weights.
    temperatures.catch_up()
    follower.refresh(engine, timeout_ms=500)
    log.info("rollout %s ready: engine=%s G=%d policy v%d, %d prompt temperatures", wid, engine_name,
             rc.group_size, engine.version, len(temperatures.temperatures))
    try:
        while not stop:
            deliveries = tickets.poll(timeout_ms=rc.poll_timeout_ms, max_records=rc.max_prompts_per_batch)
            if not deliveries:
                continue
            # Take the newest announced policy just before generating, so samples are as fresh
            # as possible; weights never change during a generate call.
            follower.refresh(engine)
            temperatures.refresh()
            batch = concat([d.columns for d in deliveries])
            fresh = np.array([t not in done for t in batch["ticket_id"]], dtype=bool)
            if not fresh.all():
                # A ticket this process already answered (its group is on the broker): a copy
                # re-issued by a resumed learner. The reward service would skip it anyway.
                SKIPPED.inc(int((~fresh).sum()))
                batch = take(batch, np.flatnonzero(fresh))
                if not fresh.any():
                    tickets.commit()
                    continue
            n = len(batch["ticket_id"])
            temps = temperatures.lookup(batch["prompt_id"])
            t0 = time.monotonic()
            samples = engine.generate(list(batch["text"]), temps, rc.group_size)
            gen_s = time.monotonic() - t0
            now = time.time()
            by_prompt: list[list[Sample]] = [[] for _ in range(n)]
            for s in samples:
                by_prompt[s.prompt_index].append(s)
            for i, group in enumerate(by_prompt):
                ticket = {k: batch[k][i] for k in ("ticket_id", "prompt_id", "text", "answer")}
                cols = group_columns(group, ticket, engine.version, temps[i], rc.group_size, now)
                producer.send(out_topic, TRAJECTORY, cols, key=str(ticket["prompt_id"]).encode())
            producer.flush()
            tickets.commit()
            for t in batch["ticket_id"]:
                done[t] = None
                if len(done) > DONE_WINDOW:
                    done.popitem(last=False)
            groups += n
            new_tokens = sum(len(s.completion_token_ids) for s in samples)
            tokens += new_tokens
            GEN_SECONDS.observe(gen_s)
            TOKENS.inc(new_tokens)
            GROUPS.inc(n)
            POLICY_VERSION.set(engine.version)
            BATCH_PROMPTS.set(n)
            for t in temps:
                SAMPLE_TEMPERATURE.observe(t)
            progress.write(groups=groups, tokens=tokens, policy_version=engine.version,
                           batch_groups=n, gen_s=gen_s, tok_per_s=new_tokens / max(gen_s, 1e-9))
    finally:
        tickets.close()
        policies.close()
        temperatures.close()
        producer.close()
        progress.close()
        log.info("rollout %s stopped after %d groups", wid, groups)
