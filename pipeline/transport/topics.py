"""The topics of a run: what each logical topic carries, its Kafka name and configs, and
`ensure_topics`, which creates them.

Topics are named `<run>.<logical topic>`; `TOPICS` fixes which message kind each logical topic
carries. Consumers work in logical topic names (`"scored"`, not `"run7.scored"`) for
deliveries, positions and commits; the producer takes full Kafka topic names (see `topic_name`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from kafka.admin import NewTopic
from kafka.errors import TopicAlreadyExistsError

from pipeline.config import KafkaConfig
from pipeline.transport.clients import TransportError, clients_for
from schemas import (
    DEAD_LETTER,
    POLICY_UPDATE,
    PROMPT_TICKET,
    SCORED_TRAJECTORY,
    TEMPERATURE_UPDATE,
    TRAJECTORY,
    MessageKind,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TopicSpec:
    """What a logical topic carries."""

    kind: MessageKind
    """The only message kind allowed on the topic."""
    partitions: int
    """Default partition count used by `ensure_topics`."""
    compacted: bool = False
    """Consumers need only the newest value per key (cleanup.policy=compact); else the topic gets
    `kafka.retention_hours`."""


TOPICS: dict[str, TopicSpec] = {
    "prompts": TopicSpec(PROMPT_TICKET, 4),
    "trajectories": TopicSpec(TRAJECTORY, 4),
    "scored": TopicSpec(SCORED_TRAJECTORY, 4),
    "temperature": TopicSpec(TEMPERATURE_UPDATE, 4, compacted=True),
    "policy": TopicSpec(POLICY_UPDATE, 1, compacted=True),
    "deadletter": TopicSpec(DEAD_LETTER, 1),
}
"""The six logical topics of a run (see DESIGN.md, "Topics")."""

POLICY_KEY = b"policy"
"""Key of every PolicyUpdate: one key, so a compacted `policy` topic keeps the newest announcement."""


def topic_name(run: str, topic: str) -> str:
    """Full Kafka topic name of logical `topic` in `run`."""
    return f"{run}.{topic}"


def logical_name(full_topic: str) -> str:
    """`<run>.<topic>` -> `<topic>` (metric labels stay bounded across runs)."""
    return full_topic.rsplit(".", 1)[-1]


def topic_configs(spec: TopicSpec, cfg: KafkaConfig) -> dict[str, str]:
    """Kafka topic configs of a logical topic: compaction, or retention from the run config; and
    `max.message.bytes` = `kafka.max_message_bytes`, so the topic itself accepts the largest
    message the producers may send (Kafka's broker default is 1 MiB: a group of 8 trajectories
    with 16k-token completions is about 1.6 MB)."""
    size = {"max.message.bytes": str(cfg.max_message_bytes)}
    if spec.compacted:
        return {"cleanup.policy": "compact"} | size
    hours = cfg.retention_hours
    return {"cleanup.policy": "delete", "retention.ms": str(-1 if hours < 0 else int(hours * 3_600_000))} | size


def ensure_topics(cfg: KafkaConfig, run: str, partitions: dict[str, int] | None = None) -> None:
    """Create the run's six topics if missing (idempotent) and wait until metadata shows them.

    `partitions` overrides the default partition count of some logical topics. Topics are created
    with `topic_configs` (compaction or retention); a broker that refuses topic configs gets the
    topics without them (logged). An existing topic keeps its partition count (a mismatch is
    logged).
    """
    counts = {name: spec.partitions for name, spec in TOPICS.items()} | (partitions or {})
    unknown = set(counts) - set(TOPICS)
    if unknown:
        raise ValueError(f"unknown topics {sorted(unknown)}; known: {sorted(TOPICS)}")
    wanted = {topic_name(run, t): n for t, n in counts.items()}
    admin = clients_for(cfg).admin(f"{run}-admin")

    def create(with_configs: bool) -> list[dict]:
        new = [NewTopic(topic_name(run, t), n, -1, topic_configs=topic_configs(TOPICS[t], cfg) if with_configs else {})
               for t, n in counts.items()]
        failed = []
        for topic in admin.create_topics(new, raise_errors=False)["topics"]:
            if topic["error_code"] == TopicAlreadyExistsError.errno:
                log.debug("topic %s already exists", topic["name"])
            elif topic["error_code"] != 0:
                failed.append(topic)
        return failed

    try:
        failed = create(with_configs=True)
        if failed:
            log.warning("the broker refused topic configs (%s); creating the topics without compaction/retention",
                        failed[0]["error_message"])
            failed = create(with_configs=False)
        if failed:
            raise TransportError(f"creating topic {failed[0]['name']} failed: error {failed[0]['error_code']} "
                                 f"{failed[0]['error_message']}")
        admin.wait_for_topics(list(wanted), timeout_ms=cfg.request_timeout_ms)
        for topic in admin.describe_topics(list(wanted)):
            if len(topic["partitions"]) != wanted[topic["name"]]:
                log.warning(
                    "topic %s has %d partitions, wanted %d (kept as is)",
                    topic["name"],
                    len(topic["partitions"]),
                    wanted[topic["name"]],
                )
    finally:
        admin.close()
