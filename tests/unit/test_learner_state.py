"""The learner's restart rules: what a checkpoint restores, what a fresh start keeps."""

from __future__ import annotations

import json

import pytest

from pipeline.config import ConfigError, load_config
from pipeline.rl.checkpoints import LearnerState, start_fresh
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
