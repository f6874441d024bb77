"""Generation: the torch and vLLM rollout engines behind one interface, and the held-out
evaluation that runs on them."""
