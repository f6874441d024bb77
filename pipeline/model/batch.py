"""Packed prompt+completion batches and the log-probs a causal LM gives their completion tokens.

Shared by the learner (its loss), the warm start (supervised steps) and the benches: a batch is
each prompt followed by its completion, right-padded, with a mask over the positions whose *next*
token is a completion token. Log-probs are of the tempered distribution, ``log_softmax(logits /
temperature)``, so that they compare with the behaviour log-probs a rollout engine returns.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

MIN_TEMPERATURE = 1e-4
"""Temperatures below this (greedy decoding is 0) are computed at this value, by the engines and
the learner alike: a greedy token's log-prob is then ~0 in both places."""


@dataclass
class PackedBatch:
    """Prompt+completion sequences, right-padded, with a mask over completion targets."""

    input_ids: torch.Tensor  # [B, T]
    attention_mask: torch.Tensor  # [B, T]
    completion_mask: torch.Tensor  # [B, T-1] float, 1 where target t+1 is a completion token
    temperatures: torch.Tensor  # [B]

    def select(self, rows: torch.Tensor) -> PackedBatch:
        """The sub-batch of the given rows."""
        return PackedBatch(self.input_ids[rows], self.attention_mask[rows],
                           self.completion_mask[rows], self.temperatures[rows])

    def to(self, device: torch.device) -> PackedBatch:
        """The same batch on ``device`` (the model's: a GPU learner's batch must be on its GPU)."""
        return PackedBatch(self.input_ids.to(device), self.attention_mask.to(device),
                           self.completion_mask.to(device), self.temperatures.to(device))


def pack(prompt_ids: Sequence[np.ndarray], completion_ids: Sequence[np.ndarray],
         temperatures: Sequence[float], pad_id: int) -> PackedBatch:
    """Concatenate each prompt with its completion and right-pad to a batch."""
    seqs = [np.concatenate([p, c]) for p, c in zip(prompt_ids, completion_ids)]
    T = max(len(s) for s in seqs)
    B = len(seqs)
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    attn = torch.zeros((B, T), dtype=torch.long)
    cmask = torch.zeros((B, T - 1), dtype=torch.float32)
    for b, (s, p, c) in enumerate(zip(seqs, prompt_ids, completion_ids)):
        ids[b, : len(s)] = torch.from_numpy(s.astype(np.int64))
        attn[b, : len(s)] = 1
        # Target at position t is token t+1: completion tokens are targets p-1 .. p+c-2.
        cmask[b, len(p) - 1: len(p) - 1 + len(c)] = 1.0
    return PackedBatch(ids, attn, cmask, torch.tensor(np.asarray(temperatures, dtype=np.float32)))


def completion_logits(model, batch: PackedBatch) -> torch.Tensor:
    """Logits ``[N, V]`` at the completion targets only (N = ``completion_mask.sum()``, in
    row-major order): the decoder runs on the whole sequence, the vocabulary projection only where
    a completion token is predicted, so no ``[B, T, V]`` tensor is built for prompt positions or
    padding. ``model`` is a Hugging Face causal LM or a DeepSpeed engine wrapping one."""
    inner = getattr(model, "module", model)
    hidden = inner.get_decoder()(input_ids=batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state
    return inner.get_output_embeddings()(hidden[:, :-1][batch.completion_mask.bool()])


def token_logprobs(model, batch: PackedBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-probs of the completion targets at each sequence's temperature, and the
    entropy of that tempered distribution.

    Returns ``(logprobs, entropy)``, both ``[B, T-1]`` with zeros outside ``completion_mask``
    (computed only at completion positions, see :func:`completion_logits`).
    """
    lp, ent, _ = token_logprobs_full(model, batch)
    return lp, ent


def token_logprobs_full(model, batch: PackedBatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`token_logprobs` plus the tempered log-probabilities over the whole vocabulary at the
    completion positions, ``[N, V]`` in row-major order (for full-vocabulary terms such as RAPO's
    forward KL); all three share one graph."""
    mask = batch.completion_mask
    logits = completion_logits(model, batch).float()
    t = per_completion_token(batch.temperatures.clamp(min=MIN_TEMPERATURE), mask).unsqueeze(-1)
    logp = torch.log_softmax(logits / t, dim=-1)
    targets = batch.input_ids[:, 1:][mask.bool()].unsqueeze(-1)
    lp = place_completion(logp.gather(-1, targets).squeeze(-1), mask)
    ent = place_completion(-(logp.exp() * logp).sum(-1), mask)
    return lp, ent, logp


def per_completion_token(per_sequence: torch.Tensor, completion_mask: torch.Tensor) -> torch.Tensor:
    """A per-sequence value ``[B]`` repeated for each completion token: ``[N]``, row-major."""
    idx = completion_mask.bool()
    return per_sequence.unsqueeze(1).expand_as(idx)[idx]


def place_completion(values: torch.Tensor, completion_mask: torch.Tensor) -> torch.Tensor:
    """Per-completion-token values ``[N]`` (row-major) at their positions of ``[B, T-1]``, zeros
    elsewhere; differentiable with respect to ``values``."""
    idx = completion_mask.bool()
    return torch.zeros(idx.shape, dtype=values.dtype, device=values.device).masked_scatter(idx, values)


def scatter_completion(values: np.ndarray, completion_mask: torch.Tensor) -> torch.Tensor:
    """Place per-completion-token values (all rows' tokens concatenated in row order, as in a
    Ragged column) at the completion positions of a packed batch; zeros elsewhere."""
    n = int(completion_mask.bool().sum())
    if n != len(values):
        raise ValueError(f"{len(values)} values for {n} completion positions")
    return place_completion(torch.as_tensor(np.asarray(values), dtype=completion_mask.dtype), completion_mask)
