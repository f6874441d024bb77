"""How a dataset row becomes the token ids the policy continues, and which tokens end its turn.

`PromptFormat` renders a question (``prompt.template``):

- ``chat``: messages ``[{system}, {user}]`` through the tokenizer's own chat template with the
  assistant's turn opened (``add_generation_prompt=True``), as instruct models were trained; the
  template writes its own BOS where the model has one (Llama 3's ``<|begin_of_text|>``), so the
  text is encoded without adding special tokens again;
- ``plain``: ``system`` and ``user`` as text, one blank line apart, after the tokenizer's BOS when
  it has one (base models; the tiny default's arithmetic prompts are ``{question}`` alone).

The rollout engines, the rollout's length check and the evaluation all encode through the same
format, so the learner (which trains on the trajectories' ``prompt_token_ids``) sees exactly the
prompt the policy sampled from.

`stop_token_ids`: generation ends at the tokenizer's EOS *or* any id ``generation_config.json``
lists (instruct models end a turn with ``<|im_end|>`` or ``<|eot_id|>``, which is not always the
tokenizer's EOS).
"""

from __future__ import annotations

from typing import Sequence

from pipeline.config import PromptConfig


class PromptFormat:
    """A question -> prompt text -> token ids (see the module docstring)."""

    def __init__(self, tokenizer, cfg: PromptConfig | None = None) -> None:
        cfg = cfg or PromptConfig()
        has_template = bool(getattr(tokenizer, "chat_template", None))
        self.kind = cfg.template if cfg.template != "auto" else ("chat" if has_template else "plain")
        if self.kind == "chat" and not has_template:
            raise ValueError(f"prompt.template = 'chat' but the tokenizer ({getattr(tokenizer, 'name_or_path', '?')}) "
                             "has no chat template (a base model?): use prompt.template = 'plain'")
        self.tokenizer, self.cfg = tokenizer, cfg

    def messages(self, question: str) -> list[dict[str, str]]:
        """The chat messages of a question: the system prompt (if any), then the user's turn."""
        user = self.cfg.user.replace("{question}", question)
        return ([{"role": "system", "content": self.cfg.system}] if self.cfg.system else []) + \
            [{"role": "user", "content": user}]

    def render(self, question: str) -> str:
        """The prompt as text (without the plain format's BOS, which is a token, not text)."""
        if self.kind == "chat":
            return self.tokenizer.apply_chat_template(self.messages(question), add_generation_prompt=True,
                                                      tokenize=False, **self.cfg.chat_template_kwargs)
        return "\n\n".join(m["content"] for m in self.messages(question))

    def encode(self, questions: Sequence[str]) -> list[list[int]]:
        """Token ids of each question's prompt."""
        tok = self.tokenizer
        bos = [] if self.kind == "chat" or tok.bos_token_id is None else [tok.bos_token_id]
        return [bos + tok.encode(self.render(q), add_special_tokens=False) for q in questions]


def stop_token_ids(tokenizer, generation_config=None) -> list[int]:
    """The tokenizer's EOS and every ``eos_token_id`` of ``generation_config`` (an int or a list),
    in that order, without repeats."""
    ids = [tokenizer.eos_token_id]
    extra = getattr(generation_config, "eos_token_id", None) if generation_config is not None else None
    ids += list(extra) if isinstance(extra, (list, tuple)) else [extra]
    out: list[int] = []
    for i in ids:
        if i is not None and int(i) not in out:
            out.append(int(i))
    if not out:
        raise ValueError("the tokenizer has no EOS token and generation_config lists none: nothing would end a "
                         "completion but the length limit")
    return out


def load_generation_config(path, trust_remote_code: bool = False):
    """``generation_config.json`` of a model folder; without one, the generation config its
    ``config.json`` implies (its ``eos_token_id``), as transformers and vLLM build it; None when
    neither says anything."""
    from transformers import AutoConfig, GenerationConfig

    try:
        return GenerationConfig.from_pretrained(str(path))
    except OSError:
        pass
    try:
        return GenerationConfig.from_model_config(AutoConfig.from_pretrained(str(path),
                                                                           trust_remote_code=trust_remote_code))
    except (OSError, ValueError):
        return None
