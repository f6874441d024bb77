"""ERPO history-table benchmark: the vectorised HistoryStore vs the plain dict loop.

Applies batches of 10,000 scored groups to a table of 1,000,000 prompts that already have a
history. Each batch draws prompt ids with replacement from the table (so a few prompts get two
groups in one batch) plus a share of never-seen prompts, and pass rates k/8 with mass on 0 and 1
(residual groups are common late in training).

* vectorised: ``pipeline.erpo.store.HistoryStore.apply`` (numpy columns + hash index, in place),
  built once from the Polars table (not timed); batches are chained, as in the reward service.
* loop: ``reference_update`` of ``tests/erpo_oracle.py`` (the tests' oracle) on a dict-of-dicts
  copy of the same table, built once and not timed, fed the same batches as lists of tuples
  (conversion not timed).

* pure: ``pipeline.erpo.store.update`` (the same kernel on a copy of the DataFrame) on the first
  batches only, for information: it pays O(table) per call.

Both see the same batches in the same order; the final tables are checked to agree on the touched
prompts. Reports the median ms per batch of 10k groups and the ratio loop / vectorised.

Usage: python bench/history.py [--prompts 1000000] [--groups 10000] [--reps 7]
The last line is `RESULT ms_per_10k=… loop_ms_per_10k=… ratio=…`.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import polars as pl

from pipeline.erpo.rule import ErpoRule
from pipeline.erpo.store import TABLE_SCHEMA, HistoryStore, update

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from erpo_oracle import reference_update, to_dict_table  # noqa: E402

G = 8  # samples per group: pass rates are k / G


def make_table(rng: np.random.Generator, n: int, rule: ErpoRule) -> pl.DataFrame:
    """n prompts with 1..history past groups each and temperatures on the rule's grid."""
    lens = rng.integers(1, rule.history + 1, n)
    flat = (rng.integers(0, G + 1, int(lens.sum())) / G).astype(np.float32)
    offsets = np.concatenate([[0], np.cumsum(lens)])
    rates = pl.Series("pass_rates", flat).to_frame().with_columns(
        pl.Series("row", np.repeat(np.arange(n), lens))
    ).group_by("row", maintain_order=True).agg("pass_rates")["pass_rates"]
    assert rates.len() == n and int(offsets[-1]) == flat.size
    steps = rng.integers(0, 6, n)
    temps = np.minimum(rule.tau0 + steps * rule.delta_tau, rule.cap).astype(np.float32)
    streak = np.where(steps > 0, rng.integers(0, 3, n), 0).astype(np.int32)
    return pl.DataFrame(
        {
            "prompt_id": [f"prompt-{i:07d}" for i in range(n)],
            "times_seen": (lens + rng.integers(0, 5, n)).astype(np.int32),
            "pass_rates": rates,
            "all_correct_streak": streak,
            "all_wrong_streak": np.zeros(n, np.int32),
            "temperature": temps,
            "last_version": rng.integers(0, 100, n).astype(np.int64),
            "last_update": np.full(n, 1.7e9),
            "times_residual": steps.astype(np.int32),
            "times_reactivated": rng.integers(0, 2, n).astype(np.int32),
            "was_residual": streak > 0,
        },
        schema=TABLE_SCHEMA,
    )


def make_batch(rng: np.random.Generator, n: int, k: int, new_share: float, batch_no: int, version: int) -> pl.DataFrame:
    n_new = int(k * new_share)
    old = rng.integers(0, n, k - n_new)
    ids = [f"prompt-{i:07d}" for i in old] + [f"new-{batch_no:03d}-{j:06d}" for j in range(n_new)]
    order = rng.permutation(k)
    # Late-training mix: 35% all-correct, 15% all-wrong, the rest informative.
    kind = rng.random(k)
    rate = np.where(kind < 0.35, G, np.where(kind < 0.5, 0, rng.integers(1, G, k))) / G
    return pl.DataFrame(
        {
            "prompt_id": np.asarray(ids, dtype=object)[order],
            "pass_rate": rate.astype(np.float32),
            "policy_version": np.full(k, version, np.int64),
        },
        schema={"prompt_id": pl.Utf8, "pass_rate": pl.Float32, "policy_version": pl.Int64},
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompts", type=int, default=1_000_000)
    ap.add_argument("--groups", type=int, default=10_000)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--new-share", type=float, default=0.05, help="share of never-seen prompts per batch")
    args = ap.parse_args()
    rule = ErpoRule(decay=0.25)
    rng = np.random.default_rng(0)

    t0 = time.perf_counter()
    table = make_table(rng, args.prompts, rule)
    batches = [make_batch(rng, args.prompts, args.groups, args.new_share, b, 100 + b) for b in range(args.reps + 1)]
    tuples = [list(b.iter_rows()) for b in batches]
    t1 = time.perf_counter()
    table_dict = to_dict_table(table)
    t2 = time.perf_counter()
    store = HistoryStore(rule, table)
    t3 = time.perf_counter()
    pure_ms = []
    for b in batches[:3]:
        a = time.perf_counter()
        update(table, b, rule, 0.0)
        pure_ms.append((time.perf_counter() - a) * 1e3)
    rounds = [int(b.group_by("prompt_id").len()["len"].max()) for b in batches]  # type: ignore[arg-type]
    print(f"setup: table {table.height:,} prompts built in {t1 - t0:.1f} s, dict copy in {t2 - t1:.1f} s, "
          f"store in {t3 - t2:.1f} s; "
          f"batches of {args.groups:,} groups, max groups per prompt per batch {max(rounds)}")

    # Batch 0 warms both paths up and is not counted.
    now = 1.8e9
    vec_ms: list[float] = []
    loop_ms: list[float] = []
    n_updates: list[int] = []
    gc.disable()
    try:
        for b, (batch, rows) in enumerate(zip(batches, tuples)):
            a = time.perf_counter()
            updates = store.apply(batch, now + b)
            c = time.perf_counter()
            table_dict, _ = reference_update(table_dict, rows, rule, now + b)
            d = time.perf_counter()
            if b:
                vec_ms.append((c - a) * 1e3)
                loop_ms.append((d - c) * 1e3)
                n_updates.append(updates.height)
            gc.collect()
    finally:
        gc.enable()

    # Both paths must agree on every prompt touched by the last batch.
    touched = batches[-1]["prompt_id"].unique().sort()
    table = store.to_frame()
    got = table.filter(pl.col("prompt_id").is_in(touched.implode())).sort("prompt_id")
    for col in ("times_seen", "temperature", "all_correct_streak", "times_reactivated"):
        want = [table_dict[p][col] for p in got["prompt_id"]]
        assert got[col].to_list() == want, f"vectorised and loop tables differ in {col}"

    vec, loop = statistics.median(vec_ms), statistics.median(loop_ms)
    scale = 10_000 / args.groups
    print(f"\n{'path':<28}{'median ms/batch':>16}{'min':>10}{'max':>10}")
    print(f"{'HistoryStore.apply':<28}{vec:>16.1f}{min(vec_ms):>10.1f}{max(vec_ms):>10.1f}")
    print(f"{'reference dict loop':<28}{loop:>16.1f}{min(loop_ms):>10.1f}{max(loop_ms):>10.1f}")
    print(f"{'pure update (copies table)':<28}{statistics.median(pure_ms):>16.1f}{min(pure_ms):>10.1f}{max(pure_ms):>10.1f}")
    print(f"({args.reps} batches of {args.groups:,} groups on {args.prompts:,} prompts; "
          f"median {statistics.median(n_updates):.0f} temperature updates per batch; table now {table.height:,} rows)")
    print(f"RESULT ms_per_10k={vec * scale:.1f} loop_ms_per_10k={loop * scale:.1f} ratio={loop / vec:.1f}")


if __name__ == "__main__":
    main()
