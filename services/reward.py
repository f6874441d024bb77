"""Reward/verification consumer: trajectories in, scored groups out.

Loop: poll whole groups from the `trajectories` consumer group, verify every completion against its
reference answer in the math-verify process pool (a verifier error or timeout is its own
`verify_status`, never a silent 0), score the groups (pass rate, residual kind), send one
ScoredTrajectory message per group (key = prompt_id), flush, then commit.
"""

from __future__ import annotations

import logging
import time
from collections import Counter

from pipeline.config import RunConfig
from pipeline.scoring import score
from pipeline.transport import Consumer, Producer, topic_name
from pipeline.verifier import VerifierPool
from schemas import SCORED_TRAJECTORY
from services.common import JsonlWriter, StopFlag, worker_id

log = logging.getLogger(__name__)


def run(cfg: RunConfig, worker_index: int = 0) -> None:
    stop = StopFlag()
    rc = cfg.reward
    wid = worker_id()
    producer = Producer(cfg.kafka, client_id=f"{cfg.name}-reward-{wid}")
    consumer = Consumer(cfg.kafka, cfg.name, ["trajectories"], group_id=f"{cfg.name}.reward",
                        client_id=f"{cfg.name}-reward-{wid}", deadletter=producer)
    progress = JsonlWriter(cfg.workdir / "progress" / f"reward-{worker_index}.jsonl")
    out_topic = topic_name(cfg.name, "scored")
    statuses: Counter[str] = Counter()
    groups = 0
    with VerifierPool(rc.verifier_workers, rc.verify_timeout_s, rc.max_chars) as pool:
        log.info("reward %s ready: %d verifier workers, timeout %.1fs", wid, rc.verifier_workers,
                 rc.verify_timeout_s)
        try:
            while not stop:
                deliveries = consumer.poll(timeout_ms=rc.poll_timeout_ms)
                if not deliveries:
                    continue
                t0 = time.monotonic()
                for d in deliveries:
                    cols = d.columns
                    verdicts = pool.verify(list(zip(cols["completion_text"], cols["answer"])))
                    scored = score(cols, verdicts)
                    producer.send(out_topic, SCORED_TRAJECTORY, scored, key=d.key)
                    statuses.update(v.status.value for v in verdicts)
                producer.flush()
                consumer.commit()
                groups += len(deliveries)
                progress.write(messages=groups, verify_s=time.monotonic() - t0, statuses=dict(statuses),
                               deadlettered=consumer.stats["deadlettered"])
        finally:
            consumer.close()
            producer.close()
            progress.close()
            log.info("reward %s stopped after %d messages; statuses %s", wid, groups, dict(statuses))
