"""The code's layout: imports run one way through the stages, and files stay readable.

Stages, earliest first: shared primitives and the config schema; the wire schemas; transport; the
task data; the model (loading, prompts, packed batches, weights); verification; rollout; ERPO's
prompt history; the learner's RL; the dataflow's bookkeeping (tickets, intake, ledger); the lake;
deployment helpers (`infra`); the services that wire them. A module may import from its own stage
or an earlier one, never a later one. A back-edge makes two rooms one: neither can change, be
tested or be read without the other.

A file over `MAX_LINES` lines says why at its top (a line starting `Why one file:` in its first
40 lines), or is split.
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
MAX_LINES = 450
STAGES = [
    ["pipeline.atomic", "pipeline.dedupe", "pipeline.failpoints", "pipeline.config"],
    ["schemas"],
    ["pipeline.transport"],
    ["pipeline.data"],
    ["pipeline.model"],
    ["pipeline.verify"],
    ["pipeline.rollout"],
    ["pipeline.erpo"],
    ["pipeline.rl"],
    ["pipeline.flow"],
    ["pipeline.lake"],
    ["infra"],
    ["services"],
]
STAGE_OF = {room: i for i, rooms in enumerate(STAGES) for room in rooms}
OWN = ("pipeline", "schemas", "infra", "services")


def room(module: str) -> str | None:
    """The stage's room a dotted module belongs to (`pipeline.rl.learn` -> `pipeline.rl`)."""
    parts = module.split(".")
    if parts[0] not in OWN:
        return None
    return ".".join(parts[:2]) if parts[0] == "pipeline" and len(parts) > 1 else parts[0]


def imports(path: Path) -> set[str]:
    """Absolute imports of a module, function-level ones included."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names}  # `from pipeline import config`
    return found


def back_edges(files: list[Path], root: Path = REPO) -> list[str]:
    """`file: importer room -> imported room` for every import into a later stage."""
    bad = []
    for f in files:
        rel = f.relative_to(root)
        src = room(".".join(rel.with_suffix("").parts))
        if src is None or src not in STAGE_OF:
            continue
        for name in sorted(imports(f)):
            dst = room(name)
            if dst is None or dst == src or dst == "pipeline":
                continue
            if dst not in STAGE_OF:
                bad.append(f"{rel}: {name} is in no stage (add its room to STAGES)")
            elif STAGE_OF[dst] > STAGE_OF[src]:
                bad.append(f"{rel}: {src} (stage {STAGE_OF[src]}) imports {name} (stage {STAGE_OF[dst]})")
    return bad


def source_files() -> list[Path]:
    return sorted(p for top in (*OWN, "tests", "bench") for p in (REPO / top).rglob("*.py"))


def test_every_room_of_the_code_is_in_a_stage():
    rooms = {room(".".join(p.relative_to(REPO).with_suffix("").parts)) for p in source_files()}
    missing = {r for r in rooms if r is not None and r not in STAGE_OF and r != "pipeline.__init__"}
    assert not missing, f"rooms in no stage of STAGES: {sorted(missing)}"


def test_no_import_runs_from_an_earlier_stage_into_a_later_one():
    assert back_edges([p for p in source_files() if p.parts[len(REPO.parts)] in OWN]) == []


def test_the_check_finds_a_back_edge(tmp_path):
    """The check itself: a model module importing the learner is reported, the task data is not."""
    fake = tmp_path / "pipeline" / "model" / "x.py"
    fake.parent.mkdir(parents=True)
    fake.write_text("from pipeline.rl.learn import train_step\nfrom pipeline.data import tasks\n")
    assert back_edges([fake], tmp_path) == [
        "pipeline/model/x.py: pipeline.model (stage 4) imports pipeline.rl.learn (stage 8)",
        "pipeline/model/x.py: pipeline.model (stage 4) imports pipeline.rl.learn.train_step (stage 8)"]


def test_long_files_say_why_at_their_top():
    long = []
    for p in source_files():
        lines = p.read_text().splitlines()
        if len(lines) > MAX_LINES and not any(line.lstrip("#\" ").startswith("Why one file:") for line in lines[:40]):
            long.append(f"{p.relative_to(REPO)} ({len(lines)} lines)")
    assert not long, f"files over {MAX_LINES} lines without `Why one file:` in their first 40 lines: {long}"
