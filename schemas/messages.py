"""Wire messages: one Arrow schema per message kind, versioned, documented field by field.

Every Kafka message carries one Arrow IPC record batch of a single kind, named by the headers
`schema` (the kind's name) and `schema_version`. A kind's schema never changes in place: a change
is a new version, and consumers dead-letter versions they do not know.

Conventions for every schema below:
- Fields are non-nullable unless the doc says what null means.
- List items are non-nullable (`list<item: T not null>`).
- Times are unix seconds as float64; policy versions are int64 counters starting at 0.
- Each field's documentation is kept in its Arrow metadata under `doc`, so it travels with the
  schema (and into the Parquet trajectory lake).
"""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa


@dataclass(frozen=True)
class MessageKind:
    """One wire message type: its header name, version and Arrow schema."""

    name: str
    """Value of the `schema` header, e.g. `Trajectory`."""
    version: int
    """Value of the `schema_version` header (decimal ASCII)."""
    schema: pa.Schema
    """Exact Arrow schema of the record batch (field order, types and nullability)."""
    doc: str
    """What one row means and who produces it."""


def _field(name: str, type_: pa.DataType, doc: str, nullable: bool = False) -> pa.Field:
    return pa.field(name, type_, nullable=nullable, metadata={"doc": doc})


def _list_of(type_: pa.DataType) -> pa.DataType:
    return pa.list_(pa.field("item", type_, nullable=False))


PROMPT_TICKET = MessageKind(
    name="PromptTicket",
    version=2,
    doc="One prompt to roll out, issued by the learner (which paces the run); key = prompt_id.",
    schema=pa.schema(
        [
            # Unique id of this issue of the prompt within the run: "e<epoch>-<position>", a
            # function of the learner's place in its seeded ticket order, so a learner that resumes
            # from a checkpoint re-issues the same ids and consumers de-duplicate by them.
            _field("ticket_id", pa.string(),
                   'Unique id of this issue of the prompt in the run ("e<epoch>-<position in the epoch>").'),
            # Re-issue number (v2): a ticket whose group has not come back within its lease is issued
            # again under the same id with attempt + 1; stages de-duplicate their own output by
            # (ticket_id, attempt) and effects (ERPO's table, training) by ticket_id.
            _field("attempt", pa.int32(),
                   "Re-issue number of the ticket, from 0: issued again (same ticket_id) with attempt + 1 "
                   "when its group did not come back within its lease."),
            # Stable id of the prompt in its dataset; key of the ERPO history table.
            _field("prompt_id", pa.string(), "Stable id of the prompt in its dataset."),
            # Prompt text, before the chat template.
            _field("text", pa.string(), "Prompt text, before any chat template."),
            # Reference answer the verifier compares against.
            _field("answer", pa.string(), "Reference answer the verifier compares against."),
            # Pass over the dataset this ticket belongs to, from 0.
            _field("epoch", pa.int32(), "Pass over the dataset this ticket belongs to, from 0."),
            # Learner policy version when the ticket was issued.
            _field("issued_version", pa.int64(), "Learner policy version when the ticket was issued."),
            # Unix time (s) of issue.
            _field("issued_at", pa.float64(), "Unix time (s) the ticket was issued."),
        ]
    ),
)

_TRAJECTORY_FIELDS = [
    # Unique id of this sample (uuid4 hex).
    _field("traj_id", pa.string(), "Unique id of this sample (uuid4 hex)."),
    # Id shared by the G samples generated together for one ticket (uuid4 hex).
    _field("group_id", pa.string(), "Id shared by the samples generated together for one ticket."),
    # Ticket this group answers.
    _field("ticket_id", pa.string(), "Ticket this group answers."),
    # Which issue of the ticket it answers (copied from the ticket; v2).
    _field("attempt", pa.int32(), "Re-issue number of the ticket this group answers (copied from the ticket)."),
    # Stable prompt id (copied from the ticket).
    _field("prompt_id", pa.string(), "Stable prompt id, copied from the ticket."),
    # Index of this sample in its group, 0 .. group_size-1.
    _field("sample_idx", pa.int32(), "Index of this sample in its group, 0 .. group_size-1."),
    # Number of samples in the group (G).
    _field("group_size", pa.int32(), "Number of samples in the group (G)."),
    # Policy version of the weights that generated this sample (behaviour policy mu).
    _field("policy_version", pa.int64(), "Policy version of the weights that sampled this (behaviour policy)."),
    # Sampling temperature actually used for this prompt.
    _field("temperature", pa.float32(), "Sampling temperature actually used."),
    # Prompt text, before the chat template.
    _field("prompt_text", pa.string(), "Prompt text, before any chat template."),
    # Token ids fed to the engine (chat template applied).
    _field("prompt_token_ids", _list_of(pa.int32()), "Token ids fed to the engine, chat template applied."),
    # Generated token ids (may be empty).
    _field("completion_token_ids", _list_of(pa.int32()), "Generated token ids; may be empty."),
    # log mu(y_t | s_t) of each completion token under the distribution actually sampled,
    # i.e. at `temperature`; same length as completion_token_ids.
    _field(
        "behavior_logprobs",
        _list_of(pa.float32()),
        "Log-prob of each completion token under the distribution actually sampled (at "
        "`temperature`); one per completion token.",
    ),
    # Detokenised completion.
    _field("completion_text", pa.string(), "Detokenised completion."),
    # Why generation stopped: "stop" (EOS / stop string) or "length" (max tokens hit).
    _field("finish_reason", pa.string(), 'Why generation stopped: "stop" or "length".'),
    # Reference answer (copied from the ticket).
    _field("answer", pa.string(), "Reference answer, copied from the ticket."),
    # Unix time (s) the group finished generating.
    _field("created_at", pa.float64(), "Unix time (s) the group finished generating."),
]

TRAJECTORY = MessageKind(
    name="Trajectory",
    version=2,
    doc="One row per sample; one message holds whole groups. Rollout -> reward; key = prompt_id.",
    schema=pa.schema(_TRAJECTORY_FIELDS),
)

SCORED_TRAJECTORY = MessageKind(
    name="ScoredTrajectory",
    version=3,
    doc="A Trajectory row plus its verification and its group's pass rate. Reward -> learner; key = prompt_id.",
    schema=pa.schema(
        _TRAJECTORY_FIELDS
        + [
            # Verifier reward: 1.0 correct, 0.0 otherwise (error/timeout included).
            _field("reward", pa.float32(), "Verifier reward: 1.0 if correct, else 0.0."),
            # Verifier outcome: "correct", "wrong", "no_answer", "error" (verifier raised),
            # "timeout" (verifier exceeded its time budget); error/timeout are not "wrong".
            # "truncated": cut at the length limit under rollout.overlong = "zero_reward".
            _field(
                "verify_status",
                pa.string(),
                'Verifier outcome: "correct", "wrong", "no_answer", "error", "timeout", or "truncated" '
                '(cut at the length limit, rollout.overlong = "zero_reward").',
            ),
            # Mean reward of the sample's group, in [0, 1]; 1 or 0 makes the group residual
            # (`pipeline.verify.residual`). v3 dropped `residual` (derived from this) and
            # `shaped_reward` (always equal to `reward`).
            _field("group_pass_rate", pa.float32(),
                   "Mean reward of the sample's group, in [0, 1] (1: all correct, 0: all wrong)."),
            # Unix time (s) of scoring.
            _field("scored_at", pa.float64(), "Unix time (s) the sample was scored."),
        ]
    ),
)

TEMPERATURE_UPDATE = MessageKind(
    name="TemperatureUpdate",
    version=1,
    doc="New sampling temperature of one prompt, decided by the ERPO rule. Reward -> every rollout; key = prompt_id.",
    schema=pa.schema(
        [
            # Prompt the temperature applies to.
            _field("prompt_id", pa.string(), "Prompt the temperature applies to."),
            # New sampling temperature tau_p.
            _field("temperature", pa.float32(), "New sampling temperature of the prompt."),
            # Short rule name that produced it, e.g. "all_correct_raise", "decay".
            _field("reason", pa.string(), 'Short name of the rule that decided it, e.g. "all_correct_raise".'),
            # Groups of this prompt scored so far.
            _field("times_seen", pa.int32(), "Groups of this prompt scored so far."),
            # Mean pass rate over the history window.
            _field("mean_pass_rate", pa.float32(), "Mean pass rate over the history window."),
            # Consecutive all-correct groups up to this decision.
            _field("all_correct_streak", pa.int32(), "Consecutive all-correct groups up to this decision."),
            # Policy version of the group that triggered the decision.
            _field("decided_at_version", pa.int64(), "Policy version of the group that triggered the decision."),
            # Unix time (s) of the decision.
            _field("decided_at", pa.float64(), "Unix time (s) of the decision."),
        ]
    ),
)

POLICY_UPDATE = MessageKind(
    name="PolicyUpdate",
    version=1,
    doc="Announcement of published weights. Learner -> every rollout; key = b\"policy\" (one key, so a "
        "compacted topic keeps the newest announcement).",
    schema=pa.schema(
        [
            # Policy version of these weights (monotone).
            _field("version", pa.int64(), "Policy version of these weights; increases monotonically."),
            # Optimizer step that produced them.
            _field("step", pa.int64(), "Optimizer step that produced them."),
            # Path of the published folder (`<workdir>/policies/v<version>`); a loader accepts only
            # that folder of its own run, holding regular files only.
            _field("uri", pa.string(), "Path of the published folder: <workdir>/policies/v<version, 6 digits>."),
            # Hex sha256 of the folder's manifest.json, which lists every file with its size and
            # sha256 (`pipeline.model.weights`); checked, with every file, by the loader.
            _field("sha256", pa.string(), "Hex sha256 of the folder's manifest.json (which hashes every file)."),
            # Tensor dtype of the weights, e.g. "bfloat16".
            _field("dtype", pa.string(), 'Tensor dtype of the weights, e.g. "bfloat16".'),
            # Unix time (s) of publication.
            _field("created_at", pa.float64(), "Unix time (s) the weights were published."),
        ]
    ),
)

DEAD_LETTER = MessageKind(
    name="DeadLetter",
    version=3,
    doc="A consumed record that could not be read, decoded, validated or applied (its value kept byte for byte, "
        "cut to fit the producer's request size), or one invalid group of a decoded message (re-encoded as its "
        "kind). Any consumer -> operators.",
    schema=pa.schema(
        [
            # Full Kafka topic name the message was read from.
            _field("source_topic", pa.string(), "Full Kafka topic name the message was read from."),
            # Partition it was read from.
            _field("source_partition", pa.int32(), "Partition it was read from."),
            # Offset it had there.
            _field("source_offset", pa.int64(), "Offset it had there."),
            # "<decode reason>: <message>", e.g. "unknown_version: ...", or
            # "invalid_group: <check>: <details>" for a group that decoded but failed a check.
            _field("reason", pa.string(), 'Why it was dead-lettered: "<reason code>: <details>".'),
            # Raw `schema` header; null when the message had none.
            _field(
                "schema_header",
                pa.string(),
                "Raw `schema` header (decoded as UTF-8, invalid bytes replaced); null if absent.",
                nullable=True,
            ),
            # Raw `schema_version` header; null when the message had none.
            _field(
                "schema_version_header",
                pa.string(),
                "Raw `schema_version` header (decoded as UTF-8, invalid bytes replaced); null if absent.",
                nullable=True,
            ),
            # The message value, untouched (empty if the record had a null value or could not be
            # read at all), cut to its first bytes when the whole would not fit in a request.
            _field("payload", pa.binary(),
                   "The message value, byte for byte (empty if null or unreadable); its first bytes only when "
                   "payload_bytes is larger."),
            # Size of the whole value; larger than len(payload) when the payload was cut (v2).
            _field("payload_bytes", pa.int64(),
                   "Size in bytes of the whole value (-1 if unreadable); larger than the payload when it was cut."),
            # sha256 of the whole value, so a cut payload can still be matched (v2).
            _field("payload_sha256", pa.string(), "Hex sha256 of the whole value (empty if unreadable)."),
            # Unix time (s) it was dead-lettered.
            _field("dead_at", pa.float64(), "Unix time (s) it was dead-lettered."),
            # HMAC-SHA256 under the run's dead-letter key (pipeline.transport.signature), "" unsigned (v3).
            _field("signature", pa.string(),
                   "Hex HMAC-SHA256 of source, reason code and payload_sha256 under the run's dead-letter key; "
                   "empty if the consumer had no key. Only signed dead letters leave a run's accounts."),
        ]
    ),
)

KINDS: dict[str, MessageKind] = {
    kind.name: kind
    for kind in (PROMPT_TICKET, TRAJECTORY, SCORED_TRAJECTORY, TEMPERATURE_UPDATE, POLICY_UPDATE, DEAD_LETTER)
}
"""Every wire message kind, by header name (one current version each)."""
