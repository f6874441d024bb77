"""Where a demo trajectory's time goes: CPU seconds of every process of `rlstream demo`, per
trajectory, and (with `--py-spy`) each service's hottest functions.

Starts `rlstream demo` (with `--set` overrides), finds its processes (the launcher, the Tansu
broker, learner, reward and its verifier workers, rollout, recorder) by their command lines, and
reads their CPU times (user + system) once a second while RL runs: from the first training step to
the learner's exit. With `--py-spy`, `py-spy record` samples each Python service for `--spy-s`
seconds from the middle of the run and the script prints the functions with the most own samples.

Usage:
    python bench/profile_demo.py [--set KEY=VALUE ...] [--py-spy] [--spy-s 30] [--out runs/profile]
The last line is `RESULT traj_per_s=… cpu_ms_per_traj=… <service>_share=…` (share of all CPU time
of the run's processes during RL; the machine's cores bound the sum of CPU seconds per second).
"""

from __future__ import annotations

import argparse
import collections
import json
import re
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SERVICES = ("learner", "reward", "rollout", "recorder")


def service_of(cmdline: list[str], launcher_pid: int, pid: int) -> str | None:
    """Which part of the demo a process is, from its command line (None: not the demo's)."""
    if pid == launcher_pid:
        return "launcher"
    text = " ".join(cmdline)
    if "tansu" in text:
        return "broker"
    if "services.cli" in text:
        for name in SERVICES:
            if f"services.cli {name}" in text:
                return name
    if "multiprocessing" in text or "verifier" in text:
        return "verifier"
    return "other"


def top_frames(raw: str, n: int = 8) -> list[tuple[str, float]]:
    """The functions with the most own samples in py-spy's raw (collapsed) output, as shares."""
    own: collections.Counter = collections.Counter()
    total = 0
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        own[re.sub(r":\d+\)$", ")", stack.split(";")[-1])] += int(count)  # "func (file:line)" -> "func (file)"
        total += int(count)
    return [(name, c / total) for name, c in own.most_common(n)] if total else []


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="demo override (TOML)")
    ap.add_argument("--py-spy", action="store_true", help="also sample each Python service with py-spy")
    ap.add_argument("--spy-s", type=int, default=30, help="seconds py-spy samples each service")
    ap.add_argument("--out", type=Path, default=Path("runs/profile"))
    args = ap.parse_args()
    import psutil

    args.out.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "services.cli", "demo", "--set", f'workdir="{args.out.resolve()}"']
    for s in args.set:
        cmd += ["--set", s]
    log_path = args.out / "demo.log"
    print(f"$ {' '.join(cmd)}  (output in {log_path})", flush=True)
    log = log_path.open("w")
    demo = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, text=True)
    launcher = psutil.Process(demo.pid)
    cpu: dict[int, tuple[str, float]] = {}  # pid -> (service, CPU seconds at the last reading)
    start: dict[int, float] = {}  # pid -> CPU seconds when RL started
    t_rl = t_end = None
    spies: list[tuple[str, subprocess.Popen, Path]] = []
    learner_seen = False
    while demo.poll() is None:
        time.sleep(1.0)
        text = log_path.read_text(errors="replace")
        try:
            procs = [launcher] + launcher.children(recursive=True)
        except psutil.NoSuchProcess:
            break
        alive_learner = False
        for p in procs:
            try:
                with p.oneshot():
                    name = service_of(p.cmdline(), demo.pid, p.pid)
                    t = p.cpu_times()
                    cpu[p.pid] = (name, t.user + t.system)
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
            alive_learner |= name == "learner"
        learner_seen |= alive_learner
        if t_rl is None and re.search(r"^\[\s*\d+s\] step\s+\d+/", text, re.M):
            t_rl = time.monotonic()
            start = {pid: c for pid, (_, c) in cpu.items()}
            print("RL started: measuring", flush=True)
        if t_rl is not None and t_end is None and learner_seen and not alive_learner:
            t_end = time.monotonic()
            print("the learner finished", flush=True)
        if args.py_spy and t_rl is not None and not spies and time.monotonic() - t_rl > 20:
            for pid, (name, _) in cpu.items():
                if name in SERVICES:
                    raw = args.out / f"py-spy-{name}-{pid}.txt"
                    spies.append((name, subprocess.Popen(
                        ["py-spy", "record", "--pid", str(pid), "--duration", str(args.spy_s), "--rate", "50",
                         "--format", "raw", "--nonblocking", "--output", str(raw)],
                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL), raw))
            print(f"py-spy: sampling {', '.join(n for n, _, _ in spies)} for {args.spy_s} s", flush=True)
    demo.wait()
    log.close()
    if t_rl is None:
        print(f"the demo never trained (exit {demo.returncode}); see {log_path}", flush=True)
        return 1
    t_end = t_end or time.monotonic()
    rl_s = t_end - t_rl
    run_dir = Path(re.search(r"in (\S+)\n", log_path.read_text()).group(1))
    rollouts = sorted((run_dir / "progress").glob("rollout-*.jsonl"))
    groups = sum(json.loads(f.read_text().splitlines()[-1])["groups"] for f in rollouts)
    size = json.loads((run_dir / "config.json").read_text())["rollout"]["group_size"]
    trajectories = groups * size
    by_service: collections.Counter = collections.Counter()
    for pid, (name, c) in cpu.items():
        by_service[name] += c - start.get(pid, 0.0)
    total = sum(by_service.values())
    print(f"\nRL: {rl_s:.0f} s (first step to the learner's exit), {trajectories:,} trajectories sampled "
          f"({trajectories / rl_s:.0f}/s); CPU of the demo's processes: {total:.0f} s "
          f"({total / rl_s:.2f} cores busy on average)")
    print(f"{'process':>10} {'CPU s':>8} {'share':>7} {'ms/traj':>8}")
    for name, c in by_service.most_common():
        print(f"{name:>10} {c:8.1f} {c / total:7.1%} {1000 * c / trajectories:8.2f}")
    for name, proc, raw in spies:
        proc.wait()
        if raw.exists():
            print(f"\n{name}: functions with the most own samples (py-spy, {args.spy_s} s)")
            for frame, share in top_frames(raw.read_text()):
                print(f"  {share:6.1%}  {frame}")
    shares = " ".join(f"{n}_share={c / total:.3f}" for n, c in by_service.most_common())
    print(f"RESULT traj_per_s={trajectories / rl_s:.1f} cpu_ms_per_traj={1000 * total / trajectories:.2f} {shares}")
    return demo.returncode


if __name__ == "__main__":
    raise SystemExit(main())
