"""What every service process shares: logging, graceful stop, the initial policy, progress files."""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path

from pipeline.config import RunConfig

log = logging.getLogger(__name__)


def setup_logging(service: str, level: str = "INFO") -> None:
    logging.basicConfig(
        level=level,
        format=f"%(asctime)s {service} %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
        force=True,
    )
    logging.getLogger("kafka").setLevel(logging.WARNING)


class StopFlag:
    """Set by SIGTERM/SIGINT so a service finishes its current batch and exits cleanly.

    A clean exit needs the broker (to flush and leave the group); if it is gone too, the process
    would wait on it, so the first signal also arms a hard exit after `grace_s` seconds, and a
    second signal exits at once.
    """

    def __init__(self, grace_s: float = 20.0) -> None:
        self._event = threading.Event()
        self._grace_s = grace_s
        signal.signal(signal.SIGTERM, self._set)
        signal.signal(signal.SIGINT, self._set)

    def _set(self, signum, frame) -> None:
        if self._event.is_set():
            log.warning("second signal %d: exiting now", signum)
            os._exit(128 + signum)
        log.info("signal %d: stopping after the current batch (hard exit in %.0fs)", signum, self._grace_s)
        self._event.set()
        timer = threading.Timer(self._grace_s, os._exit, args=(128 + signum,))
        timer.daemon = True
        timer.start()

    def __bool__(self) -> bool:
        return self._event.is_set()


def initial_policy_path(cfg: RunConfig) -> Path:
    """Folder of the policy the run starts from: `model.path`, `model.pretrained`'s cached folder
    (fetched now if missing), or the cached warm-start (trained now if missing)."""
    if cfg.model.path is not None:
        return cfg.model.path
    if cfg.model.pretrained is not None:
        from infra.models import cached, fetch

        return cached(cfg.model.pretrained) or fetch(cfg.model.pretrained, progress=lambda m: log.info("%s", m))
    from pipeline.model.warmstart import warmstart

    assert cfg.task.kind == "arithmetic"  # enforced by RunConfig's validator
    return warmstart(cfg.model.warmstart, cfg.task, cfg.cache_dir)


def load_initial_policy(cfg: RunConfig):
    """(model, tokenizer) of the policy the run starts from (`initial_policy_path`), loaded strictly
    (`pipeline.model.policy.load_policy`) with the run's `model.trust_remote_code`."""
    from pipeline.model.policy import load_policy

    return load_policy(initial_policy_path(cfg), trust_remote_code=cfg.model.trust_remote_code)


def load_learner_models(cfg: RunConfig):
    """(policy in training mode, frozen reference or None, tokenizer) for the learner: the
    reference is the initial policy again, loaded only when the KL term needs one."""
    from pipeline.rl.losses import KL_TERMS

    model, tokenizer = load_initial_policy(cfg)
    model.train()
    if cfg.learner.gradient_checkpointing:
        model.config.use_cache = False
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ref_model = None
    if KL_TERMS[cfg.learner.kl.kind].reference:
        ref_model, _ = load_initial_policy(cfg)
        ref_model.eval().requires_grad_(False)
    return model, ref_model, tokenizer


def set_threads(n: int | None) -> None:
    """Limit torch's intra-op threads (several services share few cores)."""
    import torch

    if n:
        torch.set_num_threads(n)


class JsonlWriter:
    """Appends one JSON object per line, flushed at once (progress for the launcher and users)."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._f = open(path, "a", buffering=1)

    def write(self, **record) -> None:
        record.setdefault("time", time.time())
        self._f.write(json.dumps(record) + "\n")

    def close(self) -> None:
        self._f.close()


def worker_id() -> str:
    return os.environ.get("RLSTREAM_WORKER", f"{os.uname().nodename}-{os.getpid()}")


def erpo_rule(cfg: RunConfig):
    """The ERPO rule of a run's `[erpo]` section (the engine range is [0, 2])."""
    from pipeline.erpo.rule import ErpoRule
    from pipeline.flow.validate import MAX_TEMPERATURE

    e = cfg.erpo
    return ErpoRule(tau0=e.tau0, delta_tau=e.delta_tau, tau_max=e.tau_max, engine_max=MAX_TEMPERATURE,
                    history=e.history, decay=e.decay, ra_delta=e.ra_delta, enabled=e.enabled)


_CLAIMED: list = []
"""Open, locked claim files of `claim_worker_index`: held until the process exits."""


def claim_worker_index(workdir: Path, service: str, limit: int = 1024) -> int:
    """The lowest worker index no live process of `service` holds in this run: an exclusive
    `flock` on `<workdir>/workers/<service>-<i>.lock`, held until this process exits (the kernel
    releases it when the process dies, however it dies). For replicas that share the run folder
    and cannot be numbered from outside (`docker compose up --scale rollout=N`). The folder must be
    on a file system whose locks every replica sees: one host's volume, not a multi-node NFS share
    (on Kubernetes, number StatefulSet pods by their ordinal instead)."""
    import fcntl
    import socket

    folder = Path(workdir) / "workers"
    folder.mkdir(parents=True, exist_ok=True)
    for index in range(limit):
        f = open(folder / f"{service}-{index}.lock", "a+")  # noqa: SIM115 (held for the process's life)
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.close()
            continue
        f.truncate(0)
        f.write(f"{socket.gethostname()} pid {os.getpid()}\n")
        f.flush()
        _CLAIMED.append(f)
        return index
    sys.exit(f"rlstream {service}: --worker-index auto found all {limit} indexes of {folder} held by live processes")
