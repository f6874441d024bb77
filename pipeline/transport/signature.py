"""Dead letters signed with the run's key, so that only a run's own consumers can take a record
out of its accounts.

A dead letter removes a record from the reconcile and the replay (`pipeline.flow.ledger.
without_dead_letters`). Anyone who can write to the dead-letter topic could otherwise hide a real
trajectory by naming its partition and offset. With `kafka.dead_letter_key_file` set (the
embedded launcher writes 32 random bytes to `<run>/dead-letter.key`), every consumer signs what it
dead-letters with HMAC-SHA256 over the record's identity (source topic, partition, offset), the
reason code and the sha256 of the bytes it kept; the reconcile and the replay count only dead
letters whose signature checks out under the same key.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from pathlib import Path

KEY_BYTES = 32


def signed_text(source_topic: str, partition: int, offset: int, reason: str, payload_sha256: str) -> bytes:
    """What a dead letter's signature covers: the record it names, its reason code (the text before
    the first ':') and the hash of its payload."""
    code = reason.split(":", 1)[0]
    return f"{source_topic}\n{int(partition)}\n{int(offset)}\n{code}\n{payload_sha256}".encode()


def sign(key: bytes, source_topic: str, partition: int, offset: int, reason: str, payload_sha256: str) -> str:
    """Hex HMAC-SHA256 of `signed_text` under ``key``."""
    return hmac.new(key, signed_text(source_topic, partition, offset, reason, payload_sha256),
                    hashlib.sha256).hexdigest()


def verify(key: bytes, source_topic: str, partition: int, offset: int, reason: str, payload_sha256: str,
           signature: str | None) -> bool:
    """Whether ``signature`` is ``sign(key, ...)`` of these fields (constant-time comparison)."""
    if not signature:
        return False
    return hmac.compare_digest(signature, sign(key, source_topic, partition, offset, reason, payload_sha256))


def read_key(path: Path) -> bytes:
    """The key in ``path``; `ValueError` naming the file when it is shorter than 16 bytes."""
    key = Path(path).read_bytes()
    if len(key) < 16:
        raise ValueError(f"dead-letter key file {path} holds {len(key)} bytes; it needs at least 16")
    return key


def create_key(path: Path) -> Path:
    """Write a fresh random key to ``path`` (readable by its owner only) unless one is there."""
    path = Path(path)
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(os.urandom(KEY_BYTES))
    return path
