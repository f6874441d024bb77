"""The learning step and what it needs: advantages, losses, the chunked output layer, the
training backends (torch, DeepSpeed) and the learner's checkpoints."""
