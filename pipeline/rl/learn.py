"""One learning step on a batch of scored groups: advantages, decoupled PPO, the KL terms, in
memory bounded by a token budget.

`train_step` is what the learner service runs for every batch (and what `bench/learner.py` and
`bench/learner_memory.py` time): advantages (GRPO / Dr.GRPO / RLOO, with ERPO's RA for
all-correct groups); the decoupled PPO loss with truncated importance weights against the
behaviour log-probs; and the KL term of ``learner.kl.kind`` to the frozen reference (k3, or RAPO's
forward KL, exact or sampled); over ``mini_batches`` optimiser updates.

Memory: each update's groups are cut into micro-batches of at most
``learner.max_tokens_per_micro_batch`` padded tokens, whose gradients add up before the update
(`Trainer.backward` / `Trainer.update`); within a micro-batch the output layer works through the
completion tokens a chunk at a time and computes each chunk's gradient inside the chunk
(`pipeline.rl.head`), so no ``[tokens, vocabulary]`` tensor exists for more than a chunk. With
``learner.share_prompts`` each distinct prompt of a micro-batch runs through the decoder once and
its samples' completions run on its cached keys and values (`shared_prompt_hidden`; the micro-
batches keep a prompt's rows together, `shared_micro_batches`). Every
token's weight in the loss is fixed by the whole update (all micro-batches, all ranks): token-mean
divides by the update's completion tokens, sequence-mean by its sequences, so the accumulated
gradient equals that of the update as one batch, and with several ranks (whose gradients the
trainer averages) equals single-rank training. The loss of every chunk is
`pipeline.rl.losses.rl_loss`, a pure function of tensors; the step adds up the metrics it returns
(`StepMetrics`) without knowing their names.
"""

from __future__ import annotations

import contextlib

from collections import defaultdict

import numpy as np
import torch

from pipeline.config import LearnerConfig
from pipeline.erpo.rule import ErpoRule
from pipeline.rl.advantages import get_advantage, ra_advantages
from pipeline.rl.head import HeadPlan, chunk_tokens, completion_head
from pipeline.rl.losses import KL_TERMS, LossInputs, LossOutputs, LossSettings, phi_clamp, rl_loss
from pipeline.rl.trainer import Trainer, lr_at
from pipeline.model.batch import PackedBatch, pack
from pipeline.verify.residual import residual
from schemas import Columns, concat


def micro_batches(rows: np.ndarray, lengths: np.ndarray, max_tokens: int) -> list[np.ndarray]:
    """``rows`` grouped into micro-batches whose padded size (rows x longest row) stays within
    ``max_tokens``, longest rows first (less padding); a row longer than the budget is alone."""
    order = rows[np.argsort(-lengths[rows], kind="stable")]
    out, current, longest = [], [], 0
    for r in order:
        if current and (len(current) + 1) * max(longest, lengths[r]) > max_tokens:
            out.append(np.array(current))
            current, longest = [], 0
        current.append(r)
        longest = max(longest, int(lengths[r]))
    if current:
        out.append(np.array(current))
    return out


def row_prompt_weight(config) -> float:
    """What a row's copy of one prompt token costs under `shared_prompt_hidden`, in tokens of the
    unshared path: each row attends to its prompt's keys and values, which attention keeps for the
    backward pass in every layer (the cache's, and their expansion to every query head under
    grouped-query attention), ``2 x (heads + kv_heads) x head_dim`` floats, against a token's
    activations in a decoder layer, taken as ``8 x hidden + 4 x intermediate`` floats (a
    Llama-style block keeps somewhat fewer: measured on SmolLM2-135M's shape, a row's prompt token
    cost 0.09 of a token where this gives 0.14, so the estimate errs on the side of memory)."""
    if config is None or not hasattr(config, "hidden_size"):
        return 1.0  # unknown shape: a row's prompt token counts as a whole token
    hidden = int(config.hidden_size)
    heads = int(config.num_attention_heads)
    kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(config, "head_dim", None) or hidden // heads)
    intermediate = int(getattr(config, "intermediate_size", None) or 4 * hidden)
    return 2 * (heads + kv_heads) * head_dim / (8 * hidden + 4 * intermediate)


def shared_micro_batches(rows: np.ndarray, prompt_of: np.ndarray, prompt_len: np.ndarray,
                         completion_len: np.ndarray, max_tokens: int, prompt_weight: float) -> list[np.ndarray]:
    """Micro-batches for :func:`shared_prompt_hidden`: the decoder runs each distinct prompt of a
    micro-batch once (padded to its longest prompt) and each row's completion (padded to its
    longest completion) on that prompt's keys and values, of which every row keeps its own copy, so
    a micro-batch holds ``prompts x longest prompt + rows x (longest completion + prompt_weight x
    longest prompt)`` tokens' worth (`row_prompt_weight`); kept within ``max_tokens``. Rows of one
    prompt stay together (prompts with the
    longest rows first, each prompt's rows longest completion first); a prompt whose rows do not
    fit the budget together is split over micro-batches, each computing the prompt again, and a
    row that does not fit alone is alone."""
    rows = np.asarray(rows)
    if len(rows) == 0:
        return []
    total = prompt_len[rows] + completion_len[rows]
    keys, inverse = np.unique(prompt_of[rows], return_inverse=True)
    longest_of_prompt = np.zeros(len(keys), dtype=np.int64)
    np.maximum.at(longest_of_prompt, inverse, total)
    order = rows[np.lexsort((-completion_len[rows], inverse, -longest_of_prompt[inverse]))]
    out, current, prompts = [], [], set()
    wp = wc = 0
    for r in order:
        p = int(prompt_of[r])
        n_prompts = len(prompts | {p})
        width = max(wp, int(prompt_len[r]))
        cost = n_prompts * width + (len(current) + 1) * (max(wc, int(completion_len[r])) + prompt_weight * width)
        if current and cost > max_tokens:
            out.append(np.array(current))
            current, prompts, wp, wc = [], set(), 0, 0
        current.append(r)
        prompts.add(p)
        wp, wc = max(wp, int(prompt_len[r])), max(wc, int(completion_len[r]))
    out.append(np.array(current))
    return out


def completion_hidden(model: torch.nn.Module, batch: PackedBatch) -> torch.Tensor:
    """The decoder's last hidden states at the positions that predict a completion token,
    ``[N, d]`` in row-major order. ``model`` is a Hugging Face causal LM or a DeepSpeed engine
    wrapping one."""
    inner = getattr(model, "module", model)
    hidden = inner.get_decoder()(input_ids=batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state
    return hidden[:, :-1][batch.completion_mask.bool()]


def _sliding_window(config) -> bool:
    """Whether a model attends through a sliding window in some layer: its cache then keeps only the
    window's last keys, so a long prompt's cache does not line up with the mask of the whole
    prompt, and the learner does not share prompts (`train_step`)."""
    if config is None:
        return False
    if "sliding_attention" in (getattr(config, "layer_types", None) or []):
        return True
    return bool(getattr(config, "use_sliding_window", False) and getattr(config, "sliding_window", None))


def _right_padded(seqs: list[np.ndarray], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids ``[B, W]`` right-padded with ``pad_id``, and their attention mask."""
    width = max(1, max(len(s) for s in seqs))
    ids = np.full((len(seqs), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(seqs), width), dtype=np.int64)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = s
        mask[i, :len(s)] = 1
    return torch.from_numpy(ids).to(device), torch.from_numpy(mask).to(device)


def shared_prompt_hidden(model: torch.nn.Module, prompts: list[np.ndarray], prompt_of: np.ndarray,
                         completions: list[np.ndarray], pad_id: int, device: torch.device) -> torch.Tensor:
    """:func:`completion_hidden` with each prompt computed once for all its samples: the distinct
    ``prompts`` run through the decoder first (right-padded), their keys and values are repeated
    for the rows (``prompt_of[b]``: row ``b``'s prompt), and then the ``completions`` run on top of
    them at positions ``len(prompt) + j``; the gradient flows into the prompts' computation from
    every sample. The same hidden states as the whole sequences give (up to float rounding), for a
    G-sample group about (P + G x C) tokens instead of G x (P + C)."""
    decoder = getattr(model, "module", model).get_decoder()
    p_ids, p_mask = _right_padded(prompts, pad_id, device)
    c_ids, c_mask = _right_padded(completions, pad_id, device)
    p_len = p_mask.sum(1)
    out = decoder(input_ids=p_ids, attention_mask=p_mask, position_ids=torch.arange(p_ids.shape[1], device=device)
                  .expand_as(p_ids), use_cache=True)
    rows = torch.as_tensor(prompt_of, device=device)
    cache = out.past_key_values
    cache.batch_select_indices(rows)
    positions = p_len[rows].unsqueeze(1) + torch.arange(c_ids.shape[1], device=device)
    hidden = decoder(input_ids=c_ids, attention_mask=torch.cat([p_mask[rows], c_mask], dim=1),
                     position_ids=positions, past_key_values=cache, use_cache=True).last_hidden_state
    # Completion token j is predicted by the prompt's last position (j = 0) or completion token j - 1.
    last = out.last_hidden_state[torch.arange(len(prompts), device=device), p_len - 1][rows]
    hidden = torch.cat([last.unsqueeze(1), hidden[:, :-1]], dim=1)
    return hidden[c_mask.bool()]


class _Rows:
    """The batch's rows as the learning step needs them (numpy, per row or per token)."""

    def __init__(self, cols: Columns, lc: LearnerConfig, rule: ErpoRule, pad_id: int, overlong: str = "keep",
                 device: torch.device | str = "cpu", share: bool = False, prompt_weight: float = 1.0) -> None:
        self.cols = cols
        self.pad_id = pad_id
        self.device = torch.device(device)
        """The trainer's device: every tensor of the step is made there."""
        self.max_tokens = lc.max_tokens_per_micro_batch
        self.share = share
        """Each distinct prompt computed once for its rows (`shared_prompt_hidden`)."""
        self.prompt_weight = prompt_weight
        """With `share`: a row's copy of one prompt token, in tokens of the budget (`row_prompt_weight`)."""
        self.cut = np.asarray(cols["finish_reason"]).astype(str) == "length"
        """Rows cut at the length limit."""
        self.in_loss = ~self.cut if overlong == "mask" else np.ones(len(self.cut), dtype=bool)
        """Rows whose tokens the loss counts (``rollout.overlong = "mask"`` leaves cut rows out)."""
        _, self.group_index = np.unique(cols["group_id"], return_inverse=True)
        self.rewards = torch.as_tensor(np.asarray(cols["reward"], dtype=np.float32))
        adv = get_advantage(lc.loss.advantage)(self.rewards, torch.as_tensor(self.group_index))
        self.advantages = ra_advantages(np.asarray(cols["group_pass_rate"]), adv.numpy(), rule)
        self.completion_len = cols["completion_token_ids"].lengths()
        self.prompt_len = cols["prompt_token_ids"].lengths()
        self.length = self.prompt_len + self.completion_len
        distinct: dict[bytes, int] = {}
        self.prompt_of = np.array([distinct.setdefault(cols["prompt_token_ids"][i].tobytes(), len(distinct))
                                   for i in range(len(self.length))], dtype=np.int64)
        """Row -> index of its distinct prompt (token ids)."""
        self.phi = phi_clamp(self.rewards, lc.kl.phi_floor).numpy() if KL_TERMS[lc.kl.kind].reweighted else None

    def micro_batches(self, rows: np.ndarray) -> list[np.ndarray]:
        """``rows`` cut into micro-batches within the token budget (`shared_micro_batches` when
        prompts are shared, else `micro_batches`)."""
        if self.share:
            return shared_micro_batches(rows, self.prompt_of, self.prompt_len, self.completion_len, self.max_tokens,
                                        self.prompt_weight)
        return micro_batches(rows, self.length, self.max_tokens)

    def hidden(self, model: torch.nn.Module, rows: np.ndarray) -> torch.Tensor:
        """``model``'s hidden states that predict the rows' completion tokens, ``[N, d]`` row-major."""
        c = self.cols
        completions = [c["completion_token_ids"][i] for i in rows]
        if self.share:
            _, first, local = np.unique(self.prompt_of[rows], return_index=True, return_inverse=True)
            return shared_prompt_hidden(model, [c["prompt_token_ids"][rows[i]] for i in first], local, completions,
                                        self.pad_id, self.device)
        batch = pack([c["prompt_token_ids"][i] for i in rows], completions,
                     np.asarray(c["temperature"], dtype=np.float32)[rows], self.pad_id).to(self.device)
        return completion_hidden(model, batch)

    def tensor(self, values: np.ndarray) -> torch.Tensor:
        return torch.as_tensor(values).to(self.device)

    def per_token(self, values: np.ndarray, rows: np.ndarray) -> torch.Tensor:
        """A per-row value repeated for each of the rows' completion tokens ([N], row-major)."""
        return self.tensor(np.repeat(np.asarray(values)[rows], self.completion_len[rows]))

    def targets_and_temperatures(self, rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """The rows' completion token ids and each one's temperature ([N] each, row-major)."""
        c = self.cols
        ids = np.concatenate([c["completion_token_ids"][i] for i in rows]) if len(rows) else np.zeros(0)
        return (self.tensor(ids.astype(np.int64)),
                self.per_token(np.asarray(c["temperature"], dtype=np.float32), rows))

    def behavior(self, rows: np.ndarray) -> torch.Tensor:
        lp = self.cols["behavior_logprobs"]
        return self.tensor(np.concatenate([lp[i] for i in rows]) if len(rows) else np.zeros(0, np.float32))


def _token_weights(rows_all: np.ndarray, rows: np.ndarray, data: _Rows, aggregation: str, world: int) -> np.ndarray:
    """Each of ``rows``' tokens' weight in the update's loss: ``world`` x 1/(completion tokens of
    the whole update) for token-mean, ``world`` x 1/(sequences x the row's tokens) for
    sequence-mean (the trainer averages ``world`` ranks' gradients). Rows left out of the loss
    (``data.in_loss``) weigh 0 and are not counted; they still run, so every rank computes."""
    n = data.completion_len
    counted = n * data.in_loss
    if aggregation == "token_mean":
        per_row = np.full(len(rows), world / max(1, int(counted[rows_all].sum())), dtype=np.float64)
    else:
        seqs = max(1, int((counted[rows_all] > 0).sum()))
        per_row = world / (seqs * np.maximum(n[rows], 1))
    return np.repeat(per_row * data.in_loss[rows], n[rows]).astype(np.float32)


class StepMetrics:
    """The step's loss metrics: each of `LossOutputs.metrics` added up over the step's chunks, each
    of `LossOutputs.maxima` the largest (from 0)."""

    def __init__(self, settings: LossSettings) -> None:
        self.sums: dict[str, float] = defaultdict(float)
        self.maxima: dict[str, float] = defaultdict(float)
        self.add(rl_loss(LossInputs.empty(settings)))  # every metric present, at 0 if no update runs

    def add(self, out: LossOutputs) -> None:
        for name, value in out.metrics.items():
            self.sums[name] += float(value)
        for name, value in out.maxima.items():
            self.maxima[name] = max(self.maxima[name], float(value))

    def values(self) -> dict[str, float]:
        return dict(self.sums) | dict(self.maxima)


def proximal_logprobs(trainer: Trainer, data: _Rows, rows: np.ndarray, chunk: int) -> dict[int, np.ndarray]:
    """log pi_prox of each row's completion tokens: the current parameters, before this step's
    updates (values only, micro-batched and chunked like the loss)."""
    inner = getattr(trainer.model, "module", trainer.model)
    out: dict[int, np.ndarray] = {}
    with torch.no_grad():
        for micro in data.micro_batches(rows):
            plan = HeadPlan(*data.targets_and_temperatures(micro), chunk)
            completion_head(inner.get_output_embeddings(), data.hidden(trainer.model, micro), plan)
            lp = plan.values["logprobs"].cpu().numpy()
            for r, part in zip(micro, np.split(lp, np.cumsum(data.completion_len[micro])[:-1])):
                out[int(r)] = part
    return out


def bf16_native(device: torch.device | str) -> bool:
    """Whether ``device`` multiplies bfloat16 matrices in hardware: a CUDA GPU that supports bf16,
    or a CPU for which oneDNN has bf16 kernels (AVX512-BF16 or AMX). Elsewhere torch's bf16 matmul
    is a reference loop, several times slower than fp32."""
    kind = torch.device(device).type
    if kind == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if kind == "cpu":
        return torch.backends.mkldnn.is_available() and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return False


def resolved_autocast(mode: str, device: torch.device | str) -> str:
    """`learner.autocast` on ``device``: "auto" becomes "bfloat16" where `bf16_native`, else "off"."""
    if mode == "auto":
        return "bfloat16" if bf16_native(device) else "off"
    return mode


def autocast(device: torch.device, mode: str):
    """`learner.autocast`: bfloat16 matmuls in the forward passes inside the block, or nothing."""
    if resolved_autocast(mode, device) == "off":
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16)


def train_step(trainer: Trainer, ref_model: torch.nn.Module | None, groups: list[Columns], lc: LearnerConfig,
               rule: ErpoRule, pad_id: int, rng: np.random.Generator, overlong: str = "keep") -> dict[str, float]:
    """One training step on a batch of groups (see the module docstring).

    The groups are shuffled into ``mini_batches`` updates by ``rng``; with several ranks each rank
    trains on every ``world_size``-th group of each update. ``overlong="mask"`` leaves completions
    cut at the length limit out of the loss (their group's advantages still count them)."""
    model = trainer.model
    inner = getattr(model, "module", model)
    share = lc.share_prompts and not lc.gradient_checkpointing and not _sliding_window(getattr(inner, "config", None))
    data = _Rows(concat(groups), lc, rule, pad_id, overlong, trainer.device, share,
                 row_prompt_weight(inner.config) if share else 1.0)
    head = inner.get_output_embeddings()
    exact = KL_TERMS[lc.kl.kind].exact
    chunk = chunk_tokens(int(head.weight.shape[0]) if head.weight.numel() else int(inner.config.vocab_size),
                         lc.logit_chunk_mb, buffers=6 if exact else 3)
    n_groups = int(data.group_index.max()) + 1
    slices = np.array_split(rng.permutation(n_groups), lc.mini_batches)
    mine_of = [s[trainer.rank:: trainer.world_size] for s in slices]
    mine_all = np.flatnonzero(np.isin(data.group_index, np.concatenate(mine_of)))
    proximal = None
    if lc.mini_batches > 1:  # the parameters before this step's first update
        with autocast(trainer.device, lc.autocast):
            proximal = proximal_logprobs(trainer, data, mine_all, chunk)
    settings = LossSettings(lc.loss, lc.kl, updates=lc.mini_batches, ranks=trainer.world_size,
                            tokens=max(1.0, float((data.completion_len * data.in_loss)[mine_all].sum())))
    loss_metrics = StepMetrics(settings)
    sums: dict[str, float] = defaultdict(float)
    for groups_in_slice, mine in zip(slices, mine_of):
        rows_all = np.flatnonzero(np.isin(data.group_index, groups_in_slice))
        rows = np.flatnonzero(np.isin(data.group_index, mine))
        if not data.in_loss[rows_all].any():
            # Every completion of this update was cut and masked: no update at all (Adam's
            # momentum and the schedule would still move the weights). The same on every rank.
            sums["updates_skipped"] += 1
            continue
        for micro in data.micro_batches(rows):
            with autocast(trainer.device, lc.autocast):
                loss = _micro_loss(trainer, ref_model, data, rows_all, micro, lc, chunk, proximal, settings,
                                   loss_metrics)
            trainer.backward(loss)
            sums["loss"] += float(loss.detach()) / lc.mini_batches
        sums["grad_norm"] += trainer.update() / lc.mini_batches
    for always in ("loss", "grad_norm", "updates_skipped"):
        sums[always] += 0.0
    metrics = dict(sums) | loss_metrics.values()
    rates = np.asarray(data.cols["group_pass_rate"])
    n = len(data.rewards)
    metrics["reward"] = float(data.rewards.mean())
    all_correct, all_wrong = residual(rates)
    metrics["all_correct_frac"] = float(np.mean(all_correct))
    metrics["all_wrong_frac"] = float(np.mean(all_wrong))
    metrics["completion_len"] = float(data.completion_len.sum() / n)
    metrics["samples"] = float(n)
    metrics["overlong_frac"] = float(data.cut.mean())
    metrics["overlong_masked"] = float((~data.in_loss).sum())
    metrics["tokens"] = float((data.completion_len * data.in_loss).sum())  # the loss's completion tokens
    metrics["lr"] = lr_at(trainer.updates - 1, lc.optimizer.lr, lc.optimizer.warmup_steps)
    return metrics


def _micro_loss(trainer: Trainer, ref_model: torch.nn.Module | None, data: _Rows, rows_all: np.ndarray,
                micro: np.ndarray, lc: LearnerConfig, chunk: int, proximal: dict | None, settings: LossSettings,
                metrics: StepMetrics) -> torch.Tensor:
    """The loss of one micro-batch (its share of the update's loss, weights from the whole update)
    with its gradient prepared by the chunked head: `rl_loss` on every chunk, its metrics added to
    ``metrics``."""
    weights = data.tensor(_token_weights(rows_all, micro, data, lc.loss.aggregation, trainer.world_size))
    behavior = data.behavior(micro)
    advantages = data.per_token(data.advantages, micro)
    prox = data.tensor(np.concatenate([proximal[int(r)] for r in micro])) if proximal is not None else None
    term = KL_TERMS[lc.kl.kind]

    def token_loss(lp: torch.Tensor, values: dict[str, torch.Tensor], sl: slice) -> torch.Tensor:
        out = rl_loss(LossInputs(
            logprobs=lp, proximal_logprobs=prox[sl] if prox is not None else lp.detach(),
            behavior_logprobs=behavior[sl], advantages=advantages[sl], loss_weights=weights[sl], settings=settings,
            ref_logprobs=values.get("ref_logprobs"), ref_hat_logprobs=values.get("ref_hat_logprobs"),
            exact_kl=values.get("exact_kl"), entropy=values["entropy"]))
        metrics.add(out)
        return out.loss

    ref_hidden = None
    if term.reference:
        with torch.no_grad():
            ref_hidden = data.hidden(ref_model, micro)
    plan = HeadPlan(*data.targets_and_temperatures(micro), chunk, token_loss, ref_hidden=ref_hidden,
                    ref_head=ref_model.get_output_embeddings() if ref_model is not None else None,
                    phi=data.per_token(data.phi, micro) if data.phi is not None else None,
                    exact_kl_weight=lc.kl.coef * weights if term.exact else None)
    head = getattr(trainer.model, "module", trainer.model).get_output_embeddings()
    return completion_head(head, data.hidden(trainer.model, micro), plan)
