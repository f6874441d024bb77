"""`rlstream topics`: create a run's topics up front (partitions, compaction, retention, message
size) and print what the broker reports; for deployments that start the services separately
(docs/deploy.md, "Topics")."""

from __future__ import annotations

import sys

from kafka.errors import KafkaError

from pipeline.config import KafkaConfig, RunConfig
from pipeline.transport.clients import TransportError, clients_for
from pipeline.transport.topics import TOPICS, ensure_topics, topic_configs, topic_name


def partition_counts(items: list[str]) -> dict[str, int]:
    """`--partitions TOPIC=N` of `rlstream topics`, checked against the run's logical topics."""
    counts: dict[str, int] = {}
    for item in items:
        topic, sep, raw = item.partition("=")
        if not sep or topic not in TOPICS or not raw.isascii() or not raw.isdigit() or int(raw) < 1:
            sys.exit(f"rlstream topics: --partitions {item!r} must be TOPIC=N with N >= 1 and TOPIC one of "
                     f"{sorted(TOPICS)}")
        counts[topic] = int(raw)
    merged = {t: spec.partitions for t, spec in TOPICS.items()} | counts
    if merged["trajectories"] != merged["scored"]:
        sys.exit(f"rlstream topics: trajectories ({merged['trajectories']}) and scored ({merged['scored']}) need the "
                 "same partition count: ERPO's state follows the trajectories partitions, and the check that "
                 "rebuilds it from the scored topic assumes the same keys land on the same partitions")
    return counts


def partitions_now(kafka_cfg: KafkaConfig, names: list[str]) -> dict[str, int]:
    """Partition count of each topic as the broker reports it."""
    admin = clients_for(kafka_cfg).admin("rlstream-topics")
    try:
        return {t["name"]: len(t["partitions"]) for t in admin.describe_topics(names)}
    finally:
        admin.close()


def create_and_show(cfg: RunConfig, partitions: list[str]) -> None:
    """Create the run's topics (idempotent) with `--partitions TOPIC=N` overrides and print each
    topic's partition count and configs; exit with the reason if the broker refuses."""
    counts = partition_counts(partitions)
    names = [topic_name(cfg.name, topic) for topic in TOPICS]
    try:
        ensure_topics(cfg.kafka, cfg.name, counts)
        found = partitions_now(cfg.kafka, names)
    except (TransportError, KafkaError) as e:
        detail = str(e) if type(e).__name__ in str(e) else f"{type(e).__name__}: {e}"
        sys.exit(f"rlstream topics: creating the topics of run {cfg.name!r} on {cfg.kafka.bootstrap_servers} "
                 f"failed: {detail}")
    for name, (topic, spec) in zip(names, TOPICS.items(), strict=True):
        configs = " ".join(f"{k}={v}" for k, v in topic_configs(spec, cfg.kafka).items())
        wanted = counts.get(topic, spec.partitions)
        kept = "" if found[name] == wanted else f" (exists; {wanted} asked for, kept as it is)"
        print(f"{name}  partitions={found[name]}{kept}  {configs}")
