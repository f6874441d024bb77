"""Configs written before a change of the settings' shape, brought to the current shape.

`migrate_config` rewrites the parsed file in place (a plain dict, or a tomlkit document, which
keeps the file's comments and layout) and says what it moved. `pipeline.config.load_config`
applies it to every file it loads, so old run files and the `config.json` of old runs keep
loading (with a warning naming each move); `rlstream migrate-config FILE` rewrites a file.

Changes so far:
- `erpo.drop_all_wrong = true` became `learner.dynamic_sampling = "all_wrong"` (DAPO's dynamic
  sampling, `"zero_variance"`, is the other filter).
- The flat `[learner]` settings went into sections (`optimizer`, `loss`, `kl`, `staleness`,
  `tickets`, `checkpoint`; `LEARNER_MOVES`), and `learner.kl` became a section
  whose `kind` selects the term and its parameters (`kl = "rapo"` is `kl = {kind = "rapo"}`).
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable, MutableMapping
from pathlib import Path

from pipeline.atomic import write_atomic

LEARNER_MOVES = {
    "lr": "optimizer.lr", "weight_decay": "optimizer.weight_decay", "grad_clip": "optimizer.grad_clip",
    "warmup_steps": "optimizer.warmup_steps",
    "advantage": "loss.advantage", "eps_low": "loss.eps_low", "eps_high": "loss.eps_high",
    "tis_cap": "loss.tis_cap", "aggregation": "loss.aggregation", "mis_low": "loss.mis_low",
    "mis_high": "loss.mis_high",
    "kl_coef": "kl.coef", "rapo_phi_floor": "kl.phi_floor",
    "max_staleness": "staleness.max_versions",
    "lease_floor_s": "tickets.lease_floor_s", "lease_p99_factor": "tickets.lease_p99_factor",
    "max_attempts": "tickets.max_attempts", "drain_timeout_s": "tickets.drain_timeout_s",
    "checkpoint_every": "checkpoint.every", "keep_checkpoints": "checkpoint.keep", "resume": "checkpoint.resume",
    "export_every": "checkpoint.export_every",
}
"""Flat `[learner]` keys of configs before the sections (before December 2026) and where each went."""

def kl_parameters(kind: str) -> set[str] | None:
    """The parameters a KL kind takes, read from its variant in `pipeline.config` (None for a kind
    no variant has: validation then names it)."""
    from typing import get_args

    from pipeline.config import NoKL, RapoKL, ReverseKL

    for variant in (NoKL, ReverseKL, RapoKL):
        if kind in get_args(variant.model_fields["kind"].annotation):
            return set(variant.model_fields) - {"kind"}
    return None


def migrate_config(data: MutableMapping, new_table: Callable[[], MutableMapping] = dict) -> list[str]:
    """Bring ``data`` (a parsed run config) to the current shape, in place; one line per change."""
    notes = []
    erpo = data.get("erpo")
    if isinstance(erpo, MutableMapping) and "drop_all_wrong" in erpo:
        drop = erpo["drop_all_wrong"]
        del erpo["drop_all_wrong"]
        if drop is True:
            if not isinstance(data.get("learner"), MutableMapping):
                data["learner"] = new_table()
            data["learner"]["dynamic_sampling"] = "all_wrong"
            notes.append('erpo.drop_all_wrong = true -> learner.dynamic_sampling = "all_wrong"')
        else:
            notes.append("erpo.drop_all_wrong dropped (off is the default of learner.dynamic_sampling)")
    learner = data.get("learner")
    if not isinstance(learner, MutableMapping):
        return notes
    if isinstance(learner.get("kl"), str):
        kind = str(learner["kl"])
        table = new_table()
        table["kind"] = kind
        del learner["kl"]
        learner["kl"] = table
        notes.append(f"learner.kl = {kind!r} -> learner.kl.kind = {kind!r}")
    for old in [k for k in learner if k in LEARNER_MOVES]:
        section, field = LEARNER_MOVES[old].split(".")
        value = learner[old]
        del learner[old]
        if not isinstance(learner.get(section), MutableMapping):
            learner[section] = new_table()
            if section == "kl":
                learner[section]["kind"] = "none"
        kind = str(learner["kl"].get("kind", "none")) if section == "kl" else ""
        takes = kl_parameters(kind) if section == "kl" else None
        if takes is not None and field not in takes:
            notes.append(f"learner.{old} dropped: the KL kind {kind!r} takes no {field}")
            continue
        learner[section][field] = value
        notes.append(f"learner.{old} -> learner.{section}.{field}")
    return notes


def migrate_file(path: Path, write: bool = True) -> list[str]:
    """Rewrite a run file (TOML, keeping its comments and layout; or a run's `config.json`) in the
    current shape, the original kept beside it as ``<name>.bak``; returns what changed (nothing
    written when nothing did, or when ``write`` is false). The result is validated first: a file
    that would not load after the conversion is left as it is."""
    import tomlkit

    from pipeline.config import ConfigError, RunConfig

    text = path.read_text()
    is_json = path.suffix == ".json"
    doc = json.loads(text) if is_json else tomlkit.parse(text)
    notes = migrate_config(doc, dict if is_json else tomlkit.table)
    try:
        RunConfig.model_validate(doc if is_json else doc.unwrap())
    except ValueError as e:
        raise ConfigError(f"{path}: still invalid after the conversion ({'; '.join(notes) or 'nothing to move'}):"
                          f"\n{e}") from None
    if notes and write:
        shutil.copyfile(path, path.with_name(path.name + ".bak"))
        # A blank line before every table header (the moved keys took the one that ended `[learner]`).
        out = json.dumps(doc, indent=2) + "\n" if is_json else re.sub(r"(?<=[^\n])\n(?=\[)", "\n\n", tomlkit.dumps(doc))
        write_atomic(path, out)
    return notes
