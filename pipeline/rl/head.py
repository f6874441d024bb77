"""Completion-token log-probabilities, the loss on them and its gradient, without a
``[tokens, vocabulary]`` matrix.

With a Qwen-sized vocabulary (151,936) the output layer is the learner's memory: the tempered
log-softmax over the vocabulary for every completion token of a mini-batch is tokens x V floats
(64 sequences x 1,024 tokens: 40 GB in fp32), and autograd keeps several of them. `completion_head`
instead goes through the completion positions a chunk at a time (`chunk_tokens`, sized from a
memory budget) and, inside each chunk, computes the loss terms *and their gradient with respect
to the chunk's logits* at once (a log-softmax's gradient is closed-form), multiplies that gradient
back onto the hidden states and the output weight, and drops the chunk: the fused linear
cross-entropy of Liger-Kernel, generalised to the RL loss. Nothing is kept or recomputed for the
backward pass, which only hands the accumulated gradients to autograd.

Per completion token t (target y_t, temperature tau_t, logits z_t = W h_t), in fp32:

- ``logprobs`` log pi(y_t) and ``entropy`` of pi(.|s_t) at the temperature (returned as values);
- with a reference, ``ref_logprobs`` log pi_ref(y_t) and, with ``phi``, ``ref_hat_logprobs`` log
  pi_hat_ref(y_t) of RAPO's reweighted reference pi_hat_ref = softmax(phi * log pi_ref);
- the loss: ``token_loss(lp, values, sl)``, any differentiable function of the chunk's log-probs
  (the learner's is `pipeline.rl.losses.rl_loss`: the PPO term, k3, RAPO's sampled estimator; its
  gradient comes from autograd on the ``[chunk]`` vector), given the chunk's other values, plus, with ``exact_kl_weight``, RAPO's exact forward KL
  sum_v pi_hat_ref(v) (log pi_hat_ref(v) - log pi(v)) times a per-token weight, whose logit
  gradient is weight_t (pi - pi_hat_ref) / tau_t.

Under DeepSpeed ZeRO-3 the head runs as the output layer module's own forward, so a partitioned
weight is gathered for it and its gradient reduced as for any layer.
"""

from __future__ import annotations

import types
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from pipeline.model.batch import MIN_TEMPERATURE

TokenLoss = Callable[[torch.Tensor, dict[str, torch.Tensor], slice], torch.Tensor]
"""(log-probs of a chunk's tokens, with grad; the chunk's other values computed so far, by name as in
`HeadPlan.values` (entropy, and ref_logprobs, ref_hat_logprobs, exact_kl where computed; no grad);
the chunk's slice of the N tokens) -> scalar loss of those tokens."""


def chunk_tokens(vocab_size: int, budget_mb: float, buffers: int = 4) -> int:
    """Tokens per chunk so that the chunk's ``buffers`` fp32 ``[chunk, V]`` temporaries fit in
    ``budget_mb``."""
    return max(1, int(budget_mb * 2**20 // (buffers * 4 * vocab_size)))


@dataclass
class HeadPlan:
    """What `completion_head` computes for the N completion tokens (row-major, as
    ``completion_mask``)."""

    targets: torch.Tensor
    """[N] the completion token ids (long)."""
    temperatures: torch.Tensor
    """[N] each token's sampling temperature."""
    chunk: int
    """Tokens per chunk (`chunk_tokens`)."""
    token_loss: TokenLoss | None = None
    """The per-token loss; None computes values only (no loss, no gradient)."""
    ref_hidden: torch.Tensor | None = None
    """[N, d_ref] the reference model's last hidden states at the same positions (no grad)."""
    ref_head: torch.nn.Module | None = None
    """The reference model's output layer."""
    phi: torch.Tensor | None = None
    """[N] RAPO's phi(r) per token: with a reference, the reweighted reference is computed."""
    exact_kl_weight: torch.Tensor | None = None
    """[N] weight of RAPO's exact forward KL per token in the loss (coefficient x aggregation)."""
    values: dict[str, torch.Tensor] = field(default_factory=dict)
    """Filled by `completion_head`: logprobs, entropy, and ref_logprobs, ref_hat_logprobs,
    exact_kl where computed ([N] each, no grad)."""


class _ChunkedHead(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, plan: HeadPlan) -> torch.Tensor:  # noqa: D102
        want_grad = plan.token_loss is not None and (ctx.needs_input_grad[0] or ctx.needs_input_grad[1])
        n, device = hidden.shape[0], hidden.device
        temps = plan.temperatures.to(device=device, dtype=torch.float32).clamp(min=MIN_TEMPERATURE)
        targets = plan.targets.to(device).long()
        with_ref = plan.ref_hidden is not None
        out = {"logprobs": torch.empty(n, device=device), "entropy": torch.empty(n, device=device)}
        if with_ref:
            out["ref_logprobs"] = torch.empty(n, device=device)
            if plan.phi is not None:
                out["ref_hat_logprobs"] = torch.empty(n, device=device)
            if plan.exact_kl_weight is not None:
                out["exact_kl"] = torch.empty(n, device=device)
        grad_h = torch.zeros_like(hidden, dtype=torch.float32) if want_grad else None
        grad_w = torch.zeros_like(weight, dtype=torch.float32) if want_grad else None
        loss = torch.zeros((), device=device)
        for start in range(0, n, plan.chunk):
            sl = slice(start, min(n, start + plan.chunk))
            h, t, y = hidden[sl], temps[sl].unsqueeze(1), targets[sl].unsqueeze(1)
            logp = torch.log_softmax((h @ weight.t()).float().div_(t), dim=-1)  # [c, V]
            lp = logp.gather(1, y).squeeze(1)
            p = logp.exp()
            out["logprobs"][sl] = lp
            out["entropy"][sl] = -(p * logp).sum(-1)
            hat = None
            if with_ref:
                ref_logp = torch.log_softmax((plan.ref_hidden[sl] @ plan.ref_head.weight.t()).float().div_(t), dim=-1)
                out["ref_logprobs"][sl] = ref_logp.gather(1, y).squeeze(1)
                if plan.phi is not None:
                    hat = torch.log_softmax(ref_logp.mul_(plan.phi[sl].to(device).float().unsqueeze(1)), dim=-1)
                    out["ref_hat_logprobs"][sl] = hat.gather(1, y).squeeze(1)
                del ref_logp
            grad_z = None
            if plan.exact_kl_weight is not None:
                hat_p = hat.exp()
                # 0 x log 0 is 0 (a near-greedy temperature leaves -inf log-probs)
                out["exact_kl"][sl] = (hat_p * (hat - logp)).nan_to_num_(nan=0.0).sum(-1)
                kw = plan.exact_kl_weight[sl].to(device).float()
                loss = loss + (kw * out["exact_kl"][sl]).sum()
                if want_grad:  # d KL / d z = (pi - pi_hat) / tau, per token weighted
                    grad_z = (p - hat_p).mul_(kw.unsqueeze(1))
                del hat_p
            if plan.token_loss is not None:
                with torch.enable_grad():
                    leaf = lp.detach().requires_grad_(want_grad)
                    part = plan.token_loss(leaf, {k: v[sl] for k, v in out.items() if k != "logprobs"}, sl)
                    if want_grad:
                        (g,) = torch.autograd.grad(part, leaf)
                loss = loss + part.detach()
                if want_grad:  # d lp / d z = (onehot(y) - pi) / tau
                    g_z = p.mul_(-g.unsqueeze(1))
                    g_z.scatter_add_(1, y, g.unsqueeze(1))
                    grad_z = g_z if grad_z is None else grad_z.add_(g_z)
            if want_grad and grad_z is not None:
                grad_z.div_(t)
                grad_h[sl] = grad_z @ weight.float()
                grad_w.addmm_(grad_z.t(), h.float())
            del logp, p, grad_z, hat
        plan.values.update(out)
        if want_grad:
            ctx.save_for_backward(grad_h.to(hidden.dtype), grad_w.to(weight.dtype))
        ctx.want_grad = want_grad
        return loss

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):  # noqa: D102
        if not ctx.want_grad:
            return None, None, None
        grad_h, grad_w = ctx.saved_tensors
        return grad_h * grad_out, grad_w * grad_out, None


def completion_head(head: torch.nn.Module, hidden: torch.Tensor, plan: HeadPlan) -> torch.Tensor:
    """The loss of `plan` (a scalar, differentiable with respect to ``hidden`` [N, d] and the
    head's weight) and, in ``plan.values``, the per-token values; see the module docstring.
    ``head`` is the model's output layer (``get_output_embeddings()``), called as a module so
    that DeepSpeed's hooks gather and reduce its weight."""
    if getattr(head, "bias", None) is not None:
        raise NotImplementedError("an output layer with a bias is not supported by the chunked head")
    head.forward = types.MethodType(lambda self, h: _ChunkedHead.apply(h, self.weight, plan), head)
    try:
        return head(hidden)
    finally:
        del head.forward
