"""Transport benchmark: the services' own produce/consume/commit path through a real broker, by
trajectory size, and the Arrow codec against JSON.

(a) Codec: encode+decode cost per trajectory, one message per group of 8 (prompt 24 tokens,
    completion 64 tokens): our Arrow codec against `json.dumps`/`json.loads` of the same rows.
(b) End to end, as the services do it, for trajectories of about 1 KB, 16 KB and 256 KB of Arrow
    payload (before compression; MB/s counts those bytes, wire MB/s what was sent): a producer *process* sends one message per group (`Producer.send`, key = prompt id,
    `flush()` after every batch of `rollout.max_prompts_per_batch` groups (64, as in the cluster
    configs), as a rollout worker does) while a consumer *process* in a consumer group polls and decodes (`Consumer.poll`) and
    commits every `--commit-every` polls (the reward worker commits after each ERPO snapshot,
    `erpo.snapshot_every` batches). The baseline beside it commits after every poll (what this
    bench measured before). Throughput = trajectories / (last one consumed - first one sent);
    the group is joined before the first send. Where a group's message is Arrow-compressed
    (`kafka.arrow_compression_min_bytes`), a third arm sends it uncompressed for Kafka to compress.
(c) What a 4,096-token completion costs on the wire, and whether the size limits carry a group of
    them.

The broker is an embedded Tansu it starts itself (memory storage), or `--bootstrap host:port` for
a real Kafka. Usage: python bench/transport.py [--seconds 8] [--sizes 1,16,256]
The last line is `RESULT traj_per_s_1k=… mb_per_s_1k=… traj_per_s_16k=… … traj_per_s_256k=…
mb_per_s_256k=… baseline_traj_per_s_1k=… arrow_us=… json_us=…`.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import statistics
import time
import uuid

import numpy as np

from pipeline.config import ErpoConfig, KafkaConfig
from pipeline.transport.consumer import Consumer
from pipeline.transport.producer import Producer, arrow_compression_for
from pipeline.transport.topics import ensure_topics, topic_name
from schemas import TRAJECTORY, Columns, Ragged, decode, encode, encode_batch, headers_for, to_record_batch

G = 8
PROMPT_TOKENS = 24
TEXT = "She sold 48 / 2 = 24 clips in May, so 48 + 24 = 72 in total. \\boxed{72}"


def trajectory_group(rng: np.random.Generator, completion_tokens: int, prompt_tokens: int = PROMPT_TOKENS,
                     n: int = G, group: int = 0) -> Columns:
    """One group's message: n samples of one prompt, token ids and behaviour log-probs of
    `completion_tokens` each (ids drawn from a Qwen-sized vocabulary, so they barely compress)."""
    s = lambda values: np.array(values, dtype=object)  # noqa: E731
    return {
        "traj_id": s([uuid.uuid4().hex for _ in range(n)]),
        "group_id": s([f"group-{group:08d}"] * n),
        "ticket_id": s([f"e0-{group:06d}"] * n),
        "attempt": np.zeros(n, dtype=np.int32),
        "prompt_id": s([f"gsm8k-{group % 7473:05d}"] * n),
        "sample_idx": np.arange(n, dtype=np.int32),
        "group_size": np.full(n, n, dtype=np.int32),
        "policy_version": np.full(n, 12, dtype=np.int64),
        "temperature": np.full(n, 1.1, dtype=np.float32),
        "prompt_text": s(["Natalia sold clips to 48 of her friends in April. How many clips did she sell?"] * n),
        "prompt_token_ids": Ragged(rng.integers(0, 151_000, n * prompt_tokens, dtype=np.int32),
                                   np.arange(n + 1, dtype=np.int32) * prompt_tokens),
        "completion_token_ids": Ragged(rng.integers(0, 151_000, n * completion_tokens, dtype=np.int32),
                                       np.arange(n + 1, dtype=np.int32) * completion_tokens),
        "behavior_logprobs": Ragged(-rng.exponential(0.7, n * completion_tokens).astype(np.float32),
                                    np.arange(n + 1, dtype=np.int32) * completion_tokens),
        "completion_text": s([(TEXT * (1 + completion_tokens * 4 // len(TEXT)))[: completion_tokens * 4]] * n),
        "finish_reason": s(["stop"] * n),
        "answer": s(["72"] * n),
        "created_at": np.full(n, time.time()),
    }


def completion_tokens_for(kib: float) -> int:
    """Completion length whose trajectories encode to about `kib` KiB each (ids, log-probs, text:
    about 12 bytes per token)."""
    lo, hi = 1, 1 << 17
    while lo < hi:
        mid = (lo + hi) // 2
        size = len(encode(TRAJECTORY, trajectory_group(np.random.default_rng(0), mid))) / G
        lo, hi = (mid + 1, hi) if size < kib * 1024 else (lo, mid)
    return lo


def as_dicts(cols: Columns) -> list[dict[str, object]]:
    n = len(cols["traj_id"])
    return [{name: (col[i].tolist() if isinstance(col, Ragged) else col[i].item() if col.dtype != object else col[i])
             for name, col in cols.items()} for i in range(n)]


def bench_codec(reps: int) -> tuple[float, float]:
    cols = trajectory_group(np.random.default_rng(0), 64)
    headers = headers_for(TRAJECTORY)
    rows = as_dicts(cols)

    def median_us(fn) -> float:
        fn()
        times = []
        for _ in range(reps):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        return statistics.median(times) / G * 1e6

    return (median_us(lambda: decode(TRAJECTORY, encode(TRAJECTORY, cols), headers)),
            median_us(lambda: json.loads(json.dumps(rows).encode())))


# -- the two processes --------------------------------------------------------------------------------
def _produce(cfg: KafkaConfig, run: str, completion_tokens: int, groups: int, batch: int, ready, out) -> None:
    rng = np.random.default_rng(1)
    templates = [trajectory_group(rng, completion_tokens, group=i) for i in range(16)]
    producer = Producer(cfg, "bench-rollout")
    topic = topic_name(run, "trajectories")
    ready.wait()
    t0 = time.time()
    for i in range(groups):
        cols = templates[i % len(templates)]
        producer.send(topic, TRAJECTORY, cols, key=str(cols["prompt_id"][0]).encode() + str(i % 97).encode())
        if (i + 1) % batch == 0:
            producer.flush()
    producer.flush()
    out.put(("produced", t0, time.time()))
    producer.close()


def _consume(cfg: KafkaConfig, run: str, rows: int, commit_every: int, ready, out) -> None:
    consumer = Consumer(cfg, run, ["trajectories"], f"{run}.reward", "bench-reward", deadletter=None)
    deadline = time.monotonic() + 120
    while not consumer.assigned():  # join the group before the producer starts
        consumer.poll(timeout_ms=100)
        if time.monotonic() > deadline:
            raise RuntimeError("the bench consumer never got partitions")
    ready.set()
    got = polls = 0
    deadline = time.monotonic() + 600
    while got < rows:
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {got}/{rows} trajectories consumed")
        deliveries = consumer.poll(timeout_ms=100)
        if not deliveries:
            continue
        got += sum(len(d.columns["traj_id"]) for d in deliveries)
        polls += 1
        if polls % commit_every == 0:
            consumer.commit()
    last = time.time()
    consumer.commit()
    out.put(("consumed", last, polls))
    consumer.close()


def bench_path(cfg: KafkaConfig, kib: float, seconds: float, commit_every: int, batch: int,
               expect_traj_per_s: float, producers: int = 1) -> dict[str, float]:
    """`producers` producer processes (rollout workers) and one consumer process; sized to run
    about `seconds`."""
    tokens = completion_tokens_for(kib)
    sample = to_record_batch(TRAJECTORY, trajectory_group(np.random.default_rng(0), tokens))
    msg_bytes = len(encode_batch(TRAJECTORY, sample))
    wire_bytes = len(encode_batch(TRAJECTORY, sample, arrow_compression_for(cfg, sample)))
    groups = max(batch, int(expect_traj_per_s * seconds / G / producers) // batch * batch) * producers
    run = f"bench-{uuid.uuid4().hex[:8]}"
    ensure_topics(cfg, run)
    ctx = mp.get_context("spawn")
    ready, out = ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=_consume, args=(cfg, run, groups * G, commit_every, ready, out))]
    procs += [ctx.Process(target=_produce, args=(cfg, run, tokens, groups // producers, batch, ready, out))
              for _ in range(producers)]
    for p in procs:
        p.start()
    reports = [out.get(timeout=900) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        if p.exitcode != 0:
            raise RuntimeError(f"bench process {p.name} exited with {p.exitcode}")
    t_first = min(r[1] for r in reports if r[0] == "produced")
    _, t_last, polls = next(r for r in reports if r[0] == "consumed")
    wall = t_last - t_first
    return {"kib": kib, "tokens": tokens, "traj_bytes": msg_bytes / G, "groups": groups, "polls": polls,
            "wall_s": wall, "traj_per_s": groups * G / wall, "mb_per_s": groups * msg_bytes / wall / 1e6,
            "wire_mb_per_s": groups * wire_bytes / wall / 1e6}


def wire_cost(cfg: KafkaConfig) -> str:
    """Bytes of a group of 8 trajectories with 4,096-token completions, raw and zstd-compressed,
    against the configured message limit."""
    import zstandard

    payload = encode(TRAJECTORY, trajectory_group(np.random.default_rng(0), 4096, prompt_tokens=512))
    packed = len(zstandard.ZstdCompressor().compress(payload))
    return (f"a group of {G} trajectories with 512-token prompts and 4,096-token completions: {len(payload) / 1e6:.2f} MB "
            f"as one Arrow message ({len(payload) / G / 1024:.0f} KiB per trajectory), {packed / 1e6:.2f} MB zstd-compressed; "
            f"kafka.max_message_bytes = {cfg.max_message_bytes / 2**20:.0f} MiB carries groups up to "
            f"{cfg.max_message_bytes // (len(payload) // G)} such trajectories (set the broker's message.max.bytes and "
            f"the topic's max.message.bytes at least as high)")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1,16,256", help="trajectory sizes in KiB (comma-separated)")
    parser.add_argument("--seconds", type=float, default=8.0, help="about how long each measurement runs")
    parser.add_argument("--reps", type=int, default=500, help="codec repetitions (median)")
    parser.add_argument("--bootstrap", default=None, help="a running Kafka (host:port); default: embedded Tansu")
    parser.add_argument("--compression", default=KafkaConfig().compression, help="kafka.compression")
    parser.add_argument("--arrow-compression", default=KafkaConfig().arrow_compression, help="kafka.arrow_compression")
    parser.add_argument("--producers", type=int, default=1, help="producer processes (rollout workers)")
    parser.add_argument("--commit-every", type=int, default=ErpoConfig().snapshot_every,
                        help="polls between commits on the services' path (erpo.snapshot_every)")
    parser.add_argument("--batch", type=int, default=64,
                        help="groups per producer flush: rollout.max_prompts_per_batch of the cluster configs "
                             "(infra/configs/gsm8k.toml, compose, k8s: 64; the CPU demo's: 16)")
    args = parser.parse_args(argv)
    sizes = [float(s) for s in args.sizes.split(",")]

    arrow_us, json_us = bench_codec(args.reps)
    print(f"codec, one message per group of {G} (prompt {PROMPT_TOKENS} + completion 64 tokens), median of {args.reps}: "
          f"arrow {arrow_us:.2f} us/trajectory, json {json_us:.2f} us/trajectory ({json_us / arrow_us:.1f}x)", flush=True)

    def run_all(bootstrap: str) -> dict[str, float]:
        cfg = KafkaConfig(bootstrap_servers=bootstrap, session_timeout_ms=6000, heartbeat_interval_ms=500,
                          compression=args.compression, arrow_compression=args.arrow_compression)
        print(f"broker {bootstrap}: {args.producers} producer process(es), one message per group of {G}, Kafka "
              f"compression {args.compression}, Arrow compression {args.arrow_compression} of messages from "
              f"{cfg.arrow_compression_min_bytes // 1024} KiB, acks=all; each producer flushes every "
              f"{args.batch} groups; consumer commits every {args.commit_every} polls (services) or every poll "
              "(baseline)", flush=True)
        print(f"  {'KiB/traj':>8} {'tokens':>7} {'path':<9} {'traj/s':>9} {'MB/s':>8} {'wire MB/s':>9} {'wall s':>7} {'polls':>6}", flush=True)
        result: dict[str, float] = {}
        expect = {1.0: 30_000, 16.0: 6_000, 256.0: 600}
        for kib in sizes:
            arms = [("services", cfg, args.commit_every), ("baseline", cfg, 1)]
            group = to_record_batch(TRAJECTORY, trajectory_group(np.random.default_rng(0), completion_tokens_for(kib)))
            if arrow_compression_for(cfg, group) is not None:
                # The same path with Kafka compressing the message instead of Arrow (before this bench's fix).
                arms.append(("no-arrow", cfg.model_copy(update={"arrow_compression": "none"}), args.commit_every))
            for name, arm_cfg, every in arms:
                r = bench_path(arm_cfg, kib, args.seconds, every, args.batch, expect.get(kib, 30_000 / kib),
                               args.producers)
                print(f"  {r['traj_bytes'] / 1024:>8.1f} {r['tokens']:>7d} {name:<9} {r['traj_per_s']:>9,.0f} "
                      f"{r['mb_per_s']:>8.1f} {r['wire_mb_per_s']:>9.1f} {r['wall_s']:>7.1f} {r['polls']:>6d}", flush=True)
                tag = f"{kib:g}k"
                prefix = {"services": "", "baseline": "baseline_", "no-arrow": "noarrow_"}[name]
                result[f"{prefix}traj_per_s_{tag}"] = r["traj_per_s"]
                result[f"{prefix}mb_per_s_{tag}"] = r["mb_per_s"]
        print(wire_cost(cfg))
        return result

    if args.bootstrap:
        result = run_all(args.bootstrap)
    else:
        from infra.broker import Broker

        with Broker() as broker:
            result = run_all(broker.bootstrap)
    fields = " ".join(f"{k}={v:.0f}" if "traj" in k else f"{k}={v:.1f}" for k, v in result.items())
    print(f"RESULT {fields} arrow_us={arrow_us:.2f} json_us={json_us:.2f}")


if __name__ == "__main__":
    main()
