"""Supervised warm-start of the tiny default policy, cached on disk.

RL needs a policy whose sampled accuracy is neither 0 nor 1, so the embedded default first trains
the randomly initialised model on problems with their answers for a fixed number of steps (not
seconds, so the result does not depend on the machine's speed). The result is saved, with its
tokenizer, in a folder named by the hash of everything that determines it; a second run with the
same settings loads it instead of training again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
import os
import shutil
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from pipeline.atomic import file_lock, fsync_dir
from pipeline.config import ArithmeticTaskConfig, PromptConfig, WarmstartConfig
from pipeline.data.tasks import arithmetic_stream
from pipeline.model.policy import build_char_tokenizer, build_tiny_qwen2, count_parameters
from pipeline.model.prompts import PromptFormat
from pipeline.model.batch import pack, token_logprobs

log = logging.getLogger(__name__)


def warmstart_key(cfg: WarmstartConfig, task: ArithmeticTaskConfig) -> str:
    """Hash of the settings that determine the warm-started weights (the habit's settings only
    when it is on, so the caches of warm-starts without one stay valid)."""
    settings = cfg.model_dump(mode="json")
    if cfg.habit_rate == 0:
        for key in ("habit", "habit_rate", "habit_min_terms"):
            settings.pop(key)
    if cfg.worked_rate == 0:
        settings.pop("worked_rate")
    blob = json.dumps([settings, task.difficulty_weights, task.ops, task.heldout_per_mille], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def _noisy_answers(answers: list[int], noise: float, rng: np.random.Generator) -> list[str]:
    """Replace a `noise` fraction of the answers by the answer plus a non-zero offset in [-10, 10]."""
    values = np.asarray(answers, dtype=np.int64)
    offsets = rng.integers(1, 11, size=len(values)) * rng.choice([-1, 1], size=len(values))
    noisy = rng.random(len(values)) < noise
    return [str(v) for v in np.where(noisy, values + offsets, values)]


def habit_answer(text: str, answer: int, habit: str, min_terms: int = 4) -> int | None:
    """What the warm-start's bad habit answers to ``text`` (correct answer ``answer``), or None
    where it does not apply: ``drop_minus_sign`` gives ``|answer|`` for a negative answer,
    ``drop_last_operand`` the value without the last operand for ``min_terms`` operands or more."""
    if habit == "drop_minus_sign":
        return -answer if answer < 0 else None
    terms = re.findall(r"[+-]?\d+", text.rstrip("="))
    return sum(int(t) for t in terms[:-1]) if len(terms) >= min_terms else None


def _habit_targets(problems, targets: list[str], cfg: WarmstartConfig, rng: np.random.Generator) -> list[str]:
    """Replace the targets of a `habit_rate` fraction of the problems the habit applies to by the
    habit's answer."""
    if cfg.habit_rate <= 0:
        return targets
    out = list(targets)
    for i, p in enumerate(problems):
        wrong = habit_answer(p.text, int(p.answer), cfg.habit, cfg.habit_min_terms)
        if wrong is not None and rng.random() < cfg.habit_rate:
            out[i] = str(wrong)
    return out


def worked_solution(text: str) -> str:
    """A problem's worked solution: a space, then the running total after each operand from the
    second on (``3+4-2=`` -> `` 7 5``); its last number is the answer."""
    terms = [int(t) for t in re.findall(r"[+-]?\d+", text.rstrip("="))]
    totals = np.cumsum(terms)[1:]
    return " " + " ".join(str(int(t)) for t in totals)


def answer_style(completion: str) -> str:
    """``worked`` for a completion that starts like a worked solution (a space), else ``terse``."""
    return "worked" if completion.startswith(" ") else "terse"


def _worked_targets(problems, targets: list[str], rate: float, rng: np.random.Generator) -> list[str]:
    """Replace a `rate` fraction of the targets by the problems' (correct) worked solutions."""
    if rate <= 0:
        return targets
    worked = rng.random(len(problems)) < rate
    return [worked_solution(p.text) if w else t for p, t, w in zip(problems, targets, worked)]


def warmstart(cfg: WarmstartConfig, task: ArithmeticTaskConfig, cache_dir: Path,
              progress: Callable[[str], None] | None = None) -> Path:
    """Return the folder of the warm-started model, training it first if it is not cached.

    Several runs (or services) may start at once on one cache: the build holds a file lock, so
    the second waits and then finds the model built; it is published by a rename, so nobody ever
    reads a half-written folder."""
    out = Path(cache_dir) / f"warmstart-{warmstart_key(cfg, task)}"
    if (out / "model.safetensors").exists():
        return out
    with file_lock(out.with_name(f".{out.name}.lock")):
        if not (out / "model.safetensors").exists():
            _build(cfg, task, out, progress or log.info)
    return out


def _build(cfg: WarmstartConfig, task: ArithmeticTaskConfig, out: Path, say: Callable[[str], None]) -> None:
    torch.manual_seed(cfg.seed)
    tokenizer = build_char_tokenizer()
    model = build_tiny_qwen2(len(tokenizer), hidden_size=cfg.hidden_size, layers=cfg.layers,
                             heads=cfg.heads, kv_heads=cfg.kv_heads,
                             intermediate_size=cfg.intermediate_size, seed=cfg.seed)
    say(f"warm-start: {count_parameters(model) / 1e6:.2f}M-parameter Qwen2, {cfg.steps} steps "
        f"of {cfg.batch_size} problems (cached in {out})")
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.01, betas=(0.9, 0.98))
    warm = max(1, cfg.steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(s, cfg.steps) / cfg.steps)))
    stream = arithmetic_stream(cfg.seed, task.difficulty_weights_map(), task.ops,
                               task.heldout_per_mille)
    eos = tokenizer.eos_token_id
    prompt_format = PromptFormat(tokenizer, PromptConfig(template="plain"))
    noise_rng = np.random.default_rng(cfg.seed + 1)
    habit_rng = np.random.default_rng(cfg.seed + 2)
    worked_rng = np.random.default_rng(cfg.seed + 3)
    model.train()
    t0 = time.monotonic()
    for step in range(1, cfg.steps + 1):
        problems = [next(stream) for _ in range(cfg.batch_size)]
        prompts = [np.asarray(p, dtype=np.int32) for p in prompt_format.encode([p.text for p in problems])]
        targets = _noisy_answers([int(p.answer) for p in problems], cfg.label_noise, noise_rng)
        targets = _habit_targets(problems, targets, cfg, habit_rng)
        targets = _worked_targets(problems, targets, cfg.worked_rate, worked_rng)
        answers = [np.asarray(tokenizer.encode(a, add_special_tokens=False) + [eos], dtype=np.int32)
                   for a in targets]
        batch = pack(prompts, answers, [1.0] * len(problems), tokenizer.pad_token_id)
        lp, _ = token_logprobs(model, batch)
        loss = -(lp * batch.completion_mask).sum() / batch.completion_mask.sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % max(1, cfg.steps // 10) == 0 or step == cfg.steps:
            say(f"warm-start step {step}/{cfg.steps} loss={loss.item():.4f} "
                f"elapsed={time.monotonic() - t0:.0f}s")
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    (tmp / "warmstart.json").write_text(json.dumps(
        {"warmstart": cfg.model_dump(mode="json"), "task": task.model_dump(mode="json")}, indent=2))
    shutil.rmtree(out, ignore_errors=True)  # an incomplete folder from before (no weights file)
    tmp.rename(out)
    fsync_dir(out.parent)
