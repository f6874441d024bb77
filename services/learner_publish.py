"""Rank 0's publication of weights: a new policy version for the rollouts (safetensors folder,
then a message on the policy topic) and Hugging Face exports of the trained model."""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from pipeline.atomic import write_atomic
from pipeline.config import RunConfig
from pipeline.failpoints import failpoint
from pipeline.model.policy import export_pretrained
from pipeline.model.weight_store import S3Policies
from pipeline.model.weights import publish
from pipeline.transport.producer import Producer
from pipeline.transport.topics import POLICY_KEY, topic_name
from schemas import POLICY_UPDATE
from services.common import initial_policy_path

log = logging.getLogger(__name__)


class Publisher:
    def __init__(self, cfg: RunConfig, producer: Producer) -> None:
        self.cfg, self.producer = cfg, producer
        self.topic = topic_name(cfg.name, "policy")
        # Weights go out in the rollout engine's dtype: a bf16 vLLM gets bf16 (half the bytes to
        # read and hash), everything else the fp32 masters.
        self.dtype = ({"bfloat16": torch.bfloat16, "float16": torch.float16}.get(cfg.rollout.dtype)
                      if cfg.rollout.engine == "vllm" else None)
        # `[weights] store = "s3"`: each version also goes to the object store, and its URI there is
        # what the rollouts are told (workers on other nodes cannot read this node's folder).
        self.store = S3Policies(cfg.weights, cfg.name) if cfg.weights.store == "s3" else None

    def announce(self, weights: dict[str, torch.Tensor], version: int, step: int) -> None:
        """Publish ``weights`` as policy ``version`` and tell the rollouts; `final_policy.txt` names
        the newest."""
        lc = self.cfg.learner
        pub = publish(weights, self.cfg.workdir / "policies", version, lc.keep_policies, self.dtype)
        uri = pub.uri
        if self.store is not None:
            t0 = time.monotonic()
            uri = self.store.upload(Path(pub.uri), pub.version)
            log.info("uploaded policy v%d to %s (%.1fs)", pub.version, uri, time.monotonic() - t0)
        failpoint("learner.publish")
        self.producer.send(self.topic, POLICY_UPDATE, {
            "version": np.array([pub.version], dtype=np.int64),
            "step": np.array([step], dtype=np.int64),
            "uri": np.array([uri], dtype=object),
            "sha256": np.array([pub.sha256], dtype=object),
            "dtype": np.array([pub.dtype], dtype=object),
            "created_at": np.array([time.time()], dtype=np.float64),
        }, key=POLICY_KEY)
        self.producer.flush()
        # The learner's own local folder: what `rlstream demo` and the evaluation read back.
        write_atomic(self.cfg.workdir / "final_policy.txt", f"{pub.version} {pub.sha256} {pub.uri}\n")
        if self.store is not None:  # after the announcement: a store hiccup here costs only disk
            try:
                self.store.prune(lc.keep_policies)
            except Exception as e:  # noqa: BLE001 -- boto3's errors; the next publish prunes again
                log.warning("pruning old policy versions in the store failed (next time): %r", e)

    def export(self, weights: dict[str, torch.Tensor], step: int) -> None:
        """A complete Hugging Face folder of these weights (`pipeline.model.policy.export_pretrained`):
        ``export/step-<N>`` (the newest `checkpoint.keep` kept) and, after the final step,
        ``export/final``."""
        lc = self.cfg.learner
        root = self.cfg.workdir / "export"
        t0 = time.monotonic()
        out = export_pretrained(weights, initial_policy_path(self.cfg),
                                root / ("final" if step == lc.total_steps else f"step-{step:08d}"),
                                trust_remote_code=self.cfg.model.trust_remote_code)
        for old in sorted(root.glob("step-*"))[: -lc.checkpoint.keep]:
            shutil.rmtree(old, ignore_errors=True)
        log.info("exported %s (%.1fs): loads with transformers and vLLM as it is", out, time.monotonic() - t0)
