"""Transport benchmark: Arrow codec vs JSON, and trajectory throughput through a real Tansu broker.

(a) encode+decode cost per trajectory, batches of 64 rows (prompt 24 tokens, completion 64
    tokens): our Arrow codec against `json.dumps`/`json.loads` of the equivalent list of dicts;
    median over many repetitions.
(b) trajectories/s through an embedded Tansu broker it starts itself (zstd, acks=all, messages of
    64 rows): produce-only, consume-only (consumer group, commit after every poll; group join
    time excluded and printed separately), and end to end (producer and consumer running
    together, group already joined).

Usage: python bench/transport.py [--n 20000] [--reps 2000]
The last line is `RESULT arrow_us=… json_us=… ratio=… traj_per_s=…` (traj_per_s = end to end).
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time
import uuid

import numpy as np

from infra.broker import Broker
from pipeline.config import KafkaConfig
from pipeline.transport.kafka import Consumer, Producer, ensure_topics, topic_name
from schemas import TRAJECTORY, Columns, Ragged, decode, encode, headers_for

ROWS = 64
PROMPT_TOKENS = 24
COMPLETION_TOKENS = 64


def trajectory_batch(rng: np.random.Generator, n: int = ROWS) -> Columns:
    """A realistic message: n/8 groups of 8 samples, fixed prompt/completion lengths."""
    group = np.arange(n) // 8
    s = lambda values: np.array(values, dtype=object)  # noqa: E731
    return {
        "traj_id": s([uuid.uuid4().hex for _ in range(n)]),
        "group_id": s([f"group-{g:06d}" for g in group]),
        "ticket_id": s([f"ticket-{g:06d}" for g in group]),
        "prompt_id": s([f"gsm8k-{g:05d}" for g in group]),
        "sample_idx": (np.arange(n) % 8).astype(np.int32),
        "group_size": np.full(n, 8, dtype=np.int32),
        "policy_version": np.full(n, 12, dtype=np.int64),
        "temperature": np.full(n, 1.1, dtype=np.float32),
        "prompt_text": s(["Natalia sold clips to 48 of her friends in April. How many clips did she sell?"] * n),
        "prompt_token_ids": Ragged(
            rng.integers(0, 151_000, n * PROMPT_TOKENS, dtype=np.int32),
            np.arange(n + 1, dtype=np.int32) * PROMPT_TOKENS,
        ),
        "completion_token_ids": Ragged(
            rng.integers(0, 151_000, n * COMPLETION_TOKENS, dtype=np.int32),
            np.arange(n + 1, dtype=np.int32) * COMPLETION_TOKENS,
        ),
        "behavior_logprobs": Ragged(
            -rng.exponential(0.7, n * COMPLETION_TOKENS).astype(np.float32),
            np.arange(n + 1, dtype=np.int32) * COMPLETION_TOKENS,
        ),
        "completion_text": s(["She sold 48 / 2 = 24 clips in May, so 48 + 24 = 72 in total. \\boxed{72}"] * n),
        "finish_reason": s(["stop"] * n),
        "answer": s(["72"] * n),
        "created_at": np.full(n, time.time()),
    }


def as_dicts(cols: Columns) -> list[dict[str, object]]:
    """The same rows as JSON-ready dicts (token ids and logprobs as Python lists)."""
    n = len(cols["traj_id"])
    rows: list[dict[str, object]] = []
    for i in range(n):
        row: dict[str, object] = {}
        for name, col in cols.items():
            row[name] = col[i].tolist() if isinstance(col, Ragged) else col[i].item() if col.dtype != object else col[i]
        rows.append(row)
    return rows


def median_us_per_row(fn: object, reps: int) -> float:
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()  # type: ignore[operator]
        times.append(time.perf_counter() - t)
    return statistics.median(times) / ROWS * 1e6


def bench_codec(reps: int) -> tuple[float, float, int, int]:
    cols = trajectory_batch(np.random.default_rng(0))
    headers = headers_for(TRAJECTORY)
    rows = as_dicts(cols)

    def arrow() -> None:
        decode(TRAJECTORY, encode(TRAJECTORY, cols), headers)

    def as_json() -> None:
        json.loads(json.dumps(rows).encode())

    arrow()
    as_json()
    arrow_us = median_us_per_row(arrow, reps)
    json_us = median_us_per_row(as_json, reps)
    return arrow_us, json_us, len(encode(TRAJECTORY, cols)), len(json.dumps(rows).encode())


def produce(producer: Producer, topic: str, batch: Columns, messages: int) -> None:
    for i in range(messages):
        producer.send(topic, TRAJECTORY, batch, key=f"gsm8k-{i:05d}".encode())
    producer.flush()


def consume(consumer: Consumer, rows: int) -> tuple[float, float]:
    """Poll (committing after each non-empty poll) until `rows` rows arrived.
    Returns (time of the first delivery, time of the last)."""
    got = 0
    first = 0.0
    deadline = time.monotonic() + 300
    while got < rows:
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {got}/{rows} rows consumed")
        deliveries = consumer.poll(timeout_ms=200)
        if deliveries:
            first = first or time.perf_counter()
            got += sum(len(d.columns["traj_id"]) for d in deliveries)
            consumer.commit()
    return first, time.perf_counter()


def bench_broker(n: int) -> dict[str, float]:
    messages = max(1, n // ROWS)
    rows = messages * ROWS
    batch = trajectory_batch(np.random.default_rng(1))
    out: dict[str, float] = {"rows": rows}
    with Broker() as broker:
        cfg = KafkaConfig(
            bootstrap_servers=broker.bootstrap,
            session_timeout_ms=2000,
            heartbeat_interval_ms=500,
            compression="zstd",
            acks="all",
        )
        # Separate phases: produce everything, then consume it.
        run = f"bench-{uuid.uuid4().hex[:8]}"
        ensure_topics(cfg, run)
        topic = topic_name(run, "trajectories")
        producer = Producer(cfg, "bench-producer")
        t0 = time.perf_counter()
        produce(producer, topic, batch, messages)
        out["produce_per_s"] = rows / (time.perf_counter() - t0)
        consumer = Consumer(cfg, run, ["trajectories"], f"{run}-g", "bench-consumer", deadletter=None)
        t0 = time.perf_counter()
        first, last = consume(consumer, rows)
        out["join_s"] = first - t0
        out["consume_per_s"] = (rows - ROWS) / max(last - first, 1e-9)  # first message only marks the join
        consumer.close()

        # End to end: producer and consumer together, on a fresh run; group joined beforehand.
        run = f"bench-{uuid.uuid4().hex[:8]}"
        ensure_topics(cfg, run)
        topic = topic_name(run, "trajectories")
        consumer = Consumer(cfg, run, ["trajectories"], f"{run}-g", "bench-consumer", deadletter=None)
        produce(producer, topic, batch, 1)
        consume(consumer, ROWS)  # warm-up message: the group is joined once it arrives
        result: dict[str, float] = {}
        reader = threading.Thread(target=lambda: result.update(last=consume(consumer, rows)[1]))
        t0 = time.perf_counter()
        reader.start()
        produce(producer, topic, batch, messages)
        reader.join()
        out["e2e_per_s"] = rows / (result["last"] - t0)
        consumer.close()
        producer.close()
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=20_000, help="trajectories sent through the broker")
    parser.add_argument("--reps", type=int, default=2000, help="codec repetitions (median)")
    args = parser.parse_args(argv)

    arrow_us, json_us, arrow_bytes, json_bytes = bench_codec(args.reps)
    b = bench_broker(args.n)
    print(f"codec, {ROWS} rows/message, prompt {PROMPT_TOKENS} + completion {COMPLETION_TOKENS} tokens, median of {args.reps}")
    print(f"  {'format':<8}{'us/traj (enc+dec)':>20}{'bytes/message':>16}")
    print(f"  {'arrow':<8}{arrow_us:>20.2f}{arrow_bytes:>16d}")
    print(f"  {'json':<8}{json_us:>20.2f}{json_bytes:>16d}")
    print(f"broker (tansu, zstd, acks=all), {int(b['rows'])} trajectories in messages of {ROWS}")
    print(f"  {'produce only':<28}{b['produce_per_s']:>12,.0f} traj/s")
    print(f"  {'consume only (group+commit)':<28}{b['consume_per_s']:>12,.0f} traj/s  (group join {b['join_s']:.2f} s excluded)")
    print(f"  {'end to end':<28}{b['e2e_per_s']:>12,.0f} traj/s")
    print(
        f"RESULT arrow_us={arrow_us:.2f} json_us={json_us:.2f} ratio={json_us / arrow_us:.1f} "
        f"traj_per_s={b['e2e_per_s']:.0f}"
    )


if __name__ == "__main__":
    main()
