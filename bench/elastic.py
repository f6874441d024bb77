"""Elastic rollout workers: groups/s with one worker, then two, in the same run; nothing lost.

A broker and a queue of prompt tickets (the demo's arithmetic task) for a rollout-heavy policy: a
6-layer, 256-wide Qwen2 (warm-started for one step only: throughput, not accuracy, is measured here)
sampling 8 completions of up to 32 tokens per prompt. Rollout worker 0 starts alone (torch engine,
one thread). After a measured window, worker 1 joins the running
run (it is started exactly as a user would add one: same config, next worker index) and the
consumer group hands it half the partitions; after a second window it is stopped with SIGTERM and
hands them back. Groups per second come from each worker's progress file, in each window after a
settling time. At the end both workers are stopped and every ticket whose offset the rollout group
committed must have its group on the trajectories topic (nothing lost in the hand-overs).

    python bench/elastic.py [--window 40] [--tickets 20000]

Last line: ``RESULT one_worker_groups_s=… two_workers_groups_s=… speedup=… lost=…``.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from infra.broker import Broker  # noqa: E402
from pipeline.config import load_config  # noqa: E402
from pipeline.data.tasks import train_problems  # noqa: E402
from pipeline.flow.tickets import TicketSource  # noqa: E402
from pipeline.flow.tickets import ticket_columns  # noqa: E402
from pipeline.transport.consumer import Consumer  # noqa: E402
from pipeline.transport.producer import Producer  # noqa: E402
from pipeline.transport.topics import ensure_topics, topic_name  # noqa: E402
from schemas import PROMPT_TICKET  # noqa: E402
from services.cli import shipped_config  # noqa: E402
from services.common import initial_policy_path  # noqa: E402


def progress(workdir: Path, i: int) -> list[dict]:
    path = workdir / "progress" / f"rollout-{i}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def wait_for(condition, what: str, timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise SystemExit(f"no {what} within {timeout_s:.0f} s")
        time.sleep(0.5)


def rate(workdir: Path, start: float, end: float, workers: int) -> float:
    """Groups per second all workers produced between two wall-clock times."""
    total = 0
    for i in range(workers):
        rows = [r for r in progress(workdir, i) if start <= r["time"] <= end]
        if len(rows) >= 2:
            total += rows[-1]["groups"] - rows[0]["groups"]
    return total / (end - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--window", type=float, default=40.0, help="seconds measured per phase")
    ap.add_argument("--settle", type=float, default=10.0, help="seconds left out after each change")
    ap.add_argument("--tickets", type=int, default=20_000)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="rlstream-elastic-"))
    with Broker(log_path=tmp / "broker.log") as broker:
        sets = {"name": '"elastic"', "workdir": f'"{tmp / "run"}"', "kafka.bootstrap_servers": f'"{broker.bootstrap}"',
                "kafka.session_timeout_ms": "2000", "rollout.engine": '"torch"', "rollout.torch_threads": "1",
                "rollout.max_new_tokens": "32", "rollout.max_prompts_per_batch": "8",
                "model.warmstart.hidden_size": "256", "model.warmstart.layers": "6", "model.warmstart.heads": "4",
                "model.warmstart.kv_heads": "2", "model.warmstart.intermediate_size": "1024",
                "model.warmstart.steps": "1", "metrics.enabled": "false"}
        overrides = [f"{k}={v}" for k, v in sets.items()]
        cfg = load_config(shipped_config(), overrides)
        print(f"warm-started model: {initial_policy_path(cfg)}", flush=True)
        ensure_topics(cfg.kafka, cfg.name)
        source = TicketSource(train_problems(cfg), cfg.seed)
        producer = Producer(cfg.kafka, "bench-tickets")
        for _ in range(args.tickets):
            t = source.next()
            producer.send(topic_name(cfg.name, "prompts"), PROMPT_TICKET, ticket_columns(t, 0),
                          key=t.problem.prompt_id.encode())
        producer.flush()
        producer.close()
        argv = [sys.executable, "-m", "services.cli", "rollout"] + [a for o in overrides for a in ("--set", o)]
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        logs = [open(tmp / f"rollout-{i}.log", "wb") for i in range(2)]
        workers = [subprocess.Popen(argv + ["--worker-index", "0"], cwd=REPO, env=env, stdout=logs[0],
                                    stderr=subprocess.STDOUT)]
        wait_for(lambda: progress(tmp / "run", 0), "worker 0's first batch")
        t1 = time.time() + args.settle
        time.sleep(args.settle + args.window)
        one = rate(tmp / "run", t1, time.time(), 1)
        print(f"1 worker:  {one:.1f} groups/s", flush=True)
        workers.append(subprocess.Popen(argv + ["--worker-index", "1"], cwd=REPO, env=env, stdout=logs[1],
                                        stderr=subprocess.STDOUT))
        wait_for(lambda: progress(tmp / "run", 1), "worker 1's first batch")
        t2 = time.time() + args.settle
        time.sleep(args.settle + args.window)
        two = rate(tmp / "run", t2, time.time(), 2)
        print(f"2 workers: {two:.1f} groups/s (worker 1 joined the running run)", flush=True)
        workers[1].send_signal(signal.SIGTERM)
        code1 = workers[1].wait(60)
        time.sleep(args.settle)
        workers[0].send_signal(signal.SIGTERM)
        code0 = workers[0].wait(60)
        # Every ticket the group committed has its group; nothing was committed without one.
        from kafka import KafkaConsumer, TopicPartition

        probe = KafkaConsumer(bootstrap_servers=broker.bootstrap, group_id=f"{cfg.name}.rollout",
                              enable_auto_commit=False)
        prompts = topic_name(cfg.name, "prompts")
        committed = {p: probe.committed(TopicPartition(prompts, p)) or 0 for p in probe.partitions_for_topic(prompts)}
        probe.close()
        tickets = Consumer(cfg.kafka, cfg.name, ["prompts"], None, "bench-check-t", deadletter=None)
        groups = Consumer(cfg.kafka, cfg.name, ["trajectories"], None, "bench-check-g", deadletter=None)
        want, answered, idle = set(), set(), 0
        while idle < 3:
            got_t, got_g = tickets.poll(timeout_ms=300), groups.poll(timeout_ms=300)
            want |= {d.columns["ticket_id"][0] for d in got_t if d.offset < committed[d.partition]}
            answered |= {g for d in got_g for g in d.columns["ticket_id"]}
            idle = 0 if got_t or got_g else idle + 1
        tickets.close()
        groups.close()
        lost = len(want - answered)
        print(f"workers stopped with {code0}, {code1}; {len(want)} tickets committed, {len(answered)} answered, "
              f"{lost} committed without a group")
    speedup = two / one if one else float("nan")
    print(f"RESULT one_worker_groups_s={one:.1f} two_workers_groups_s={two:.1f} speedup={speedup:.2f} lost={lost}")


if __name__ == "__main__":
    main()
