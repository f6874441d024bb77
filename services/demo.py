"""`rlstream demo`: the whole loop on one machine, with a before/after held-out evaluation.

Warm-starts (or loads) the tiny default policy, evaluates it on held-out problems, starts an
embedded Tansu broker on loopback and every service as a subprocess (learner, reward, rollout),
shows live progress from their progress files, waits for the learner to finish, stops everything,
evaluates the final policy and prints ``RESULT acc_before=… acc_after=… wall_s=…``.

Ctrl-C (or SIGTERM) stops every child process and the broker; children also get SIGTERM from the
kernel if the launcher itself dies (PR_SET_PDEATHSIG), so nothing is left running.
"""

from __future__ import annotations

import dataclasses
import gc
import hashlib
import json
import os
import shutil
import signal
import sys
import time
from pathlib import Path

from infra.broker import Broker, die_with_parent
from pipeline.config import ConfigError, RunConfig
from pipeline.transport.signature import create_key
from services.metrics import serve
from services.supervisor import GaveUp, Supervisor, tail

def _last_json(path: Path) -> dict | None:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 8192))
            lines = f.read().decode(errors="replace").strip().splitlines()
        return json.loads(lines[-1]) if lines else None
    except (FileNotFoundError, json.JSONDecodeError, IndexError):
        return None


def _progress_line(run_dir: Path, cfg: RunConfig, t0: float) -> str:
    lr = _last_json(run_dir / "progress" / "learner.jsonl")
    ro = [_last_json(p) for p in sorted((run_dir / "progress").glob("rollout-*.jsonl"))]
    ro = [r for r in ro if r]
    tok = sum(r["tokens"] for r in ro)
    el = time.monotonic() - t0
    if not lr:
        return f"[{el:5.0f}s] waiting for the first training step (rollout groups so far: " \
               f"{sum(r['groups'] for r in ro)})"
    return (f"[{el:5.0f}s] step {lr['step']:4d}/{cfg.learner.total_steps} policy v{lr['version']} "
            f"reward {lr['reward']:.3f} all-correct {lr['all_correct_frac']:.2f} "
            f"lag {lr['lag_mean']:.2f} dropped {lr['dropped']} "
            f"| {lr['groups_per_s']:.1f} groups/s, {tok / max(el, 1e-9):.0f} tok/s generated")


def _eval_progress(message: str) -> None:
    print(f"  held-out evaluation, {message}", flush=True)


def _budget_line(b) -> str:
    """pass@k and diversity of a `pipeline.rollout.evaluate.BudgetResult`, on one line."""
    ks = " ".join(f"pass@{k} {v:.3f}" for k, v in b.pass_at.items())
    return (f"{ks}; solved at least once {int((b.correct > 0).sum())}; distinct answers {b.distinct_answers:.2f}; "
            f"token entropy {b.entropy:.3f}")


def base_eval_key(cfg: RunConfig, policy_path: Path, heldout, device: str = "cpu") -> str:
    """Hash of everything the base model's held-out evaluation depends on: its weight files (path,
    size and modification time: a model folder is written once, and hashing a real model's
    gigabytes would cost more than it saves), the problems, the evaluation and generation settings
    (with vLLM's resolved dtype, `eval_dtype`, so an fp32 evaluation is the same whichever way it
    was asked for), the sampling seed, the device and the verifier's version. Runs that differ
    only in how they train (the arms of `bench/experiments.py`) share it."""
    from pipeline.verify.verifier import VERIFIER_VERSION

    weights = [(str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns)
               for f in sorted(Path(policy_path).glob("*.safetensors"))]
    blob = json.dumps([weights, [p.prompt_id for p in heldout], cfg.eval.model_dump(mode="json", exclude={"dtype"}),
                       cfg.prompt.model_dump(mode="json"), cfg.rollout.max_new_tokens, cfg.seed, device,
                       VERIFIER_VERSION] + ([eval_dtype(cfg)] if cfg.eval.engine == "vllm" else []),
                      sort_keys=True)
    return "base-" + hashlib.sha256(blob.encode()).hexdigest()[:16]


def save_base_eval(cache_dir: Path, key: str, before, budget) -> None:
    """Keep the base model's evaluation (`base_eval_key`) for the next run with the same settings."""
    from pipeline.atomic import write_atomic

    record = {"before": dataclasses.asdict(before),
              "budget": None if budget is None else {**dataclasses.asdict(budget), "correct": budget.correct.tolist()}}
    path = Path(cache_dir) / "evals" / f"{key}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, json.dumps(record, default=lambda x: x.item()))  # numpy scalars


def load_base_eval(cache_dir: Path, key: str):
    """(EvalResult, BudgetResult or None) saved by `save_base_eval`, or None if there is none."""
    import numpy as np

    from pipeline.rollout.evaluate import BudgetResult, EvalResult

    path = Path(cache_dir) / "evals" / f"{key}.json"
    if not path.exists():
        return None
    record = json.loads(path.read_text())
    budget = record["budget"]
    if budget is not None:
        budget = BudgetResult(**{**budget, "correct": np.asarray(budget["correct"], dtype=np.int64),
                                 "pass_at": {int(k): v for k, v in budget["pass_at"].items()}})
    return EvalResult(**record["before"]), budget


def budget_batch(ev) -> int:
    """Problems per generate call of the sampling-budget measures (each with `budget_samples` samples)."""
    return max(1, ev.batch_size // max(1, ev.budget_samples))


def base_evaluation(cfg: RunConfig, engine, policy_path: Path, heldout, device: str = "cpu"):
    """(EvalResult, BudgetResult or None) of the base model on `heldout` (`engine` holds it): from
    the cache when a run with the same `base_eval_key` made it, else measured and cached."""
    from pipeline.rollout.evaluate import evaluate, sample_budget

    ev = cfg.eval
    key = base_eval_key(cfg, policy_path, heldout, device)
    cached = load_base_eval(cfg.cache_dir, key)
    if cached is not None:
        print(f"held-out before RL: the base model's evaluation with these settings is cached "
              f"({cfg.cache_dir / 'evals' / key}.json)", flush=True)
        return cached
    before = evaluate(engine, heldout, ev.temperature, ev.samples, ev.batch_size, _eval_progress)
    budget = None
    if ev.budget_samples:
        budget = sample_budget(engine, heldout[: ev.budget_problems], ev.budget_samples, ev.temperature,
                               budget_batch(ev))
    save_base_eval(cfg.cache_dir, key, before, budget)
    return before, budget


def eval_dtype(cfg: RunConfig) -> str:
    """vLLM's dtype for the held-out evaluation: `eval.dtype`, else the rollout's."""
    return cfg.eval.dtype or cfg.rollout.dtype


def eval_engine(cfg: RunConfig, model, tokenizer, policy_path: Path):
    """The held-out evaluation's engine (`eval.engine`): the torch engine on ``model``, or vLLM on
    the folder ``policy_path`` with the evaluation's dtype (`eval_dtype`) and the rollout's cache
    settings."""
    from pipeline.model.prompts import PromptFormat

    fmt = PromptFormat(tokenizer, cfg.prompt)
    if cfg.eval.engine == "vllm":
        from pipeline.rollout.engine_vllm import VllmEngine

        r = cfg.rollout
        return VllmEngine(policy_path, tokenizer, r.max_new_tokens, seed=cfg.seed, dtype=eval_dtype(cfg),
                          max_model_len=r.max_model_len, kv_cache_gib=r.kv_cache_gib, prompt_format=fmt,
                          trust_remote_code=cfg.model.trust_remote_code)
    from pipeline.rollout.engine import TorchEngine

    return TorchEngine(model, tokenizer, cfg.rollout.max_new_tokens, seed=cfg.seed,
                       prompt_format=fmt)


def run(cfg: RunConfig) -> int:
    import torch

    from pipeline.data.tasks import heldout_problems
    from pipeline.rollout.evaluate import evaluate, sample_budget
    from pipeline.rollout.passk import solved_beyond
    from pipeline.transport.topics import ensure_topics
    from services.common import initial_policy_path, load_initial_policy

    if cfg.task.kind == "file" and cfg.task.eval_path is None:
        raise ConfigError("rlstream demo measures held-out accuracy before and after RL: set task.eval_path "
                          "(JSONL or Parquet of held-out problems); the services alone run without it")
    if cfg.demo.cpus:
        usable = os.sched_getaffinity(0)
        missing = {name: sorted(cfg.demo.cores(name) - usable) for name in cfg.demo.cpus
                   if not cfg.demo.cores(name) <= usable}
        if missing:
            raise ConfigError(f"demo.cpus names cores this process may not use (it may use {sorted(usable)}): {missing}")
        if shutil.which("taskset") is None:
            raise ConfigError("demo.cpus needs `taskset` (util-linux) on the PATH")
    t_start = time.monotonic()
    run_dir = (cfg.workdir / time.strftime("%Y%m%d-%H%M%S")).resolve()
    (run_dir / "logs").mkdir(parents=True)
    print(f"rlstream demo: run {cfg.name!r} in {run_dir}", flush=True)
    if cfg.metrics.enabled:
        scrape = run_dir / "metrics" / "prometheus.yml"
        scrape.parent.mkdir()
        shutil.copy(Path(__file__).resolve().parents[1] / "infra" / "prometheus" / "prometheus.yml", scrape)
        print(f"metrics: every service serves /metrics; to watch them: prometheus --config.file {scrape} "
              f"--storage.tsdb.path {scrape.parent / 'tsdb'} (dashboard: infra/grafana/)", flush=True)

    policy_path = initial_policy_path(cfg)
    model, tokenizer = load_initial_policy(cfg)
    gpu = torch.cuda.is_available()  # evaluate there; off it while the services run
    if gpu:
        model.to("cuda")
    heldout = heldout_problems(cfg)
    ev = cfg.eval
    engine = eval_engine(cfg, model, tokenizer, policy_path)
    budget_set = heldout[: ev.budget_problems]
    before, budget_before = base_evaluation(cfg, engine, policy_path, heldout, "cuda" if gpu else "cpu")
    if ev.engine == "vllm":  # its weights and KV cache leave the machine to the services
        engine.close()
        del engine
        gc.collect()
    if budget_before is not None:
        print(f"held-out before RL ({len(budget_set)} problems x {ev.budget_samples} samples): "
              f"{_budget_line(budget_before)}", flush=True)
    if gpu:
        model.to("cpu")
        torch.cuda.empty_cache()
    print(f"held-out before RL ({before.problems} problems): sampled pass@1 "
          f"{before.sampled_accuracy:.3f} (T={ev.temperature}, {ev.samples} samples), greedy "
          f"{before.greedy_accuracy:.3f}", flush=True)

    store = None
    if cfg.demo.durable:
        from infra.objectstore import ObjectStore

        store = ObjectStore(run_dir / "objectstore", log_path=run_dir / "logs" / "objectstore.log")
    broker = Broker(log_path=run_dir / "logs" / "broker.log")
    sup = Supervisor(run_dir / "logs", preexec_fn=die_with_parent)
    interrupted = False

    def on_signal(signum, frame):
        raise KeyboardInterrupt

    # Explicit for SIGINT too: a launcher started with SIGINT ignored (e.g. in the background of
    # a script) must still stop its children on Ctrl-C.
    old = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        if store is not None:
            store.start()
            broker.storage, broker.env = store.storage_url, store.client_env()
            print(f"durable broker storage: {store.storage_url} on SeaweedFS {store.endpoint} "
                  f"(data in {store.data_dir})", flush=True)
        broker.start()
        child_cfg = cfg.model_copy(update={
            "workdir": run_dir,
            "kafka": cfg.kafka.model_copy(update={
                "bootstrap_servers": broker.bootstrap,
                # the services sign their dead letters with it; the reconcile trusts only those
                "dead_letter_key_file": cfg.kafka.dead_letter_key_file or create_key(run_dir / "dead-letter.key")}),
            "model": cfg.model.model_copy(update={"path": policy_path, "pretrained": None})})
        # The whole resolved config: `rlstream rollout --run-dir <run>` joins this run with it.
        (run_dir / "config.json").write_text(child_cfg.model_dump_json(indent=2))
        serve(child_cfg, "demo", "0")  # the launcher's own metrics: rlstream_supervisor_restarts_total
        ensure_topics(child_cfg.kafka, cfg.name)
        cfg_args = ["--run-dir", str(run_dir)]

        def start(name: str, *argv: str) -> None:
            pinned = ["taskset", "-c", cfg.demo.cpus[name.split("-")[0]]] if cfg.demo.cores(name) else []
            sup.start(name, pinned + [sys.executable, "-m", "services.cli", *argv] + cfg_args)

        start("learner", "learner")
        for i in range(cfg.demo.reward_workers):
            start(f"reward-{i}", "reward", "--worker-index", str(i))
        for i in range(cfg.demo.rollout_workers):
            start(f"rollout-{i}", "rollout", "--worker-index", str(i))
        start("recorder", "recorder")
        print(f"broker {broker.bootstrap}; services: {', '.join(sup.children)} (logs in {run_dir / 'logs'}); "
              f"add a worker: rlstream rollout --run-dir {run_dir} --worker-index 9", flush=True)
        t_rl = time.monotonic()
        last = 0.0
        while not sup.finished("learner"):
            if not broker.running:
                if store is None:
                    print(f"\nthe broker died and its memory storage with it: the run cannot go on (use --durable "
                          f"for a broker that survives restarts); last lines of its log:\n"
                          f"{tail(run_dir / 'logs' / 'broker.log')}", file=sys.stderr)
                    return 1
                print("the broker died: restarting it on its durable storage", file=sys.stderr, flush=True)
                broker.stop()
                broker.start()
                sup.restarts["broker"] = sup.restarts.get("broker", 0) + 1
            for name in sup.tend():
                print(f"{name} crashed and was restarted (restarts so far: {sup.restarts[name]})", flush=True)
            if time.monotonic() - last >= cfg.demo.progress_every_s:
                print(_progress_line(run_dir, cfg, t_rl), flush=True)
                last = time.monotonic()
            time.sleep(0.5)
        print(_progress_line(run_dir, cfg, t_rl), flush=True)
        rl_s = time.monotonic() - t_rl
        # Producers first, then the recorder, which drains the topics into the lake and exits.
        sup.stop([n for n in sup.children if n != "recorder"])
        sup.stop(["recorder"], timeout_s=120)
    except GaveUp as e:
        print(f"\n{e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        interrupted = True
        print("\ninterrupted: stopping every service and the broker", file=sys.stderr)
        return 130
    finally:
        sup.stop()
        broker.stop()
        if store is not None:
            store.stop()
        for sig, handler in old.items():
            signal.signal(sig, handler)
        if interrupted:
            print("all stopped", file=sys.stderr)

    version, sha, uri = (run_dir / "final_policy.txt").read_text().split(maxsplit=2)
    if ev.engine == "vllm":
        engine = eval_engine(cfg, model, tokenizer, policy_path)  # its seeds start over, as before RL
    engine.load_published(uri.strip(), sha, int(version))
    if gpu:
        model.to("cuda")
    if ev.engine == "torch":
        engine.generator.manual_seed(cfg.seed)  # the same draws whether or not `before` came from the cache
    after = evaluate(engine, heldout, ev.temperature, ev.samples, ev.batch_size, _eval_progress)
    budget = {}
    if budget_before is not None:
        budget_after = sample_budget(engine, budget_set, ev.budget_samples, ev.temperature, budget_batch(ev))
        beyond = solved_beyond(budget_before.correct, budget_after.correct)
        print(f"held-out after RL  ({len(budget_set)} problems x {ev.budget_samples} samples): "
              f"{_budget_line(budget_after)}; solved beyond the base model: {beyond}", flush=True)
        budget = {"budget_before": budget_before.summary(), "budget_after": budget_after.summary(),
                  "solved_beyond_base": beyond}
    wall = time.monotonic() - t_start
    print(f"held-out after RL  ({after.problems} problems): sampled pass@1 "
          f"{after.sampled_accuracy:.3f}, greedy {after.greedy_accuracy:.3f} "
          f"(policy v{version}, {rl_s:.0f}s of RL)", flush=True)
    from services.reconcile import summary_line, write_reconciliation
    from services.report import write_report

    print(summary_line(write_reconciliation(run_dir)), flush=True)

    report = write_report(run_dir / "lake", run_dir / "report", title=f"rlstream run {cfg.name!r} ({run_dir.name})")
    print(f"report: {report}", flush=True)
    summary = {"acc_before": before.sampled_accuracy, "acc_after": after.sampled_accuracy,
               "greedy_before": before.greedy_accuracy, "greedy_after": after.greedy_accuracy,
               "rl_s": rl_s, "wall_s": wall, "policy_version": int(version), "restarts": sup.restarts, **budget}
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"RESULT acc_before={before.sampled_accuracy:.4f} acc_after={after.sampled_accuracy:.4f} "
          f"wall_s={wall:.0f} greedy_before={before.greedy_accuracy:.4f} "
          f"greedy_after={after.greedy_accuracy:.4f} restarts={sum(sup.restarts.values())}", flush=True)
    return 0
