"""`rlstream replay LAKE`: re-publish a recorded run into the topics of a fresh run.

Reads a topic of the lake (default `scored`, what a learner consumes), de-duplicated, in broker
order (time, then partition and offset), leaves out the records its consumers dead-lettered whole (signed dead letters of the recorded
run only, when the lake sits in its run folder),
and sends every other recorded message again, unchanged, to
`<run>.<topic>` of the run named in the config (`--set name=...`): the same Arrow bytes, the same
key (prompt_id), so a learner started on that run with ``learner.offline = true`` trains from the
logged trajectories: the recorded behaviour versions belong to the recorded run, so they are not
checked against the learner's own versions, and its importance weights use the recorded behaviour
log-probs.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from pipeline.config import RunConfig
from pipeline.flow.ledger import without_dead_letters
from pipeline.lake.store import message_batch, read_topic, upgrade
from pipeline.transport.producer import Producer
from pipeline.transport.topics import POLICY_KEY, TOPICS, ensure_topics, topic_name
from schemas import encode_batch, headers_for
from services.reconcile import run_identity

log = logging.getLogger(__name__)


def run(cfg: RunConfig, lake: Path, topic: str = "scored") -> int:
    """Replay ``topic`` of ``lake`` into run ``cfg.name``; returns the number of messages sent."""
    if topic not in TOPICS:
        raise ValueError(f"unknown topic {topic!r}; known: {sorted(TOPICS)}")
    df = read_topic(lake, topic)
    if df.is_empty():
        raise ValueError(f"{lake} holds no {topic!r} messages")
    df = upgrade(df, topic)  # a lake recorded under an older schema version
    name, key = run_identity(Path(lake).parent)  # the recorded run's, when the lake is in its run folder
    kept = without_dead_letters(df, topic, read_topic(lake, "deadletter"), name, key)
    if kept.height < df.height:
        log.info("leaving out %d rows of records a consumer dead-lettered whole", df.height - kept.height)
    df = kept
    kind = TOPICS[topic].kind
    ensure_topics(cfg.kafka, cfg.name)
    producer = Producer(cfg.kafka, client_id=f"{cfg.name}-replay")
    dest = topic_name(cfg.name, topic)
    keyed = "prompt_id" in kind.schema.names
    messages = df.partition_by(["_partition", "_offset"], maintain_order=True)
    t0 = last = time.monotonic()
    try:
        for i, msg in enumerate(messages, 1):
            batch = message_batch(msg, topic)
            key = str(msg["prompt_id"][0]).encode() if keyed else POLICY_KEY if topic == "policy" else None
            producer.send_raw(dest, encode_batch(kind, batch), headers_for(kind), key=key)
            if time.monotonic() - last >= 5:
                producer.flush()
                log.info("replayed %d/%d %s messages into %s", i, len(messages), topic, dest)
                last = time.monotonic()
        producer.flush()
    finally:
        producer.close()
    log.info("replayed %d %s messages (%d rows) into %s in %.1fs", len(messages), topic, df.height, dest,
             time.monotonic() - t0)
    return len(messages)
