"""The learner's restart rules: what a checkpoint restores, what a fresh start keeps; and what is
due after each step (`after_step`, which every rank calls)."""

from __future__ import annotations

import json

import pytest

from pipeline.config import CheckpointConfig, ConfigError, LearnerConfig, load_config
from pipeline.rl.checkpoints import Due, LearnerState, after_step, start_fresh
from services.cli import shipped_config


def test_a_fresh_start_moves_the_previous_life_aside_and_deletes_nothing(tmp_path):
    cfg = load_config(shipped_config(), [f'workdir="{tmp_path}"', 'learner.checkpoint.resume="fresh"'])
    assert start_fresh(cfg) is None  # nothing to move
    (tmp_path / "checkpoints" / "step-00000004").mkdir(parents=True)
    (tmp_path / "ledger").mkdir()
    (tmp_path / "ledger" / "learner.jsonl").write_text('{"step": 1}\n')
    aside = start_fresh(cfg)
    assert aside.parent == tmp_path and aside.name.startswith("previous-")
    assert (aside / "checkpoints" / "step-00000004").is_dir()
    assert (aside / "ledger" / "learner.jsonl").read_text() == '{"step": 1}\n'
    assert not (tmp_path / "checkpoints").exists() and not (tmp_path / "ledger").exists()


def test_resume_settings():
    assert load_config(shipped_config()).learner.checkpoint.resume == "auto"  # a restart is a resume
    assert load_config(shipped_config(), ["learner.checkpoint.resume=true"]).learner.checkpoint.resume == "require"
    with pytest.raises(ConfigError, match="'fresh' to start over"):
        load_config(shipped_config(), ["learner.checkpoint.resume=false"])


def test_learner_state_round_trips_and_refuses_another_format():
    state = LearnerState(step=4, version=4, received=16, trained=16, ticket_position=20,
                         outstanding={"e0-000018": 0, "e0-000019": 1}, offsets={("scored", 0): 7}, seen=["e0-000000"])
    assert LearnerState.from_json(state.to_json()) == state
    old = json.loads(state.to_json())
    del old["format"]
    with pytest.raises(ValueError, match=r"format None .*this rlstream reads format 1"):
        LearnerState.from_json(json.dumps(old))


def test_an_override_into_a_value_names_it():
    with pytest.raises(ConfigError, match="seed is a value, not a section"):
        load_config(shipped_config(), ["seed.x=1"])


def test_an_unreadable_newest_checkpoint_falls_back_to_the_previous_one(tmp_path, caplog):
    import torch

    from learn_batch import tiny_model
    from pipeline.config import LearnerConfig
    from pipeline.rl.checkpoints import restore_learner, save_checkpoint
    from pipeline.rl.trainer import TRAINER_FILE, TorchTrainer

    cfg = load_config(shipped_config(), [f'workdir="{tmp_path}"'])
    trainer = TorchTrainer(tiny_model(), LearnerConfig(backend="torch"))
    at_step_1 = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    save_checkpoint(cfg, trainer, LearnerState(step=1, version=1))
    with torch.no_grad():
        for p in trainer.model.parameters():
            p.add_(1.0)
    newest = save_checkpoint(cfg, trainer, LearnerState(step=2, version=2))
    (newest / "trainer" / TRAINER_FILE).write_bytes(b"not a checkpoint")  # a torn or damaged file

    fresh = TorchTrainer(tiny_model(seed=5), LearnerConfig(backend="torch"))
    state, resumed = restore_learner(cfg, fresh)
    assert resumed and state.step == 1 and state.version == 1
    assert all(torch.equal(fresh.model.state_dict()[k], v) for k, v in at_step_1.items())
    assert "does not load" in caplog.text and newest.name in caplog.text

    (tmp_path / "checkpoints" / "step-00000001" / "learner.json").write_text("{")  # none loads now
    with pytest.raises(RuntimeError, match="no checkpoint .* loads"):
        restore_learner(cfg, TorchTrainer(tiny_model(), LearnerConfig(backend="torch")))


def test_after_step_publishes_exports_and_checkpoints_on_their_own_periods_and_all_at_the_last_step():
    # total 10, publish every 2, export every 4, checkpoint every 3; step 10 is the last, so all
    # three are due there although 10 % 4 = 2 and 10 % 3 = 1.
    lc = LearnerConfig(total_steps=10, sync_every=2, checkpoint=CheckpointConfig(every=3, export_every=4))
    due = {step: after_step(step, lc) for step in range(1, 11)}
    assert [s for s, d in due.items() if d.publish] == [2, 4, 6, 8, 10]
    assert [s for s, d in due.items() if d.export] == [4, 8, 10]
    assert [s for s, d in due.items() if d.checkpoint] == [3, 6, 9, 10]
    assert [s for s, d in due.items() if d.weights] == [2, 4, 6, 8, 10]  # publish or export
    assert due[1] == Due(publish=False, export=False, checkpoint=False) and not due[1].weights
    assert due[10] == Due(publish=True, export=True, checkpoint=True)


def test_after_step_without_exports_exports_only_the_final_weights():
    lc = LearnerConfig(total_steps=5, sync_every=3, checkpoint=CheckpointConfig(every=50, export_every=0))
    due = [after_step(step, lc) for step in range(1, 6)]
    assert [d.export for d in due] == [False, False, False, False, True]
    assert [d.publish for d in due] == [False, False, True, False, True]
    assert [d.checkpoint for d in due] == [False, False, False, False, True]  # 50 > total: only the last
    assert [d.weights for d in due] == [False, False, True, False, True]
