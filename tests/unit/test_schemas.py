"""Wire schemas and the Arrow codec: round trips, every decode failure, encode validation.

Why one file: every hostile-bytes case of the one codec, side by side, so a new case is checked
against all the others' framing.
"""

from __future__ import annotations

import struct

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from schemas import (
    KINDS,
    POLICY_UPDATE,
    PROMPT_TICKET,
    SCORED_TRAJECTORY,
    TRAJECTORY,
    Columns,
    DecodeError,
    MessageKind,
    Ragged,
    SchemaError,
    concat,
    decode,
    encode,
    headers_for,
    take,
)
from schemas.codec import COMPRESSIONS, _from_arrow, declared_bytes, to_record_batch


def _s(*values: str | None) -> np.ndarray:
    return np.array(values, dtype=object)


def _trajectory_columns() -> Columns:
    """Two groups of two samples; one completion is empty (stopped at once)."""
    completions = [[791, 4320, 374, 220, 19], [], [40, 1781, 19, 13], [19]]
    logprobs = [[-0.11, -2.5, -0.0, -7.25, -0.5], [], [-1.0, -0.25, -3.0, -0.125], [-0.75]]
    return {
        "traj_id": _s("a1" * 16, "b2" * 16, "c3" * 16, "d4" * 16),
        "group_id": _s("g0", "g0", "g1", "g1"),
        "ticket_id": _s("t0", "t0", "t1", "t1"),
        "attempt": np.array([0, 0, 2, 2], dtype=np.int32),
        "prompt_id": _s("gsm8k-12", "gsm8k-12", "math500-7", "math500-7"),
        "sample_idx": np.array([0, 1, 0, 1], dtype=np.int32),
        "group_size": np.array([2, 2, 2, 2], dtype=np.int32),
        "policy_version": np.array([3, 3, 4, 4], dtype=np.int64),
        "temperature": np.array([1.0, 1.0, 1.2, 1.2], dtype=np.float32),
        "prompt_text": _s("What is 2+2?", "What is 2+2?", "Résous x² = 4 ✓", "Résous x² = 4 ✓"),
        "prompt_token_ids": Ragged.from_list([[3838, 374, 220, 17], [3838, 374, 220, 17], [1, 2], [1, 2]], np.int32),
        "completion_token_ids": Ragged.from_list(completions, np.int32),
        "behavior_logprobs": Ragged.from_list(logprobs, np.float32),
        "completion_text": _s("The answer is 4", "", "x = 2 or x = -2", "2"),
        "finish_reason": _s("stop", "stop", "length", "stop"),
        "answer": _s("4", "4", "\\pm 2", "\\pm 2"),
        "created_at": np.array([1.7e9, 1.7e9, 1.7e9 + 0.5, 1.7e9 + 0.5], dtype=np.float64),
    }


def _scored_columns() -> Columns:
    return _trajectory_columns() | {
        "reward": np.array([1.0, 0.0, 0.0, 0.0], dtype=np.float32),
        "verify_status": _s("correct", "no_answer", "timeout", "error"),
        "group_pass_rate": np.array([0.5, 0.5, 0.0, 0.0], dtype=np.float32),
        "scored_at": np.array([1.7e9 + 1, 1.7e9 + 1, 1.7e9 + 2, 1.7e9 + 2], dtype=np.float64),
    }


COLUMNS: dict[str, Columns] = {
    "PromptTicket": {
        "ticket_id": _s("0f" * 16, "1e" * 16),
        "attempt": np.array([0, 3], dtype=np.int32),
        "prompt_id": _s("gsm8k-12", "math500-7"),
        "text": _s("What is 2+2?", "Résous x² = 4"),
        "answer": _s("4", "\\pm 2"),
        "epoch": np.array([0, 1], dtype=np.int32),
        "issued_version": np.array([0, 17], dtype=np.int64),
        "issued_at": np.array([1.7e9, 1.7e9 + 0.25], dtype=np.float64),
    },
    "Trajectory": _trajectory_columns(),
    "ScoredTrajectory": _scored_columns(),
    "TemperatureUpdate": {
        "prompt_id": _s("gsm8k-12"),
        "temperature": np.array([1.1], dtype=np.float32),
        "reason": _s("all_correct_raise"),
        "times_seen": np.array([3], dtype=np.int32),
        "mean_pass_rate": np.array([0.875], dtype=np.float32),
        "all_correct_streak": np.array([2], dtype=np.int32),
        "decided_at_version": np.array([9], dtype=np.int64),
        "decided_at": np.array([1.7e9], dtype=np.float64),
    },
    "PolicyUpdate": {
        "version": np.array([5], dtype=np.int64),
        "step": np.array([40], dtype=np.int64),
        "uri": _s("/runs/r1/policy/v5"),
        "sha256": _s("ab" * 32),
        "dtype": _s("bfloat16"),
        "created_at": np.array([1.7e9], dtype=np.float64),
    },
    "DeadLetter": {
        "source_topic": _s("r1.trajectories", "r1.prompts"),
        "source_partition": np.array([3, 0], dtype=np.int32),
        "source_offset": np.array([12345, 0], dtype=np.int64),
        "reason": _s("undecodable: not a valid Arrow IPC stream", "missing_header: no schema header"),
        "schema_header": _s("Trajectory", None),
        "schema_version_header": _s("1", None),
        "payload": np.array([b"\x00\xffgarbage", b""], dtype=object),
        "payload_bytes": np.array([9, 1 << 26], dtype=np.int64),
        "payload_sha256": _s("cd" * 32, "ef" * 32),
        "dead_at": np.array([1.7e9, 1.7e9 + 1], dtype=np.float64),
        "signature": _s("01" * 32, ""),
    },
}


def assert_columns_equal(got: Columns, want: Columns) -> None:
    assert list(got) == list(want)
    for name, w in want.items():
        g = got[name]
        if isinstance(w, Ragged):
            assert isinstance(g, Ragged), name
            assert g.values.dtype == w.values.dtype, name
            assert g.offsets.dtype == w.offsets.dtype, name
            np.testing.assert_array_equal(g.offsets, w.offsets, err_msg=name)
            np.testing.assert_array_equal(g.values, w.values, err_msg=name)
        else:
            assert g.dtype == w.dtype, (name, g.dtype, w.dtype)
            assert g.tolist() == w.tolist(), name


def _ordered(kind: MessageKind, columns: Columns) -> Columns:
    return {name: columns[name] for name in kind.schema.names}


def test_every_kind_has_columns_and_documented_fields() -> None:
    assert set(COLUMNS) == set(KINDS)
    for kind in KINDS.values():
        assert set(COLUMNS[kind.name]) == set(kind.schema.names)
        for field in kind.schema:
            assert field.metadata and field.metadata[b"doc"], (kind.name, field.name)
            if field.nullable:
                assert b"null" in field.metadata[b"doc"], (kind.name, field.name)


def test_scored_extends_trajectory_in_order() -> None:
    n = len(TRAJECTORY.schema)
    assert SCORED_TRAJECTORY.schema.names[:n] == TRAJECTORY.schema.names
    assert SCORED_TRAJECTORY.schema.names[n:] == [
        "reward", "verify_status", "group_pass_rate", "scored_at"
    ]


def test_scored_trajectory_of_version_2_is_refused_naming_both_versions() -> None:
    # v2 also carried `residual` (derived from group_pass_rate) and `shaped_reward` (always equal
    # to reward), before `scored_at`; v3 dropped both.
    assert SCORED_TRAJECTORY.version == 3
    batch = to_record_batch(SCORED_TRAJECTORY, _scored_columns())
    at = batch.schema.get_field_index("scored_at")
    batch = batch.add_column(at, pa.field("shaped_reward", pa.float32(), nullable=False), batch.column("reward"))
    batch = batch.add_column(at, pa.field("residual", pa.string(), nullable=False),
                             pa.array(["none", "none", "all_wrong", "all_wrong"]))
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, batch.schema) as w:
        w.write_batch(batch)
    headers = [("schema", b"ScoredTrajectory"), ("schema_version", b"2")]
    with pytest.raises(DecodeError, match=r"ScoredTrajectory schema_version '2' is not supported \(this build reads "
                                          r"version 3\)") as e:
        decode(SCORED_TRAJECTORY, sink.getvalue().to_pybytes(), headers)
    assert e.value.reason == "unknown_version"


@pytest.mark.parametrize("name", sorted(KINDS))
def test_round_trip_every_kind(name: str) -> None:
    kind = KINDS[name]
    payload = encode(kind, COLUMNS[name])
    got_kind, got = decode(kind, payload, headers_for(kind))
    assert got_kind is kind
    assert_columns_equal(got, _ordered(kind, COLUMNS[name]))
    # Decoding without an expected kind trusts the headers.
    assert decode(None, payload, headers_for(kind))[0] is kind


def test_zero_rows_encode_but_do_not_decode() -> None:
    # No producer sends an empty message; a consumer given one (a PolicyUpdate with no rows once
    # crashed the rollout on argmax of nothing) rejects it as `empty`.
    cols = take(COLUMNS["Trajectory"], np.array([], dtype=np.int64))
    payload = encode(TRAJECTORY, cols)
    assert _reason(TRAJECTORY, payload, headers_for(TRAJECTORY)) == "empty"
    empty_policy = take(COLUMNS["PolicyUpdate"], np.array([], dtype=np.int64))
    assert _reason(POLICY_UPDATE, encode(POLICY_UPDATE, empty_policy), headers_for(POLICY_UPDATE)) == "empty"


def test_list_offsets_outside_their_values_are_invalid_arrow() -> None:
    # Reading an IPC stream checks its framing only: offsets past the values buffer decode and
    # would read foreign memory later; the full validation rejects them.
    payload = encode(TRAJECTORY, COLUMNS["Trajectory"])
    offsets = struct.pack("<5i", 0, 5, 5, 9, 10)  # completion_token_ids: lengths 5, 0, 4, 1
    assert offsets in payload  # (the log-probs share these offsets: both are forged)
    forged = payload.replace(offsets, struct.pack("<5i", 0, 5, 5, 9, 10_000))
    assert _reason(TRAJECTORY, forged, headers_for(TRAJECTORY)) == "invalid_arrow"


def test_ragged_rows_are_views_and_lengths() -> None:
    r = Ragged.from_list([[1, 2, 3], [], [4]], np.int32)
    assert len(r) == 3
    assert r.offsets.tolist() == [0, 3, 3, 4] and r.offsets.dtype == np.int32
    assert r[0].tolist() == [1, 2, 3] and r[1].tolist() == [] and r[-1].tolist() == [4]
    assert np.shares_memory(r[0], r.values)
    assert r.lengths().tolist() == [3, 0, 1]
    with pytest.raises(IndexError):
        r[3]


def test_ragged_rejects_bad_offsets() -> None:
    with pytest.raises(ValueError, match="from 0 to len"):
        Ragged(np.arange(3, dtype=np.int32), np.array([0, 2], dtype=np.int32))
    with pytest.raises(ValueError, match="non-decreasing"):
        Ragged(np.arange(3, dtype=np.int32), np.array([0, 2, 1, 3], dtype=np.int32))
    with pytest.raises(ValueError, match="int32 or int64"):
        Ragged(np.arange(3, dtype=np.int32), np.array([0, 3], dtype=np.float64))


def test_decoded_sliced_list_is_rebased() -> None:
    full = pa.array([[1, 2], [3], [4, 5, 6]], type=TRAJECTORY.schema.field("prompt_token_ids").type)
    got = _from_arrow(full.slice(1, 2))
    assert isinstance(got, Ragged)
    assert got.offsets.tolist() == [0, 1, 4] and got.values.tolist() == [3, 4, 5, 6]


def test_take_and_concat() -> None:
    cols = COLUMNS["Trajectory"]
    picked = take(cols, np.array([3, 1, -3]))
    assert picked["traj_id"].tolist() == ["d4" * 16, "b2" * 16, "b2" * 16]
    assert [picked["completion_token_ids"][i].tolist() for i in range(3)] == [[19], [], []]
    assert picked["behavior_logprobs"][0].tolist() == [-0.75]
    both = concat([take(cols, np.array([0, 1])), take(cols, np.array([2, 3]))])
    assert_columns_equal(both, cols)
    with pytest.raises(SchemaError):
        concat([cols, COLUMNS["PromptTicket"]])
    with pytest.raises(IndexError):
        take(cols, np.array([4]))


# --- decode failures, one per reason ------------------------------------------------------------


def _reason(kind: MessageKind | None, payload: bytes, headers: list[tuple[str, bytes]], **bound: int) -> str:
    with pytest.raises(DecodeError) as info:
        decode(kind, payload, headers, **bound)
    assert str(info.value)  # a message for the dead-letter record
    return info.value.reason


@pytest.mark.parametrize("compression", [None, *COMPRESSIONS])
@pytest.mark.parametrize("name", sorted(KINDS))
def test_compressed_round_trip_and_declared_bytes(name: str, compression: str | None) -> None:
    kind = KINDS[name]
    payload = encode(kind, COLUMNS[name], compression)
    assert decode(kind, payload, headers_for(kind))[0] is kind
    assert_columns_equal(decode(kind, payload, headers_for(kind))[1], _ordered(kind, COLUMNS[name]))
    # What a consumer checks before decompressing is what the batch occupies once decoded.
    assert declared_bytes(payload) == to_record_batch(kind, COLUMNS[name]).get_total_buffer_size()


def test_compression_shrinks_a_large_message_and_unknown_codecs_are_refused() -> None:
    n = 4096
    ids = np.tile(np.arange(64, dtype=np.int32), 8 * n // 64)  # a repetitive completion
    cols = take(COLUMNS["Trajectory"], np.zeros(8, dtype=np.int64))
    cols["completion_token_ids"] = Ragged(ids, np.arange(9, dtype=np.int32) * n)
    cols["behavior_logprobs"] = Ragged(np.zeros(8 * n, dtype=np.float32), np.arange(9, dtype=np.int32) * n)
    plain, packed = encode(TRAJECTORY, cols), encode(TRAJECTORY, cols, "zstd")
    assert len(packed) < len(plain) // 10
    assert declared_bytes(packed) == declared_bytes(plain) > 8 * n * 8
    with pytest.raises(SchemaError, match="unknown Arrow compression 'gzip'"):
        encode(TRAJECTORY, cols, "gzip")


def test_decompression_bomb_is_too_large_before_decompressing() -> None:
    # 64 MiB of zeros compress to a few kilobytes; the consumer's bound refuses the message from
    # its framing alone.
    n = 8 << 20
    cols = take(COLUMNS["Trajectory"], np.zeros(1, dtype=np.int64))
    cols["completion_token_ids"] = Ragged(np.zeros(n, dtype=np.int32), np.array([0, n], dtype=np.int32))
    cols["behavior_logprobs"] = Ragged(np.zeros(n, dtype=np.float32), np.array([0, n], dtype=np.int32))
    bomb = encode(TRAJECTORY, cols, "zstd")
    assert len(bomb) < 64 * 1024
    assert _reason(TRAJECTORY, bomb, headers_for(TRAJECTORY), max_decoded_bytes=16 << 20) == "too_large"
    assert decode(TRAJECTORY, bomb, headers_for(TRAJECTORY), max_decoded_bytes=128 << 20)[1]["answer"].tolist() == ["4"]


def test_forged_uncompressed_length_is_too_large() -> None:
    # A compressed buffer's first 8 bytes say how much Arrow allocates for it: forged to 1 TiB.
    payload = encode(TRAJECTORY, COLUMNS["Trajectory"], "zstd")
    at = payload.rfind(struct.pack("<q", 10 * 4))  # the body's last buffer: 10 float32 log-probs
    assert at > 0
    forged = payload[:at] + struct.pack("<q", 1 << 40) + payload[at + 8 :]
    assert _reason(TRAJECTORY, forged, headers_for(TRAJECTORY)) == "too_large"


@settings(max_examples=150, deadline=None)
@given(st.data())
def test_corrupted_compressed_messages_never_escape_decode_error(data: st.DataObject) -> None:
    payload = bytearray(encode(TRAJECTORY, COLUMNS["Trajectory"], data.draw(st.sampled_from(COMPRESSIONS))))
    for _ in range(data.draw(st.integers(1, 8))):
        payload[data.draw(st.integers(0, len(payload) - 1))] = data.draw(st.integers(0, 255))
    try:
        decode(TRAJECTORY, bytes(payload), headers_for(TRAJECTORY))
    except DecodeError as e:
        assert e.reason in {"undecodable", "too_large", "schema_mismatch", "invalid_arrow", "unexpected_null", "empty"}


def test_garbage_bytes_are_undecodable() -> None:
    assert _reason(TRAJECTORY, b"\x00\x01 not arrow at all \xff" * 7, headers_for(TRAJECTORY)) == "undecodable"
    assert _reason(TRAJECTORY, b"", headers_for(TRAJECTORY)) == "undecodable"


def test_truncated_bytes_are_undecodable() -> None:
    payload = encode(TRAJECTORY, COLUMNS["Trajectory"])
    assert _reason(TRAJECTORY, payload[: len(payload) // 2], headers_for(TRAJECTORY)) == "undecodable"


def test_two_batches_are_undecodable() -> None:
    batch = pa.RecordBatch.from_pydict({"version": [1]}, schema=pa.schema([pa.field("version", pa.int64())]))
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, batch.schema) as w:
        w.write_batch(batch)
        w.write_batch(batch)
    assert _reason(POLICY_UPDATE, sink.getvalue().to_pybytes(), headers_for(POLICY_UPDATE)) == "undecodable"


def test_unknown_schema_name() -> None:
    payload = encode(POLICY_UPDATE, COLUMNS["PolicyUpdate"])
    assert _reason(None, payload, [("schema", b"Weights"), ("schema_version", b"1")]) == "unknown_schema"


def test_unknown_version() -> None:
    payload = encode(POLICY_UPDATE, COLUMNS["PolicyUpdate"])
    assert _reason(POLICY_UPDATE, payload, [("schema", b"PolicyUpdate"), ("schema_version", b"2")]) == "unknown_version"
    assert _reason(None, payload, [("schema", b"PolicyUpdate"), ("schema_version", b"one")]) == "unknown_version"


@pytest.mark.parametrize(
    "headers",
    [[], [("schema", b"PolicyUpdate")], [("schema_version", b"1")], [("schema", None), ("schema_version", b"1")]],
)
def test_missing_header(headers: list[tuple[str, bytes]]) -> None:
    payload = encode(POLICY_UPDATE, COLUMNS["PolicyUpdate"])
    assert _reason(POLICY_UPDATE, payload, headers) == "missing_header"


def test_wrong_schema_for_consumer() -> None:
    payload = encode(POLICY_UPDATE, COLUMNS["PolicyUpdate"])
    assert _reason(TRAJECTORY, payload, headers_for(POLICY_UPDATE)) == "wrong_schema"


def test_ipc_with_different_fields_is_schema_mismatch() -> None:
    # Valid Arrow, honest-looking headers, but the body is a PromptTicket.
    payload = encode(PROMPT_TICKET, COLUMNS["PromptTicket"])
    assert _reason(POLICY_UPDATE, payload, headers_for(POLICY_UPDATE)) == "schema_mismatch"
    # Same names, one type changed (epoch as int64).
    fields = [f.with_type(pa.int64()) if f.name == "epoch" else f for f in PROMPT_TICKET.schema]
    changed = pa.schema(fields)
    cols = COLUMNS["PromptTicket"]
    batch = pa.RecordBatch.from_arrays([pa.array(cols[f.name], type=f.type) for f in changed], schema=changed)
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, changed) as w:
        w.write_batch(batch)
    assert _reason(PROMPT_TICKET, sink.getvalue().to_pybytes(), headers_for(PROMPT_TICKET)) == "schema_mismatch"


def test_null_in_non_nullable_field_is_rejected_on_decode() -> None:
    schema = POLICY_UPDATE.schema
    cols = COLUMNS["PolicyUpdate"]
    arrays = [pa.array([None], type=f.type) if f.name == "uri" else pa.array(cols[f.name], type=f.type) for f in schema]
    # Arrow does not enforce nullability when building a batch, only our decoder does.
    batch = pa.RecordBatch.from_arrays(arrays, schema=schema)
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, schema) as w:
        w.write_batch(batch)
    assert _reason(POLICY_UPDATE, sink.getvalue().to_pybytes(), headers_for(POLICY_UPDATE)) == "unexpected_null"


# --- encode validation ---------------------------------------------------------------------------


def test_missing_column() -> None:
    cols = dict(COLUMNS["PolicyUpdate"])
    del cols["sha256"]
    with pytest.raises(SchemaError, match="sha256"):
        encode(POLICY_UPDATE, cols)


def test_extra_column() -> None:
    cols = COLUMNS["PolicyUpdate"] | {"note": _s("hi")}
    with pytest.raises(SchemaError, match="note"):
        encode(POLICY_UPDATE, cols)


def test_length_mismatch() -> None:
    cols = COLUMNS["PromptTicket"] | {"epoch": np.array([0, 1, 2], dtype=np.int32)}
    with pytest.raises(SchemaError, match="epoch"):
        encode(PROMPT_TICKET, cols)


def test_ragged_length_mismatch() -> None:
    cols = COLUMNS["Trajectory"] | {"behavior_logprobs": Ragged.from_list([[-1.0]], np.float32)}
    with pytest.raises(SchemaError, match="behavior_logprobs"):
        encode(TRAJECTORY, cols)


@pytest.mark.parametrize(
    ("column", "value", "message"),
    [
        ("epoch", np.array([0.5, 1.0]), "epoch"),  # float into int32
        ("epoch", np.array([0, 2**40]), "epoch"),  # overflows int32
        ("issued_at", _s("yesterday", "today"), "issued_at"),  # strings into float64
        ("text", np.array([1, 2]), "text"),  # ints into string
        ("text", _s("a", None), "text"),  # null in a non-nullable field
        ("answer", Ragged.from_list([[1], [2]], np.int32), "answer"),  # list into string
    ],
)
def test_value_type_errors_name_the_column(column: str, value: np.ndarray | Ragged, message: str) -> None:
    with pytest.raises(SchemaError, match=message):
        encode(PROMPT_TICKET, COLUMNS["PromptTicket"] | {column: value})


def test_list_field_needs_ragged() -> None:
    cols = COLUMNS["Trajectory"] | {"prompt_token_ids": np.zeros(4, dtype=np.int32)}
    with pytest.raises(SchemaError, match="prompt_token_ids"):
        encode(TRAJECTORY, cols)


def test_castable_dtypes_are_cast() -> None:
    cols = COLUMNS["PromptTicket"] | {
        "epoch": np.array([0, 1], dtype=np.int64),
        "text": np.array(["What is 2+2?", "Résous x² = 4"]),  # np.str_
    }
    _, got = decode(PROMPT_TICKET, encode(PROMPT_TICKET, cols), headers_for(PROMPT_TICKET))
    assert got["epoch"].dtype == np.int32 and got["epoch"].tolist() == [0, 1]
    assert got["text"].tolist() == ["What is 2+2?", "Résous x² = 4"]


def test_int64_offsets_and_values_are_narrowed() -> None:
    cols = COLUMNS["Trajectory"] | {
        "completion_token_ids": Ragged(
            np.array([5, 6, 7, 8, 9, 10, 11, 12, 13, 14], dtype=np.int64), np.array([0, 5, 5, 9, 10], dtype=np.int64)
        )
    }
    _, got = decode(TRAJECTORY, encode(TRAJECTORY, cols), headers_for(TRAJECTORY))
    r = got["completion_token_ids"]
    assert r.offsets.dtype == np.int32 and r.values.dtype == np.int32
    assert r.offsets.tolist() == [0, 5, 5, 9, 10] and r.values.tolist() == list(range(5, 15))


# --- property test ------------------------------------------------------------------------------

_rows = st.lists(
    st.tuples(
        st.lists(st.integers(-(2**31), 2**31 - 1), max_size=12),
        st.lists(st.floats(width=32, allow_nan=False), max_size=12),
    ),
    min_size=1,
    max_size=20,
)


@settings(max_examples=60, deadline=None)
@given(rows=_rows)
def test_random_ragged_shapes_round_trip(rows: list[tuple[list[int], list[float]]]) -> None:
    n = len(rows)
    tokens = Ragged.from_list([r[0] for r in rows], np.int32)
    logprobs = Ragged.from_list([r[1] for r in rows], np.float32)
    cols = take(COLUMNS["Trajectory"], np.zeros(n, dtype=np.int64)) | {
        "completion_token_ids": tokens,
        "prompt_token_ids": tokens,
        "behavior_logprobs": logprobs,
    }
    _, got = decode(TRAJECTORY, encode(TRAJECTORY, cols), headers_for(TRAJECTORY))
    assert_columns_equal(got, cols)
    for i, (ids, lps) in enumerate(rows):
        assert got["completion_token_ids"][i].tolist() == ids
        assert got["behavior_logprobs"][i].tolist() == lps


def _length_fields(payload: bytes) -> tuple[list[int], list[int]]:
    """Where, in an encoded message, the sender writes lengths: each body buffer's offset and
    length in the record batch's metadata, and (compressed buffers) the uncompressed length that
    starts each buffer in the body. Returns (positions of int64 fields in the metadata vector,
    positions of the 8-byte uncompressed lengths), as offsets into ``payload``."""
    from schemas.codec import _fb_ref, _fb_table

    for message in pa.ipc.MessageReader.open_stream(payload):
        if message.type != "record batch":
            continue
        meta, body = bytes(message.metadata), bytes(message.body)
        meta_at, body_at = payload.find(meta), payload.rfind(body)
        view = memoryview(meta)
        batch = _fb_table(view, _fb_ref(view, _fb_table(view, int.from_bytes(meta[:4], "little")), 2))
        buffers = _fb_ref(view, batch, 2)
        count = int.from_bytes(meta[buffers: buffers + 4], "little")
        spans = np.frombuffer(meta, dtype="<i8", count=2 * count, offset=buffers + 4).reshape(-1, 2)
        fields = [meta_at + buffers + 4 + 8 * i for i in range(2 * count)]
        prefixes = [body_at + int(off) for off, length in spans if length >= 8]
        return fields, prefixes
    raise AssertionError("no record batch")


def test_negative_lengths_cannot_talk_the_decompression_bound_down() -> None:
    # The attack: the first compressed buffer declares 768 MiB, the last -768 MiB, so the sum is
    # small and the bound passes, and Arrow allocates the 768 MiB before it rejects the negative.
    payload = encode(TRAJECTORY, COLUMNS["Trajectory"], "zstd")
    _, prefixes = _length_fields(payload)
    forged = bytearray(payload)
    forged[prefixes[0]: prefixes[0] + 8] = struct.pack("<q", 768 << 20)
    forged[prefixes[-1]: prefixes[-1] + 8] = struct.pack("<q", -(768 << 20))
    with pytest.raises(ValueError, match="negative length"):
        declared_bytes(bytes(forged))
    assert _reason(TRAJECTORY, bytes(forged), headers_for(TRAJECTORY), max_decoded_bytes=64 << 20) == "undecodable"


_HOSTILE_LENGTHS = [-(1 << 63), -(1 << 40), -(768 << 20), -9, -2, -1, 0, 1, 7, 8, 4096, 768 << 20, 1 << 40,
                    (1 << 63) - 1]


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_framing_fuzz_never_allocates_past_the_bound(data: st.DataObject) -> None:
    # Every length field a sender writes (buffer offsets and lengths in the metadata, uncompressed
    # lengths in the body), set to hostile values, one to three at once: decode either refuses the
    # message or decodes it, and Arrow never allocates more than the bound on the way.
    bound = 16 << 20
    compression = data.draw(st.sampled_from(COMPRESSIONS))
    payload = bytearray(encode(TRAJECTORY, COLUMNS["Trajectory"], compression))
    fields, prefixes = _length_fields(bytes(payload))
    for _ in range(data.draw(st.integers(1, 3))):
        at = data.draw(st.sampled_from(fields + prefixes))
        payload[at: at + 8] = struct.pack("<q", data.draw(st.sampled_from(_HOSTILE_LENGTHS)))
    pool = pa.proxy_memory_pool(pa.system_memory_pool())
    previous = pa.default_memory_pool()
    pa.set_memory_pool(pool)
    try:
        decode(TRAJECTORY, bytes(payload), headers_for(TRAJECTORY), max_decoded_bytes=bound)
    except DecodeError as e:
        assert e.reason in {"undecodable", "too_large", "schema_mismatch", "invalid_arrow", "unexpected_null", "empty"}
    finally:
        pa.set_memory_pool(previous)
    assert pool.max_memory() <= bound
