"""The policy: loading any causal LM strictly (or building the tiny default), prompts as the
tokenizer's chat template renders them, versioned weight folders, and the default's warm-start."""
