"""Rollout engines.

An engine generates ``n`` samples for each prompt, each prompt at its own temperature, and returns
for every sample the completion token ids and the *behaviour* log-probs: log-probs of the sampled
tokens under the distribution actually sampled from, ``log_softmax(logits / temperature)``. The
learner recomputes log-probs with :func:`pipeline.model.batch.token_logprobs` at the same
temperatures, so importance ratios compare like with like.

``TorchEngine`` is the plain torch/transformers engine (a KV-cached sampling loop);
``pipeline.rollout.engine_vllm.VllmEngine`` runs vLLM; both implement :class:`Engine`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence

import numpy as np
import torch

from pipeline.model.batch import MIN_TEMPERATURE
from pipeline.model.prompts import PromptFormat, stop_token_ids

@dataclass
class Sample:
    """One generated completion."""

    prompt_index: int
    """Index of the prompt in the ``generate`` call."""
    sample_idx: int
    """Index of this sample within its prompt's group (0..n-1)."""
    prompt_token_ids: np.ndarray
    completion_token_ids: np.ndarray
    behavior_logprobs: np.ndarray
    """float32, one per completion token, at the sampling temperature."""
    finish_reason: str
    """``stop`` (end-of-sequence sampled) or ``length`` (hit max_new_tokens)."""
    text: str


class Engine(Protocol):
    version: int
    max_prompt_tokens: int
    """Longest prompt (in tokens, template included) whose completion of ``max_new_tokens`` still
    fits the model's context; the rollout refuses a longer one (alone, not its batch)."""
    format: PromptFormat
    """How ``generate``'s questions become prompt token ids (`pipeline.model.prompts`)."""
    stop_ids: list[int]
    """Token ids that end a completion (EOS and generation_config's), kept as its last token."""

    def generate(self, prompts: Sequence[str], temperatures: Sequence[float], n: int) -> list[Sample]:
        """``n`` samples of each question (rendered by ``format``) at its temperature."""
        ...

    def load_weights(self, state_dict: dict[str, torch.Tensor], version: int) -> None:
        ...

    def load_published(self, uri: str, sha256: str, version: int) -> None:
        """Load a published weights folder (`pipeline.model.weights.publish`) after checking its hashes."""
        ...

    def load_files(self, paths: list, version: int) -> None:
        """Load the safetensors files of a folder `pipeline.model.weights.verify_published` checked."""
        ...


class TorchEngine:
    """Batched multinomial sampling with a KV cache on a transformers causal LM.

    Each prompt is prefilled once and its cache copied for its ``n`` samples; a sample that ends
    (end-of-sequence) leaves the batch, so later steps compute only the rows still generating."""

    def __init__(self, model, tokenizer, max_new_tokens: int, seed: int = 0, version: int = 0,
                 prompt_format: PromptFormat | None = None):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.format = prompt_format or PromptFormat(tokenizer)
        self.stop_ids = stop_token_ids(tokenizer, getattr(model, "generation_config", None))
        self.max_new_tokens = max_new_tokens
        self.version = version
        self.max_prompt_tokens = int(getattr(model.config, "max_position_embeddings", 1 << 30)) - max_new_tokens
        self.generator = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)

    def load_weights(self, state_dict: dict[str, torch.Tensor], version: int) -> None:
        missing, unexpected = self.model.load_state_dict(state_dict, strict=False)
        # Tied embeddings may be absent from a saved state dict; anything else is an error.
        missing = [k for k in missing if k != "lm_head.weight"]
        if missing or unexpected:
            raise ValueError(f"weights do not match the model: missing={missing[:5]} "
                             f"unexpected={unexpected[:5]}")
        self.version = version

    def load_published(self, uri: str, sha256: str, version: int) -> None:
        from pipeline.model.weights import verify_published

        self.load_files(verify_published(uri, sha256), version)

    def load_files(self, paths: list, version: int) -> None:
        from pipeline.model.weights import load_files

        self.load_weights(load_files(paths), version)

    @torch.no_grad()
    def generate(self, prompts: Sequence[str], temperatures: Sequence[float], n: int) -> list[Sample]:
        if len(prompts) != len(temperatures):
            raise ValueError(f"{len(prompts)} prompts but {len(temperatures)} temperatures")
        if any(t < 0 for t in temperatures):
            raise ValueError(f"temperatures must be >= 0, got {min(temperatures)}")
        tok = self.tokenizer
        prompt_ids = self.format.encode(prompts)
        dev = next(self.model.parameters()).device  # CPU, or the GPU the model was put on
        stop = torch.tensor(self.stop_ids, device=dev)
        P, B = len(prompts), len(prompts) * n  # row r is sample r % n of prompt r // n
        width = max(len(p) for p in prompt_ids)
        ids = torch.full((P, width), tok.pad_token_id, dtype=torch.long, device=dev)
        mask = torch.zeros((P, width), dtype=torch.long, device=dev)
        for i, p in enumerate(prompt_ids):  # left-padded, so every prompt ends at the last column
            ids[i, width - len(p):] = torch.tensor(p, device=dev)
            mask[i, width - len(p):] = 1
        positions = (mask.cumsum(1) - 1).clamp(min=0)
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True)
        # One prefill per prompt; its cache, mask and last logits repeated for the n samples.
        expand = torch.arange(P, device=dev).repeat_interleave(n)
        past = out.past_key_values
        past.batch_select_indices(expand)
        logits = out.logits[:, -1, :][expand]
        mask, step_pos = mask[expand], positions[expand, -1:]

        temps = torch.tensor(temperatures, dtype=torch.float32, device=dev).repeat_interleave(n)
        greedy = temps == 0
        safe_t = temps.clamp(min=MIN_TEMPERATURE).unsqueeze(1)
        out_tokens = torch.full((B, self.max_new_tokens), tok.pad_token_id, dtype=torch.long, device=dev)
        out_lp = torch.zeros((B, self.max_new_tokens), dtype=torch.float32, device=dev)
        lengths = torch.zeros(B, dtype=torch.long, device=dev)
        live = torch.arange(B, device=dev)  # rows still generating, in the order of the cache's batch
        for t in range(self.max_new_tokens):
            logp = torch.log_softmax(logits.float() / safe_t[live], dim=-1)
            sampled = torch.multinomial(logp.exp(), 1, generator=self.generator).squeeze(1)
            nxt = torch.where(greedy[live], logp.argmax(-1), sampled)
            out_tokens[live, t] = nxt
            out_lp[live, t] = logp.gather(1, nxt.unsqueeze(1)).squeeze(1)
            lengths[live] += 1
            going = ~torch.isin(nxt, stop)
            if t + 1 == self.max_new_tokens or not bool(going.any()):
                break
            if not bool(going.all()):  # finished samples leave the batch and the cache
                keep = going.nonzero().squeeze(1)
                live, nxt, mask, step_pos = live[keep], nxt[keep], mask[keep], step_pos[keep]
                past.batch_select_indices(keep)
            step_pos = step_pos + 1
            mask = torch.cat([mask, torch.ones((len(live), 1), dtype=torch.long, device=dev)], dim=1)
            out = self.model(input_ids=nxt.unsqueeze(1), attention_mask=mask, position_ids=step_pos,
                             past_key_values=past, use_cache=True)
            past, logits = out.past_key_values, out.logits[:, -1, :]

        out_tokens, out_lp, lengths = out_tokens.cpu(), out_lp.cpu(), lengths.cpu()
        samples = []
        for r in range(B):
            i, j, L = r // n, r % n, int(lengths[r])
            comp = out_tokens[r, :L].numpy().astype(np.int32)
            stopped = L > 0 and int(comp[-1]) in self.stop_ids
            samples.append(Sample(
                prompt_index=i,
                sample_idx=j,
                prompt_token_ids=np.asarray(prompt_ids[i], dtype=np.int32),
                completion_token_ids=comp,
                behavior_logprobs=out_lp[r, :L].numpy().astype(np.float32),
                finish_reason="stop" if stopped else "length",
                text=tok.decode(comp[:-1] if stopped else comp, skip_special_tokens=True),
            ))
        return samples
