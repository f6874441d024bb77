"""Prometheus metrics of the transport (`rlstream_transport_*`), shared by the producer and the
consumer. Labels carry logical topic names (`pipeline.transport.topics.logical_name`), so their
number stays bounded across runs."""

from __future__ import annotations

from prometheus_client import Counter

# Per logical topic; `outcome` is produced, consumed, deadlettered (undecodable, sent to the
# dead-letter topic) or dropped (undecodable, consumer without a dead-letter producer).
MESSAGES = Counter("rlstream_transport_messages_total", "Kafka messages by logical topic and outcome.",
                   ["topic", "outcome"])
DEAD_LETTERS = Counter("rlstream_transport_dead_letters_total",
                       "Records or groups sent to the dead-letter topic, by logical source topic and reason code.",
                       ["topic", "reason"])
REBALANCE_COMMITS = Counter("rlstream_transport_commits_lost_total",
                            "Commits refused because the group rebalanced meanwhile (the partitions' next owner "
                            "continues from the last commit or from its restored state).")
OUTAGES = Counter("rlstream_transport_broker_errors_total",
                  "Retriable broker errors ridden out (broker down or restarting), by operation.", ["op"])
BYTES = Counter("rlstream_transport_bytes_total", "Kafka message payload bytes by logical topic and direction.",
                ["topic", "outcome"])
