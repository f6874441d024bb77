"""The learner's ledger: the fate of every ticket it issued, and the reconciliation of a run.

The learner appends one JSON line per decision to ``<workdir>/ledger/learner.jsonl``:

    {"step": 12, "ticket_id": "e0-00042", "attempt": 0, "group_id": "…", "prompt_id": "…",
     "fate": "trained", "reason": "", "lag": 1}

(``attempt``: which issue of the ticket the group answered, 0 for the first.)

Fates: ``trained``; ``dropped_stale`` (behaviour policy more than ``learner.staleness.max_versions``
versions behind); ``dropped_all_wrong`` / ``dropped_all_correct`` (no signal:
``learner.dynamic_sampling``); ``abandoned`` (no valid group within ``learner.tickets.max_attempts``
leases); ``duplicate`` (a second group for a ticket already decided; ignored); ``unused`` (arrived
after the final step, while the learner drained); ``unresolved`` (no group arrived before the drain
timed out). A group that fails a check decides nothing: it is dead-lettered and its ticket stays
outstanding.

``step`` is the checkpoint that makes the decision durable: the step that trained the group, or
for the other fates the next step to complete. A learner that resumes from checkpoint N appends a
``resumed`` marker at step N: what happened after N is redone, so `read_ledger` leaves out the rows
of steps after N written before the marker, and the ledger reads as the history of the surviving
run. The file itself is never rewritten or truncated.

:func:`reconcile` joins the ledger with the recorded lake (tickets issued, groups generated,
groups scored) and checks the run's accounting: every issued ticket has exactly one final fate,
no ticket is trained twice, and nothing the learner decided is missing from the lake.
"""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl

from pipeline.transport import signature

RESUMED = "resumed"
"""Marker row: the run continued from the checkpoint of its step."""
FINAL_FATES = ("trained", "dropped_stale", "dropped_all_wrong", "dropped_all_correct", "abandoned", "unused",
               "unresolved")
LEDGER_SCHEMA = {"step": pl.Int64, "ticket_id": pl.String, "attempt": pl.Int64, "group_id": pl.String,
                 "prompt_id": pl.String, "fate": pl.String, "reason": pl.String, "lag": pl.Int64}


def ledger_path(workdir: Path) -> Path:
    return workdir / "ledger" / "learner.jsonl"


class Ledger:
    """Append-only JSON lines, never rewritten: rows are buffered by `add` and written by `flush`
    (the learner flushes once per poll and once per step). A learner that resumes from checkpoint N
    appends a ``resumed`` row at step N (`resume`); readers (`read_ledger`) then disregard the rows
    of steps after N written before it, so the ledger reads as the history of the surviving run
    while the file keeps everything that happened."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        torn = path.exists() and path.stat().st_size > 0 and not path.read_bytes().endswith(b"\n")
        self._f = open(path, "a", encoding="utf-8")
        if torn:  # a crash cut the last line: end it, so the next row starts on its own line
            self._f.write("\n")
        self._pending: list[dict] = []

    def add(self, row: dict) -> None:
        self._pending.append(row)

    def resume(self, step: int, reason: str) -> None:
        """Mark that the run continues from the checkpoint of ``step``."""
        self.add({"step": step, "ticket_id": "", "attempt": 0, "group_id": "", "prompt_id": "", "fate": RESUMED,
                  "reason": reason, "lag": None})
        self.flush()

    def flush(self) -> None:
        if self._pending:
            self._f.write("".join(json.dumps(r, separators=(",", ":")) + "\n" for r in self._pending))
            self._f.flush()
            self._pending.clear()

    def close(self) -> None:
        self.flush()
        self._f.close()


def read_ledger(path: Path) -> pl.DataFrame:
    """The ledger as the surviving run's history: rows of steps a later ``resumed`` marker undid are
    left out, the markers too, and so is a line torn by a crash."""
    if not path.exists() or path.stat().st_size == 0:
        return pl.DataFrame(schema=LEDGER_SCHEMA)
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), int):
            rows.append({k: row.get(k) for k in LEDGER_SCHEMA})
    df = pl.DataFrame(rows, schema=LEDGER_SCHEMA, orient="row")
    # Per row, the earliest resume point marked after it (null: none).
    undone_after = (pl.when(pl.col("fate") == RESUMED).then(pl.col("step")).otherwise(None)
                    .reverse().cum_min().forward_fill().reverse())
    return (df.filter((pl.col("step") <= undone_after) | undone_after.is_null())
            .filter(pl.col("fate") != RESUMED))


NOT_A_RECORD = ("missing_header", "unknown_schema", "wrong_schema", "unknown_version", "undecodable",
                "schema_mismatch", "invalid_arrow", "unexpected_null", "empty", "too_large", "unreadable_record",
                "invalid_message")
"""Dead-letter reason codes that say a record was never a message of the run: it did not decode
(`schemas.codec.DecodeError`'s reasons), the client could not read it, or its values failed the
checks. Any other code (``prompt_too_long``, ``apply_failed``, ``bad_weights``, ...) is a consumer's
verdict on a valid message, which stays in the accounts."""


def trusted_dead_letters(dead_letters: pl.DataFrame | None, run: str | None = None,
                         key: bytes | None = None) -> tuple[pl.DataFrame, int]:
    """The dead letters that may take a record out of a run's accounts, and how many others claimed
    to: those that say the record was never a message of the run (`NOT_A_RECORD`), name a topic of
    run ``run`` (when given) and, with the run's dead-letter ``key``, carry a valid signature
    (`pipeline.transport.signature`); a dead letter of another run, or forged by anyone without the
    key, is refused. A consumer's verdict on a valid message (any other reason code) never
    counts. Returns (source_topic, _partition, _offset) rows and the number refused."""
    empty = pl.DataFrame(schema={"source_topic": pl.String, "_partition": pl.Int32, "_offset": pl.Int64})
    if dead_letters is None or dead_letters.is_empty():
        return empty, 0
    claims = dead_letters.filter(pl.col("reason").str.split(":").list.first().is_in(list(NOT_A_RECORD)))
    ok = pl.lit(True)
    if run is not None:
        ok = pl.col("source_topic").str.starts_with(f"{run}.")
    if key is not None:
        signed = [signature.verify(key, r["source_topic"], r["source_partition"], r["source_offset"], r["reason"],
                                   r.get("payload_sha256") or "", r.get("signature"))
                  for r in claims.iter_rows(named=True)]
        ok = ok & pl.Series(signed, dtype=pl.Boolean)
    trusted = claims.filter(ok) if claims.height else claims
    rows = trusted.select(pl.col("source_topic").cast(pl.String),
                          pl.col("source_partition").cast(pl.Int32).alias("_partition"),
                          pl.col("source_offset").cast(pl.Int64).alias("_offset")).unique()
    return rows, claims.height - trusted.height


def without_dead_letters(rows: pl.DataFrame, topic: str, dead_letters: pl.DataFrame | None,
                         run: str | None = None, key: bytes | None = None) -> pl.DataFrame:
    """Lake rows of logical ``topic`` minus the records a consumer dead-lettered whole because they
    were never messages of the run (`trusted_dead_letters`: of run ``run`` and signed with ``key``,
    where given). Groups dead-lettered one by one out of a valid message (``invalid_group: ...``)
    stay: their message's other groups were used; so do messages a consumer gave a verdict on."""
    return _minus(rows, topic, trusted_dead_letters(dead_letters, run, key)[0])


def _minus(rows: pl.DataFrame, topic: str, trusted: pl.DataFrame) -> pl.DataFrame:
    """``rows`` of logical ``topic`` without the records ``trusted`` (`trusted_dead_letters`) names."""
    if rows.is_empty() or "_partition" not in rows.columns:
        return rows
    whole = (trusted.filter(pl.col("source_topic").str.ends_with(f".{topic}"))
             .select("_partition", "_offset").unique())
    return rows.join(whole, on=["_partition", "_offset"], how="anti")


def reconcile(tickets: pl.DataFrame, trajectories: pl.DataFrame, scored: pl.DataFrame,
              ledger: pl.DataFrame, dead_letters: pl.DataFrame | None = None,
              run: str | None = None, unrecorded: int = 0,
              key: bytes | None = None) -> tuple[pl.DataFrame, dict[str, int]]:
    """Per issued ticket: copies issued, attempts (issues under a new lease), groups generated and
    scored, and its ledger fates; plus the run's totals and its violations (each must be 0).

    ``tickets``, ``trajectories`` and ``scored`` are lake rows (``pipeline.lake.store.read_topic``);
    only their ``ticket_id`` and ``group_id`` columns (and ``attempt``) are used. With the lake's
    ``dead_letters``, records dead-lettered whole as never messages of run ``run`` are left out
    (`without_dead_letters`; with the run's dead-letter ``key``, only signed dead letters count, and
    `dead_letters_refused` says how many others claimed a record). ``unrecorded``: records the
    recorder kept only as bytes (a violation: the lake's accounts miss them).
    """
    trusted, refused = trusted_dead_letters(dead_letters, run, key)  # each signature checked once
    tickets = _minus(tickets, "prompts", trusted)
    trajectories = _minus(trajectories, "trajectories", trusted)
    scored = _minus(scored, "scored", trusted)
    def groups_per_ticket(rows: pl.DataFrame, name: str) -> pl.DataFrame:
        if rows.height == 0:
            return pl.DataFrame(schema={"ticket_id": pl.String, name: pl.UInt32})
        return rows.group_by("ticket_id").agg(pl.col("group_id").n_unique().alias(name))

    final = ledger.filter(pl.col("fate").is_in(FINAL_FATES))
    fates = final.group_by("ticket_id").agg(pl.len().alias("fates"), pl.col("fate").first().alias("fate"),
                                            (pl.col("fate") == "trained").sum().alias("trained"))
    dups = ledger.filter(pl.col("fate") == "duplicate").group_by("ticket_id").agg(pl.len().alias("duplicates_ignored"))
    issued = tickets.group_by("ticket_id").agg(pl.len().alias("issued_copies"),
                                               (pl.col("attempt").max() + 1).alias("attempts"))
    table = (issued.join(groups_per_ticket(trajectories, "generated"), on="ticket_id", how="left")
             .join(groups_per_ticket(scored, "scored"), on="ticket_id", how="left")
             .join(fates, on="ticket_id", how="left")
             .join(dups, on="ticket_id", how="left")
             .with_columns(pl.col("generated", "scored", "fates", "trained", "duplicates_ignored").fill_null(0),
                           pl.col("fate").fill_null("(none)"))
             .sort("ticket_id"))
    by_fate = table.group_by("fate").len()
    totals = {f"fate_{f}": int(n) for f, n in by_fate.iter_rows()}
    totals.update(
        tickets=table.height,
        reissued_copies=int((table["issued_copies"] - 1).sum()),
        tickets_reissued_on_lease=int((table["attempts"] > 1).sum()),
        lease_attempts=int((table["attempts"] - 1).sum()),
        generated_more_than_once=int((table["generated"] > 1).sum()),
        scored_more_than_once=int((table["scored"] > 1).sum()),
        duplicates_ignored=int(table["duplicates_ignored"].sum()),
        dead_letters_refused=refused,
        # Violations:
        trained_twice=int((table["trained"] > 1).sum()),
        several_fates=int((table["fates"] > 1).sum()),
        no_fate=int((table["fates"] == 0).sum()),
        ledger_without_ticket=int(final.join(issued, on="ticket_id", how="anti").height),
        unresolved=int((table["fate"] == "unresolved").sum()),
        unrecorded=unrecorded,
    )
    return table, totals


VIOLATIONS = ("trained_twice", "several_fates", "no_fate", "ledger_without_ticket", "unresolved", "unrecorded")
"""Totals of :func:`reconcile` that must be zero: nothing counted twice, nothing silently lost."""
