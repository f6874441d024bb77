"""Soak run: the demo for a long time, watching the memory of every process.

Runs `rlstream demo` (the embedded default: broker, learner, reward with its verifier workers,
rollout, recorder) with enough steps to outlast ``--minutes``, samples the resident memory (RSS,
from /proc) of every process of the tree every ``--every`` seconds, stops the demo at the end and
reports, per process, RSS at the end of warm-up, at the end, and the largest: growth after warm-up
must stay within 10%. Not part of CI (30 minutes by default).

The baseline is each process against itself after warm-up (``--warmup`` minutes, default 5: the
learner's optimiser state, the ERPO table, kafka buffers and allocator pools fill up first).

Usage: python bench/soak.py [--minutes 30] [--warmup 5] [--every 10] [--set KEY=VALUE ...]
Writes docs/soak_memory.png (RSS of every process over time) and the samples as CSV next to the
run. The last line is `RESULT minutes=… processes=… max_growth_pct=… worst=… steps=…`.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PAGE = os.sysconf("SC_PAGE_SIZE")


def children_of(root: int) -> list[int]:
    """Every descendant pid of `root` (from /proc/*/stat)."""
    parent: dict[int, int] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                stat = (d / "stat").read_text()
                parent[int(d.name)] = int(stat[stat.rindex(")") + 2:].split()[1])
            except (OSError, ValueError):
                continue
    out, frontier = [], [root]
    while frontier:
        p = frontier.pop()
        kids = [c for c, pp in parent.items() if pp == p]
        out += kids
        frontier += kids
    return out


def label(pid: int) -> str | None:
    """A stable name for a process of the demo tree, or None for short-lived helpers."""
    try:
        argv = (Path("/proc") / str(pid) / "cmdline").read_bytes().split(b"\0")
    except OSError:
        return None
    args = [a.decode(errors="replace") for a in argv if a]
    if not args:
        return None
    exe = Path(args[0]).name
    if exe == "tansu":
        return "broker"
    if exe == "weed":
        return "objectstore"
    if "services.cli" in args:
        i = args.index("services.cli")
        name = args[i + 1] if i + 1 < len(args) else "cli"
        if "--worker-index" in args:
            name += f"-{args[args.index('--worker-index') + 1]}"
        return name
    if "multiprocessing" in " ".join(args) or "spawn_main" in " ".join(args):
        return f"worker-{pid}"  # verifier pool workers (restarted ones get new names)
    return f"{exe}-{pid}"


def rss_bytes(pid: int) -> int | None:
    try:
        return int((Path("/proc") / str(pid) / "statm").read_text().split()[1]) * PAGE
    except (OSError, ValueError, IndexError):
        return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=30)
    ap.add_argument("--warmup", type=float, default=5)
    ap.add_argument("--every", type=float, default=10)
    ap.add_argument("--workdir", type=Path, default=REPO / "runs" / "soak")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--replot", type=Path, default=None, metavar="CSV",
                    help="only redraw the table and plot from a saved soak-memory.csv")
    args = ap.parse_args()
    if args.replot is not None:
        import polars as pl

        df = pl.read_csv(args.replot)
        report(list(df.iter_rows()), args, steps_done=-1, write_csv=False)
        return
    steps = int(args.minutes * 60 / 0.2)  # more than the demo can do in that time
    cmd = [sys.executable, "-m", "services.cli", "demo", "--set", f'workdir="{args.workdir}"',
           "--set", f"learner.total_steps={steps}", "--set", "demo.progress_every_s=60"]
    cmd += [a for s in args.overrides for a in ("--set", s)]
    args.workdir.mkdir(parents=True, exist_ok=True)
    out = open(args.workdir / "soak-demo.log", "w")
    demo = subprocess.Popen(cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT,
                            env=dict(os.environ, PYTHONUNBUFFERED="1"))
    samples: list[tuple[float, str, int]] = []
    t0 = time.monotonic()
    print(f"soak: demo pid {demo.pid} for {args.minutes} min (log {args.workdir / 'soak-demo.log'})", flush=True)
    try:
        while time.monotonic() - t0 < args.minutes * 60:
            if demo.poll() is not None:
                sys.exit(f"the demo exited early with code {demo.returncode}; see {args.workdir / 'soak-demo.log'}")
            now = (time.monotonic() - t0) / 60
            for pid in [demo.pid] + children_of(demo.pid):
                name = "demo" if pid == demo.pid else label(pid)
                rss = rss_bytes(pid)
                if name and rss:
                    samples.append((now, name, rss))
            time.sleep(args.every)
    finally:
        demo.send_signal(signal.SIGINT)
        try:
            demo.wait(120)
        except subprocess.TimeoutExpired:
            demo.kill()
    run_dirs = sorted(p for p in args.workdir.iterdir() if p.is_dir())
    progress = run_dirs[-1] / "progress" / "learner.jsonl" if run_dirs else None
    steps_done = json.loads(progress.read_text().splitlines()[-1])["step"] if progress and progress.exists() else 0
    report(samples, args, steps_done)


def report(samples: list[tuple[float, str, int]], args, steps_done: int, write_csv: bool = True) -> None:
    import polars as pl

    df = pl.DataFrame(samples, schema={"minute": pl.Float64, "process": pl.String, "rss": pl.Int64}, orient="row")
    if write_csv:
        df.write_csv(args.workdir / "soak-memory.csv")
    # Processes that lived through the whole run (not the one-off compiler of DeepSpeed's first
    # start, nor a verifier worker that was replaced).
    end = df["minute"].max()
    rows = []
    for (name,), g in df.group_by("process", maintain_order=True):
        if g["minute"].min() > args.warmup or g["minute"].max() < end - 2 * args.every / 60:
            continue
        after = g.filter(pl.col("minute") >= args.warmup)
        if after.height < 2:
            continue
        base, last, peak = after["rss"][0], after["rss"][-1], after["rss"].max()
        rows.append((name, base / 2**20, last / 2**20, peak / 2**20, 100 * (peak - base) / base))
    rows.sort(key=lambda r: -r[4])
    print(f"{'process':<14} {'after warm-up':>14} {'end':>10} {'peak':>10} {'growth':>8}")
    for name, base, last, peak, growth in rows:
        print(f"{name:<14} {base:>11.0f} MB {last:>7.0f} MB {peak:>7.0f} MB {growth:>7.1f}%")
    plot(df.filter(pl.col("process").is_in([r[0] for r in rows])), args)
    worst = rows[0] if rows else ("none", 0, 0, 0, 0.0)
    print(f"RESULT minutes={end:.1f} processes={len(rows)} max_growth_pct={worst[4]:.1f} worst={worst[0]} "
          f"steps={steps_done}")


def plot(df, args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4.5))
    for (name,), g in df.group_by("process", maintain_order=True):
        if g.height > 1:
            ax.plot(g["minute"].to_numpy(), (g["rss"] / 2**20).to_numpy(), label=name)
    ax.axvline(args.warmup, color="grey", ls="--", lw=1)
    ax.text(args.warmup, ax.get_ylim()[1] * 0.95, " warm-up", color="grey", fontsize=8)
    ax.set_xlabel("minutes")
    ax.set_ylabel("RSS (MiB)")
    ax.set_title("Soak: resident memory of every process of the demo")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    out = REPO / "docs" / "soak_memory.png"
    fig.savefig(out, dpi=110)
    print(f"plot: {out}")


if __name__ == "__main__":
    main()
