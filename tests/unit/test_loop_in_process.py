"""The whole loop in one process on the in-memory broker: the learner issues tickets, the rollout
(torch engine) generates, the reward service scores and keeps ERPO's table, the learner trains,
publishes, and the rollout reloads the published weights. The services' own classes and loops,
no subprocesses, no real broker: seconds instead of the minute the subprocess test takes. (The
subprocess and real-broker versions are tests/integration/test_services.py.) Then the recorder
records the run and the lake reconciles with the learner's ledger."""

from __future__ import annotations

import json
import threading
import uuid

import polars as pl
import pytest

from pipeline.config import load_config
from pipeline.flow.ledger import VIOLATIONS, ledger_path, read_ledger
from pipeline.lake.store import read_topic
from pipeline.transport.memory import MemoryBroker
from pipeline.transport.topics import ensure_topics
from pipeline.verify.verifier import VerifierPool
from services import learner, recorder
from services.cli import shipped_config
from services.reconcile import reconcile_run
from services.reward import Reward
from services.rollout import Rollout

STEPS, GROUPS, G = 3, 4, 4


def _config(tmp_path, dynamic_sampling: str, **extra: str):
    sets = {
        "name": '"loop"', "workdir": f'"{tmp_path / "run"}"', "cache_dir": f'"{tmp_path / "cache"}"',
        "kafka.bootstrap_servers": f'"memory://{uuid.uuid4().hex[:8]}"', "kafka.poll_stall_timeout_s": "0",
        "metrics.enabled": "false", "task.train_pool": "32",
        "model.warmstart.steps": "20", "model.warmstart.hidden_size": "32", "model.warmstart.layers": "2",
        "model.warmstart.heads": "2", "model.warmstart.kv_heads": "1", "model.warmstart.intermediate_size": "64",
        "rollout.engine": '"torch"', "rollout.group_size": str(G), "rollout.max_prompts_per_batch": "4",
        "rollout.poll_timeout_ms": "20", "reward.verifier_workers": "0", "reward.poll_timeout_ms": "20",
        "learner.backend": '"torch"', "learner.groups_per_step": str(GROUPS), "learner.total_steps": str(STEPS),
        "learner.staleness.max_versions": "1", "learner.poll_timeout_ms": "20", "learner.tickets.drain_timeout_s": "20",
        "learner.checkpoint.every": "2", "erpo.snapshot_every": "1",
        "learner.dynamic_sampling": f'"{dynamic_sampling}"', **extra,
    }
    cfg = load_config(shipped_config(), [f"{k}={v}" for k, v in sets.items()])
    ensure_topics(cfg.kafka, cfg.name)
    return cfg


@pytest.fixture(params=["off", "zero_variance"], ids=["grpo", "dapo-dynamic-sampling"])
def cfg(tmp_path, request):
    yield _config(tmp_path, request.param)
    MemoryBroker.reset()


def _run_loop(cfg) -> tuple[Rollout, Reward]:
    """The learner in this thread until its last step and drain; rollout and reward in another."""
    rollout, reward = Rollout(cfg, 0), Reward(cfg, 0)
    done, errors = threading.Event(), []

    def workers() -> None:
        try:
            with VerifierPool(0, 5.0, 4000) as pool:
                while not done.is_set():
                    rollout.step()
                    reward.step(pool)
        except BaseException as e:  # noqa: BLE001 -- reported by the test
            errors.append(e)

    thread = threading.Thread(target=workers, daemon=True)
    thread.start()
    try:
        learner.run(cfg)  # returns after its last step and the drain
    finally:
        done.set()
        thread.join(60)
    assert not errors, errors
    return rollout, reward


def test_the_whole_loop_runs_in_one_process(cfg):
    rollout, reward = _run_loop(cfg)
    progress = [json.loads(line) for line in (cfg.workdir / "progress" / "learner.jsonl").read_text().splitlines()]
    assert [p["step"] for p in progress] == [1, 2, 3] and progress[-1]["version"] == STEPS
    ledger = read_ledger(ledger_path(cfg.workdir))
    trained = ledger.filter(ledger["fate"] == "trained")
    assert trained.height == STEPS * GROUPS and trained["ticket_id"].n_unique() == STEPS * GROUPS
    assert rollout.engine.version >= 1  # it reloaded weights the learner published
    assert rollout.groups >= STEPS * GROUPS and reward.groups == rollout.groups
    assert len(reward.history) > 0  # ERPO's table holds the prompts it scored
    assert sorted(p.name for p in (cfg.workdir / "checkpoints").glob("step-*")) == ["step-00000002", "step-00000003"]
    # The recorder (its own loop, draining what the topics hold) and the reconciliation of the lake
    # with the ledger: every ticket has exactly one fate.
    recorder.run(cfg, 0, stop=True)
    table, totals = reconcile_run(cfg.workdir)
    assert totals["fate_trained"] == STEPS * GROUPS and not any(totals[k] for k in VIOLATIONS), totals
    assert table.height == totals["tickets"] >= STEPS * GROUPS
    if cfg.learner.dynamic_sampling == "zero_variance":
        # DAPO: every trained group has signal; those without it were dropped and replaced by more
        # tickets, so the steps still trained full batches.
        dropped = ledger.filter(ledger["fate"].is_in(["dropped_all_wrong", "dropped_all_correct"]))
        assert dropped.height > 0  # the barely warm-started tiny model gives mostly all-wrong groups
        assert progress[-1]["issued"] >= STEPS * GROUPS + dropped.height
        rates = read_topic(cfg.workdir / "lake", "scored").group_by("ticket_id").agg(pl.col("group_pass_rate").first())
        trained_rates = trained.join(rates, on="ticket_id")["group_pass_rate"]
        assert trained_rates.len() == STEPS * GROUPS and ((trained_rates > 0) & (trained_rates < 1)).all()
        assert totals.get("fate_dropped_all_wrong", 0) + totals.get("fate_dropped_all_correct", 0) == dropped.height


def test_an_acknowledged_then_lost_ticket_is_issued_again_and_trained_once(tmp_path):
    # The broker acknowledges the first ticket and loses it (as Tansu on SeaweedFS did, killed):
    # no rollout ever sees it. Its lease runs out (first_group_s 3 s: the speed is unknown before
    # the first group), it is issued again under the same id, attempt 1, and trained once.
    cfg = _config(tmp_path, "off", **{"learner.tickets.lease_floor_s": "3", "learner.tickets.first_group_s": "3"})
    try:
        broker = MemoryBroker.named(cfg.kafka.bootstrap_servers)
        broker.lose_acknowledged(f"{cfg.name}.prompts", 1)
        _run_loop(cfg)
        [lost] = broker.lost
        ledger = read_ledger(ledger_path(cfg.workdir))
        trained = ledger.filter(ledger["fate"] == "trained")
        assert trained.height == STEPS * GROUPS and trained["ticket_id"].n_unique() == STEPS * GROUPS
        from schemas import PROMPT_TICKET, decode

        ticket_id = decode(PROMPT_TICKET, lost.value, lost.headers)[1]["ticket_id"][0]
        mine = ledger.filter(ledger["ticket_id"] == ticket_id)
        assert mine["fate"].to_list() == ["trained"] and mine["attempt"].to_list() == [1]
        progress = [json.loads(line) for line in (cfg.workdir / "progress" / "learner.jsonl").read_text().splitlines()]
        assert progress[-1]["reissued"] >= 1
        recorder.run(cfg, 0, stop=True)
        _, totals = reconcile_run(cfg.workdir)
        assert totals["fate_trained"] == STEPS * GROUPS and not any(totals[k] for k in VIOLATIONS), totals
    finally:
        MemoryBroker.reset()


def test_a_group_whose_intake_fails_is_dead_lettered_alone_and_the_records_other_group_trains(tmp_path, monkeypatch):
    # One scored record of two groups; the learner's intake raises on the second after queueing
    # the first. Only the second may be dead-lettered (before: the whole record, as apply_failed,
    # while its first group went on to train), and its ticket stays outstanding for a re-issue.
    import time

    from factories import scored_group
    from pipeline.flow.validate import Limits
    from pipeline.rl.checkpoints import restore_learner
    from pipeline.rl.trainer import BatchChannel, make_trainer
    from pipeline.transport.consumer import Consumer, Delivery
    from schemas import SCORED_TRAJECTORY, concat, decode, encode, headers_for
    from services.common import load_learner_models

    cfg = _config(tmp_path, "off")
    try:
        model, _, _ = load_learner_models(cfg)
        trainer = make_trainer(model, cfg.learner)
        state, resumed = restore_learner(cfg, trainer)
        lead = learner.Lead(cfg, trainer, state, None, BatchChannel(trainer),
                            Limits(vocab_size=int(model.config.vocab_size)), resumed)
        first, second = lead.book.issue(2, time.monotonic())
        groups = [scored_group([1.0, 0.0, 1.0, 0.0], ticket_id=t.ticket_id, prompt_id=t.problem.prompt_id,
                               answer=t.problem.answer) for t in (first, second)]
        real = learner.triage

        def triage(group, **kwargs):
            if group["ticket_id"][0] == second.ticket_id:
                raise RuntimeError("intake broke on this group")
            return real(group, **kwargs)

        monkeypatch.setattr(learner, "triage", triage)
        cols = concat(groups)
        d = Delivery("scored", 0, 0, first.problem.prompt_id.encode(), SCORED_TRAJECTORY, cols, 0,
                     encode(SCORED_TRAJECTORY, cols), tuple(headers_for(SCORED_TRAJECTORY)))
        with lead.consumer.guard(d):
            lead.accept(d, draining=False)
        lead.producer.flush()
        assert [g["ticket_id"][0] for g, _ in lead.ready] == [first.ticket_id]
        assert second.ticket_id in lead.book.outstanding
        reader = Consumer(cfg.kafka, cfg.name, ["deadletter"], group_id=None, client_id="check", deadletter=None)
        (dead,) = reader.poll(timeout_ms=200)
        reader.close()
        assert dead.columns["reason"][0].startswith("apply_failed: RuntimeError")
        _, part = decode(SCORED_TRAJECTORY, dead.columns["payload"][0], headers_for(SCORED_TRAJECTORY))
        assert set(part["ticket_id"]) == {second.ticket_id}
    finally:
        MemoryBroker.reset()
