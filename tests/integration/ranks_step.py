"""One learner step under DeepSpeed with as many ranks as the launcher started (torchrun): rank 0
holds the batch and hands it to the others through the learner's `BatchChannel`; every rank trains
on its share; rank 0 writes the weights after the step to ``argv[1]`` (safetensors). Run by
tests/integration/test_ranks.py with 1 and with 2 gloo ranks on CPU."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/ (the batch factory)

from learn_batch import batch_groups, tiny_model  # noqa: E402

from pipeline.config import LearnerConfig  # noqa: E402
from pipeline.erpo.rule import ErpoRule  # noqa: E402
from pipeline.rl.learn import train_step  # noqa: E402
from pipeline.rl.trainer import BatchChannel, make_trainer  # noqa: E402


def main(out: str, config: str) -> None:
    from safetensors.torch import save_file

    lc = LearnerConfig(optimizer={"lr": 1e-3, "warmup_steps": 0}, backend="deepspeed", deepspeed_config=Path(config),
                       groups_per_step=4, max_tokens_per_micro_batch=24, kl={"kind": "k3", "coef": 0.2})
    trainer = make_trainer(tiny_model(), lc)
    ref = tiny_model(1)
    channel = BatchChannel(trainer)
    if trainer.rank == 0:
        groups = batch_groups()
        channel.send(groups)
    else:
        groups = channel.recv()
    train_step(trainer, ref, groups, lc, ErpoRule(), 0, np.random.default_rng(0))
    weights = trainer.full_state_dict()
    if trainer.rank == 0:
        channel.send(None)
        save_file({k: v.contiguous() for k, v in weights.items() if k != "lm_head.weight"}, out)
    else:
        assert channel.recv() is None
    trainer.close()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
