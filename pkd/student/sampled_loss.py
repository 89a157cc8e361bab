"""The RS-KD student loss on sampled caches (random-sampling KD, Anshumann et al., ACL 2025):
an estimate of the forward KL from ids drawn from the proxy's full distribution, as plain torch.

At a response position the cache holds the distinct ids x_j among N draws from the proposal
r ∝ p^{1/τ_r} (p: the proxy, τ_r: the proposal temperature), their counts c_j and log p(x_j).
The KD target at temperature T is p_T ∝ p^{1/T}; each draw is importance-weighted
(self-normalised, so the unknown normalisers cancel):

    a_j   = c_j · p_j^{1/T − 1/τ_r} / Σ_i c_i · p_i^{1/T − 1/τ_r}        (= c_j / N when T = τ_r)
    kl    = T² · Σ_j a_j (log p̂_T(x_j) − log q_T(x_j))                   q_T = softmax(z / T)
    ∂kl/∂z = T · (q_T − Σ_j a_j e_{x_j})

With T = τ_r = 1 the weights are the draw frequencies and both the KL and its gradient are
unbiased: E[Σ_j (c_j/N) e_{x_j}] = p, so E[∂kl/∂z] = q − p = ∂KL(p ‖ q)/∂z. Otherwise the
self-normalisation makes them consistent (bias O(1/N)). log p̂_T = log p/T − log Ẑ_T with
Ẑ_T estimated from the same draws (it only shifts the reported KL, not the gradient).

`rs_kd_chunk` is the per-chunk function (rows of student logits in, KL and its gradient out) so
a fused output-layer path can call it on its own row chunks; `sampled_kd_loss` wraps it with the
NLL, the α·w weighting and row chunking like `proxy_kd_loss`, writing the closed-form gradient
into one buffer of the logits' dtype during the forward.
"""

from __future__ import annotations

import torch

from pkd.student.chunked import CHUNK_ELEMENTS
from pkd.student.losses import IGNORE_INDEX, KDLoss


def draw_weights(
    logprobs: torch.Tensor,  # (n, N) proxy log p of each stored id (padding: anything)
    counts: torch.Tensor,  # (n, N) draws of each id, 0 = padding
    temperature: float,
    proposal_temperature: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Self-normalised importance weights a (n, N), summing to 1 per row, and log Ẑ_T (n,)."""
    valid = counts > 0
    c = counts.to(logprobs.dtype)
    log_c = torch.where(valid, c.log(), float("-inf"))  # (n, N)
    lp = torch.where(valid, logprobs, 0.0)
    log_w = log_c + lp * (1.0 / temperature - 1.0 / proposal_temperature)  # (n, N)
    a = torch.softmax(log_w, dim=-1)
    # Ẑ_T = Z_r · E_r[p^{1/T − 1/τ_r}] and 1/Z_r = E_r[p^{1 − 1/τ_r}] (from E_r[p / r] = 1), both
    # as frequency averages over the draws; the 1/N of each cancels.
    log_z = torch.logsumexp(log_w, -1) - torch.logsumexp(log_c + lp * (1.0 - 1.0 / proposal_temperature), -1)  # (n,)
    return a, log_z


def rs_kd_chunk(
    z: torch.Tensor,  # (n, V) student logits, compute dtype
    ids: torch.Tensor,  # (n, N) drawn ids (long)
    logprobs: torch.Tensor,  # (n, N) proxy log p of each
    counts: torch.Tensor,  # (n, N) draws of each, 0 = padding
    coef: torch.Tensor,  # (n,) α·w per row: the gradient is that of Σ coef·kl
    *,
    temperature: float = 1.0,
    proposal_temperature: float = 1.0,
    need_grad: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """kl (n,) = T²·KL̂(p_T ‖ q_T) per row, and ∂(Σ coef·kl)/∂z (n, V) (see the module doc)."""
    T = temperature
    a, log_z = draw_weights(logprobs.to(z.dtype), counts, T, proposal_temperature)  # (n, N), (n,)
    log_qt = torch.log_softmax(z / T, dim=-1)  # (n, V) one temporary the size of the chunk
    log_qt_x = log_qt.gather(1, ids)  # (n, N)
    log_pt_x = logprobs.to(z.dtype) / T - log_z[:, None]  # (n, N)
    kl = T * T * torch.where(a > 0, a * (log_pt_x - log_qt_x), 0.0).sum(-1)  # (n,)
    if not need_grad:
        return kl, None
    grad = log_qt.exp_().mul_((coef * T)[:, None])  # (n, V) coef·T·q_T, in place
    grad.scatter_add_(1, ids, -(coef * T)[:, None] * a)  # − coef·T·Σ a_j e_{x_j}
    return kl, grad


class _ChunkedRSKD(torch.autograd.Function):
    """Forward computes NLL + α·w·kl and its gradient chunk by chunk; backward hands it back."""

    @staticmethod
    def forward(ctx, logits, shift_labels, ids, logprobs, counts, weights, alpha, tau, proposal_tau, scale, chunk_rows):  # type: ignore[override]
        B, L, V = logits.shape
        flat = logits.reshape(B * L, V)  # (B·L, V) view
        rows = (shift_labels.reshape(-1) != IGNORE_INDEX).nonzero().squeeze(1)  # (M,) response rows
        cdtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
        need_grad = ctx.needs_input_grad[0]
        grad_flat = torch.zeros_like(flat) if need_grad else None
        y_all = shift_labels.reshape(-1)
        ids_all, lp_all, c_all = ids.reshape(B * L, -1), logprobs.reshape(B * L, -1), counts.reshape(B * L, -1)
        coef_all = alpha * weights.to(cdtype)[torch.arange(B * L, device=logits.device) // L]  # (B·L,)
        sums = torch.zeros(3, dtype=cdtype, device=logits.device)  # Σ nll, Σ kl, Σ coef·kl
        step = chunk_rows or max(1, CHUNK_ELEMENTS // V)
        with torch.autocast(logits.device.type, enabled=False):
            for start in range(0, rows.numel(), step):
                r = rows[start : start + step]  # (n,)
                z = flat.index_select(0, r).to(cdtype)  # (n, V)
                y = y_all[r]
                lse = torch.logsumexp(z, dim=-1)  # (n,)
                nll = lse - z.gather(1, y[:, None]).squeeze(1)  # (n,)
                kl, grad = torch.zeros_like(nll), None
                if alpha:
                    kl, grad = rs_kd_chunk(z, ids_all[r].long(), lp_all[r], c_all[r], coef_all[r], temperature=tau, proposal_temperature=proposal_tau, need_grad=need_grad)
                sums += torch.stack([nll.sum(), kl.sum(), (coef_all[r] * kl).sum()])
                if need_grad:
                    g_nll = torch.sub(z, lse[:, None]).exp_()  # (n, V) softmax(z) − e_y
                    g_nll.scatter_add_(1, y[:, None], torch.full_like(nll, -1.0)[:, None])
                    if grad is not None:
                        g_nll.add_(grad)
                    grad_flat.index_copy_(0, r, g_nll.mul_(scale).to(flat.dtype))
        ctx.save_for_backward(grad_flat if need_grad else None)
        ctx.logits_shape = logits.shape
        tokens = torch.tensor(rows.numel(), device=logits.device)
        nll_sum, kl_sum = sums[0].clone(), sums[1].clone()
        ctx.mark_non_differentiable(nll_sum, kl_sum, tokens)
        return scale * (sums[0] + sums[2]), nll_sum, kl_sum, tokens

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss, *_):  # type: ignore[override]
        (grad_flat,) = ctx.saved_tensors  # (B·L, V), already scaled
        grad = grad_flat if bool(grad_loss == 1) else grad_flat * grad_loss.to(grad_flat.dtype)
        return (grad.view(ctx.logits_shape),) + (None,) * 10


def sampled_kd_loss(
    logits: torch.Tensor,  # (B, L, V) any float dtype
    shift_labels: torch.Tensor,  # (B, L) target of each position, IGNORE_INDEX outside responses
    ids: torch.Tensor,  # (B, L, N) drawn ids aligned to positions
    logprobs: torch.Tensor,  # (B, L, N) proxy log p of each
    counts: torch.Tensor,  # (B, L, N) draws of each, 0 = padding
    weights: torch.Tensor,  # (B,) per-sample weight w
    *,
    alpha: float = 1.0,
    temperature: float = 1.0,
    proposal_temperature: float = 1.0,
    scale: float = 1.0,
    chunk_rows: int | None = None,
) -> KDLoss:
    """Σ over response positions of NLL(teacher token) + α·w·T²·KL̂(proxy ‖ student) from the
    sampled cache, times `scale` (pass the normaliser here, as for `proxy_kd_loss`)."""
    if temperature <= 0 or proposal_temperature <= 0:
        raise ValueError(f"temperatures must be > 0, got {temperature} and {proposal_temperature}")
    loss, nll, kl, tokens = _ChunkedRSKD.apply(logits, shift_labels, ids, logprobs, counts, weights, float(alpha), float(temperature), float(proposal_temperature), float(scale), chunk_rows)
    return KDLoss(loss=loss, nll=nll, kl=kl, tokens=tokens)
