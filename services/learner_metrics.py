"""The learner's Prometheus metrics (`services.learner` sets them; the Grafana dashboard reads
them), `observe_step`, which records one training step's figures, and `progress_row`, its line in
the progress file."""

from __future__ import annotations

import numpy as np
from prometheus_client import Counter, Gauge, Histogram

from pipeline.flow.tickets import TicketBook
from pipeline.rl.checkpoints import LearnerState

STEP_SECONDS = Histogram("rlstream_learner_step_seconds", "Wall time of one training step.",
                         buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120))
STEP = Gauge("rlstream_learner_step", "Training steps done.")
VERSION = Gauge("rlstream_learner_policy_version", "Newest policy version published.")
TOKENS = Counter("rlstream_learner_tokens_total", "Completion tokens trained on.")
OVERLONG = Counter("rlstream_learner_overlong_total",
                   "Trained completions cut at rollout.max_new_tokens, by what the loss did with them "
                   "(rollout.overlong: kept or masked).", ["treatment"])
TICKETS = Counter("rlstream_learner_tickets_total", "Prompt tickets issued.")
IN_FLIGHT = Gauge("rlstream_learner_groups_in_flight", "Tickets issued and not yet trained or dropped.")
REISSUED = Counter("rlstream_learner_tickets_reissued_total",
                   "Tickets issued again (next attempt) because no group came back within their lease.")
LEASE = Gauge("rlstream_learner_lease_seconds", "Lease of a ticket issued now: max(floor, factor x p99 ticket-to-group "
              "latency, factor x the awaited tickets' token budgets / generation speed).")
GENERATION_SPEED = Gauge("rlstream_learner_generation_tokens_per_second",
                         "Completion tokens per second the rollouts deliver, measured from the groups that come back "
                         "(0 until the first has).")
GROUPS = Counter("rlstream_learner_groups_total",
                 "Scored groups by fate (see pipeline.flow.ledger: trained, dropped_stale, dropped_all_wrong, dropped_all_correct, "
                 "abandoned, duplicate, unused, unresolved).", ["fate"])
LAG = Histogram("rlstream_learner_staleness_versions",
                "Policy-version lag of each scored group on arrival (learner - behaviour).",
                buckets=(0, 1, 2, 3, 4, 6, 8, 16))
LOSS_PARTS = Gauge("rlstream_learner_loss", "Latest step's loss and its parts.", ["part"])
POLICY_STATS = Gauge("rlstream_learner_policy_stat",
                     "Latest step's clip fraction and importance-weight statistics.", ["stat"])
CHECKPOINT_SECONDS = Histogram("rlstream_learner_checkpoint_seconds", "Time to write a checkpoint.",
                               buckets=(0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60))


def observe_step(state: LearnerState, metrics: dict[str, float], step_s: float) -> None:
    STEP_SECONDS.observe(step_s)
    STEP.set(state.step)
    VERSION.set(state.version)
    TOKENS.inc(metrics["tokens"])
    for name in ("loss", "pg_loss", "kl", "entropy", "reward", "grad_norm", "lr"):
        if name in metrics:
            LOSS_PARTS.labels(name).set(metrics[name])
    for name in ("clip_frac", "is_weight_mean", "is_weight_max", "is_truncated_frac", "is_masked_frac",
                 "overlong_frac"):
        POLICY_STATS.labels(name).set(metrics[name])
    cut = round(metrics["overlong_frac"] * metrics["samples"])
    OVERLONG.labels("masked").inc(metrics["overlong_masked"])
    OVERLONG.labels("kept").inc(cut - metrics["overlong_masked"])


def progress_row(state: LearnerState, book: TicketBook, lags: list[int], step_s: float, elapsed_s: float,
                 metrics: dict[str, float]) -> dict:
    """One line of `progress/learner.jsonl`: the counters, the tickets, the lags since the last step."""
    return dict(step=state.step, version=state.version, step_s=step_s, elapsed_s=elapsed_s,
                issued=book.source.position, received=state.received, dropped=state.dropped,
                filtered=state.filtered, duplicates=state.duplicates, invalid=state.invalid,
                reissued=book.reissued, in_flight=len(book.outstanding),
                lag_mean=float(np.mean(lags)) if lags else 0.0, lag_max=max(lags) if lags else 0,
                groups_per_s=state.received / elapsed_s, **metrics)
