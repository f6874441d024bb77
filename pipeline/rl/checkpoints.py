"""The learner's checkpoints: what a checkpoint holds besides model and optimiser (`LearnerState`),
where checkpoints live, how one is written (a collective: every rank calls `save_checkpoint`),
found again and restored (`restore_learner`), or moved aside for a fresh start; which consumed offsets may be committed
(`OffsetTracker`: never past a group not yet trained); and what is due after a step (`after_step`:
checkpoint, publish, export), which every rank decides with the same function.

A checkpoint is one folder ``<workdir>/checkpoints/step-<N>``: the trainer's state (``trainer/``)
and ``learner.json``, written to a temporary folder and renamed, so a crash leaves the previous
one intact. The learner commits offsets to the broker only after the checkpoint holding them is
in place (`pipeline.flow.commit`).
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.atomic import fsync_dir, write_atomic
from pipeline.config import LearnerConfig, RunConfig
from pipeline.failpoints import failpoint
from pipeline.model.weights import published_versions
from pipeline.rl.trainer import Trainer

LEARNER_STATE = "learner.json"

log = logging.getLogger(__name__)


@dataclass
class OffsetTracker:
    """Which polled records are fully processed, so commits never pass an untrained group."""

    open_groups: dict[tuple[str, int, int], int] = field(default_factory=dict)
    """(topic, partition, offset) -> groups of that record not yet trained on or dropped."""

    def add(self, key: tuple[str, int, int], groups: int) -> None:
        if groups:
            self.open_groups[key] = self.open_groups.get(key, 0) + groups

    def done(self, key: tuple[str, int, int]) -> None:
        self.open_groups[key] -= 1
        if self.open_groups[key] == 0:
            del self.open_groups[key]

    def committable(self, positions: dict[tuple[str, int], int]) -> dict[tuple[str, int], int]:
        out = dict(positions)
        for (topic, part, offset) in self.open_groups:
            if (topic, part) in out:
                out[(topic, part)] = min(out[(topic, part)], offset)
        return out


STATE_FORMAT = 1
"""The format of `learner.json` this code writes and reads; another one is refused, naming both."""


@dataclass
class LearnerState:
    """Everything besides model and optimiser that a checkpoint must restore."""

    step: int = 0
    version: int = 0
    received: int = 0
    trained: int = 0
    dropped: int = 0
    filtered: int = 0
    duplicates: int = 0
    invalid: int = 0
    """Groups dead-lettered by a check (their tickets stay outstanding)."""
    reissued: int = 0
    """Tickets issued again because their lease ran out."""
    ticket_position: int = 0
    """Tickets issued (the ticket source's position)."""
    outstanding: dict[str, int] = field(default_factory=dict)
    """Tickets issued and not yet decided (groups waiting in the batch included), with their attempt."""
    offsets: dict[tuple[str, int], int] = field(default_factory=dict)
    seen: list[str] = field(default_factory=list)
    """Tickets decided (trained, dropped or abandoned), oldest first, at most the learner's
    `TicketBook.decided` window."""

    def tally(self, fate: str) -> None:
        """Count one triaged group (`pipeline.flow.intake.Outcome.fate`; dead letters are not counted
        here: `invalid` counts the groups the checks refuse)."""
        self.received += fate not in ("deadletter", "duplicate")
        self.duplicates += fate == "duplicate"
        self.dropped += fate == "dropped_stale"
        self.filtered += fate in ("dropped_all_wrong", "dropped_all_correct")

    def to_json(self) -> str:
        d = {k: v for k, v in self.__dict__.items() if k != "offsets"}
        d["offsets"] = [[t, p, o] for (t, p), o in sorted(self.offsets.items())]
        return json.dumps({"format": STATE_FORMAT, **d})

    @classmethod
    def from_json(cls, text: str) -> LearnerState:
        d = json.loads(text)
        found = d.pop("format", None)
        if found != STATE_FORMAT:
            raise ValueError(f"learner state of format {found!r} (none: written before formats were numbered); "
                             f"this rlstream reads format {STATE_FORMAT}")
        d["offsets"] = {(str(t), int(p)): int(o) for t, p, o in d["offsets"]}
        return cls(**d)


def checkpoint_root(cfg: RunConfig) -> Path:
    return cfg.workdir / "checkpoints"


def complete_checkpoints(cfg: RunConfig) -> list[Path]:
    """The complete checkpoints (`step-*` folders with their learner.json), newest first."""
    done = [p for p in checkpoint_root(cfg).glob("step-*") if (p / LEARNER_STATE).exists()]
    return sorted(done, key=lambda p: int(p.name.split("-")[1]), reverse=True)


def latest_checkpoint(cfg: RunConfig) -> Path | None:
    """The newest complete checkpoint, or None."""
    done = complete_checkpoints(cfg)
    return done[0] if done else None


def save_checkpoint(cfg: RunConfig, trainer: Trainer, state: LearnerState) -> Path:
    """Model, optimiser and learner state together, written to a temporary folder and renamed,
    so a crash leaves the previous checkpoint intact. A collective: every rank calls it."""
    root = checkpoint_root(cfg)
    final, tmp = root / f"step-{state.step:08d}", root / f".step-{state.step:08d}.tmp"
    if trainer.rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    trainer.barrier()
    trainer.save(tmp / "trainer")
    trainer.barrier()
    if trainer.rank == 0:
        failpoint("learner.checkpoint")
        write_atomic(tmp / LEARNER_STATE, state.to_json())
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        fsync_dir(root)
        done = sorted((p for p in root.glob("step-*") if p.is_dir()), key=lambda p: int(p.name.split("-")[1]))
        for old in done[: -cfg.learner.checkpoint.keep]:
            shutil.rmtree(old, ignore_errors=True)
    trainer.barrier()
    return final


def newest_published_version(cfg: RunConfig) -> int:
    return max((v for v, _ in published_versions(cfg.workdir / "policies")), default=0)


@dataclass(frozen=True)
class Due:
    """What is due after a training step. Gathering the weights and saving a checkpoint are
    collectives, so every rank must reach the same answer: all of them call `after_step`."""

    publish: bool
    """A new policy version for the rollouts (rank 0 publishes it)."""
    export: bool
    """A Hugging Face folder of the weights (rank 0 writes it)."""
    checkpoint: bool
    """A checkpoint (every rank saves its share; rank 0 then commits the offsets it holds)."""

    @property
    def weights(self) -> bool:
        """The full weights are gathered (a collective under ZeRO-3): to publish or to export."""
        return self.publish or self.export


def after_step(step: int, lc: LearnerConfig) -> Due:
    """What is due after training step ``step`` (counted from 1): publish every `sync_every` steps,
    export every `checkpoint.export_every` steps (0: never), checkpoint every `checkpoint.every`
    steps, and all three after the final step (`total_steps`)."""
    last = step == lc.total_steps
    return Due(publish=step % lc.sync_every == 0 or last,
               export=(lc.checkpoint.export_every > 0 and step % lc.checkpoint.export_every == 0) or last,
               checkpoint=step % lc.checkpoint.every == 0 or last)


def start_fresh(cfg: RunConfig) -> Path | None:
    """`learner.checkpoint.resume = "fresh"`: move the previous life's checkpoints and ledger aside (never
    deleted); returns where they went, None if there was nothing."""
    old = [p for p in (checkpoint_root(cfg), cfg.workdir / "ledger") if p.exists()]
    if not old:
        return None
    aside = cfg.workdir / time.strftime("previous-%Y%m%d-%H%M%S")
    aside.mkdir(parents=True)
    for p in old:
        p.rename(aside / p.name)
    return aside


def restore_learner(cfg: RunConfig, trainer: Trainer) -> tuple[LearnerState, bool]:
    """The state a learner starts from, by `learner.checkpoint.resume`: the newest checkpoint's (loaded into
    ``trainer``) or a fresh one (moving a previous life aside under ``fresh``). Returns the state and
    whether it came from a checkpoint."""
    lc = cfg.learner
    candidates = complete_checkpoints(cfg) if lc.checkpoint.resume != "fresh" else []
    if lc.checkpoint.resume == "require" and not candidates:
        raise FileNotFoundError(f"learner.checkpoint.resume = 'require' but {checkpoint_root(cfg)} holds no checkpoint")
    unreadable = []
    for ckpt in candidates:
        # A checkpoint that does not load (a disk that lost a file, a torn copy) must not make the
        # learner crash-loop: the previous one is a complete state too, and the ledger and the
        # ticket leases make the steps after it safe to redo.
        try:
            state = LearnerState.from_json((ckpt / LEARNER_STATE).read_text())
            trainer.load(ckpt / "trainer")
        except Exception as e:  # noqa: BLE001 -- whatever the damage, try the previous checkpoint
            log.error("checkpoint %s does not load (%s: %s); trying the previous one", ckpt, type(e).__name__,
                      str(e)[:300])
            unreadable.append(ckpt.name)
            continue
        log.log(logging.WARNING if unreadable else logging.INFO, "resumed from %s: step %d, policy v%d%s", ckpt,
                state.step, state.version, f" (newer, unreadable: {', '.join(unreadable)})" if unreadable else "")
        return state, True
    if candidates:
        raise RuntimeError(f"no checkpoint under {checkpoint_root(cfg)} loads ({', '.join(unreadable)}): move them "
                           "aside to start over, or set learner.checkpoint.resume = 'fresh'")
    if lc.checkpoint.resume == "fresh" and trainer.rank == 0:
        aside = start_fresh(cfg)
        if aside is not None:
            log.warning("learner.checkpoint.resume = 'fresh': starting over at step 0; the previous checkpoints and ledger "
                        "were moved to %s", aside)
    return LearnerState(), False
