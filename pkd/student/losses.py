"""The Proxy-KD student loss (DESIGN §1, stage 2) as plain torch functions, testable without a
Trainer.

Per response position t of sample b (logits at position t predict token t+1):

    nll_t = −log π_s(y_t)
    kl_t  = τ² · KL(P_t ‖ Q_t)          P, Q: the proxy's / student's distribution over buckets
    loss  = Σ_t nll_t + α · w_b · kl_t   (a sum: the caller divides by the token count)

Buckets: `tail` — the cached top-k ids plus one "rest" bucket holding 1 − Σ top-k, for both the
proxy and the student (the student's rest mass is exact, a logsumexp over the other ids; with
k = V there are no other ids and no rest bucket); `renorm` — the proxy's top-k renormalised to
sum to 1, against the student's full-vocabulary log-probs at those ids. The student side is
never renormalised: that would hide its mass outside the top-k and give it no gradient (a
student with the proxy's shape on the top-k but half its mass elsewhere scores log 2, not 0).
The temperature τ divides the bucket log-probabilities (`tail`) or the logits (`renorm`), and
τ² keeps gradient magnitudes comparable across τ.

Memory: the loss never builds a (B, T, V) float32 copy of the logits. Rows are processed in
chunks of about 2^24 vocabulary entries; each chunk's gradient with respect to the logits is
computed in closed form during the forward and written into one buffer of the logits' own dtype
(the gradient plain SFT allocates anyway), so autograd keeps no per-chunk intermediates:

    ∂/∂z_j [nll]      = q_j − 1[j = y]                      q = softmax(z)
    ∂/∂b   [kl]       = τ (softmax(b/τ) − P)  =: g           b = student bucket log-probs
    ∂/∂z_j [kl] tail  = g_j (j ∈ top-k)  or  g_rest · q_j / q_rest (j ∉ top-k),  − q_j Σ g
    ∂/∂z_j [kl] renorm = τ (softmax(z/τ)_j − P_j)           P_j = 0 off the top-k
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

IGNORE_INDEX = -100
CHUNK_ELEMENTS = 1 << 24  # rows per chunk = this // V: ~64 MiB per float32 temporary
Tail = Literal["tail", "renorm"]


@dataclass
class KDLoss:
    """Sums over the batch's response positions; `loss` alone carries a gradient."""

    loss: torch.Tensor  # () scale · Σ (nll + α·w·kl)
    nll: torch.Tensor  # () Σ nll (detached)
    kl: torch.Tensor  # () Σ kl, unweighted (detached)
    tokens: torch.Tensor  # () number of response positions


def sample_weights(seq_logprob: torch.Tensor, mu: float, gamma: float) -> torch.Tensor:
    """w = σ((ℓ − μ)/γ): samples the proxy finds likely count more (paper §3.3). γ = 0 (all ℓ
    equal) gives σ(0) = 0.5 everywhere, the limit of the formula at ℓ = μ."""
    if gamma <= 0:
        return torch.full_like(seq_logprob, 0.5)
    return torch.sigmoid((seq_logprob - mu) / gamma)


def _chunk(
    z: torch.Tensor,  # (n, V) compute dtype
    y: torch.Tensor,  # (n,) target ids
    ids: torch.Tensor,  # (n, k) cached top-k ids
    lp: torch.Tensor,  # (n, k) cached top-k logprobs
    c_kl: torch.Tensor,  # (n,) α·w per row
    alpha: float,
    tail: Tail,
    tau: float,
    need_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """nll (n,), kl (n,) and ∂(nll + c_kl·kl)/∂z (n, V) for one chunk of rows (see module doc)."""
    lse = torch.logsumexp(z, dim=-1)  # (n,)
    nll = lse - z.gather(1, y[:, None]).squeeze(1)  # (n,)
    if not alpha:
        kl = torch.zeros_like(nll)
        if not need_grad:
            return nll, kl, None
        grad = torch.sub(z, lse[:, None]).exp_()  # (n, V) q
        return nll, kl, grad.scatter_add_(1, y[:, None], torch.full_like(nll, -1.0)[:, None])
    k = ids.shape[1]
    lp = lp.to(z.dtype)
    zs = z.gather(1, ids)  # (n, k)
    if tail == "tail":
        rest = z.scatter(1, ids, float("-inf"))  # (n, V) copy: non-top-k logits
        lse_rest = torch.logsumexp(rest, dim=-1)  # (n,) −inf when k = V: no rest ids at all
        has_rest = torch.isfinite(lse_rest)  # (n,)
        # the proxy's mass off the top-k; none when the top-k is the whole vocabulary (float
        # rounding of Σ p would otherwise leave mass in a bucket the student cannot fill)
        p_rest = torch.where(has_rest, 1.0 - lp.exp().sum(-1), 0.0).clamp_min(0.0)  # (n,)
        a = torch.cat([lp, p_rest.log()[:, None]], dim=1)  # (n, k+1)
        b = torch.cat([zs, lse_rest[:, None]], dim=1) - lse[:, None]  # (n, k+1)
        log_q = torch.log_softmax(b / tau, dim=-1)  # (n, k+1) student buckets
    else:  # renorm: the student's full-vocabulary log-probs (tempered) at the proxy's ids
        lse_t = lse if tau == 1.0 else torch.logsumexp(z / tau, dim=-1)  # (n,)
        a, log_q = lp, zs / tau - lse_t[:, None]  # (n, k): Σ exp(log_q) ≤ 1, never renormalised
    log_p = torch.log_softmax(a / tau, dim=-1)  # (n, K) proxy buckets (renorm: its top-k renormalised)
    p = log_p.exp()
    kl = tau * tau * torch.where(p > 0, p * (log_p - log_q), 0.0).sum(-1)  # (n,)
    if not need_grad:
        return nll, kl, None
    c = c_kl[:, None] * tau  # (n, 1)
    if tail == "tail":
        g = c * (log_q.exp() - p)  # (n, k+1) ∂(c_kl·kl)/∂b
        grad = torch.sub(z, lse[:, None]).exp_().mul_(1.0 - g.sum(-1, keepdim=True))  # (n, V) q·(1 − Σg)
        grad.scatter_add_(1, ids, g[:, :k])
        # q_j / q_rest on non-top-k ids (0 on the top-k); rows without rest ids have g_rest = 0
        grad.add_(rest.sub_(torch.where(has_rest, lse_rest, 0.0)[:, None]).exp_().mul_(g[:, k:]))
    elif tau == 1.0:  # renorm: ∂(c_kl·kl)/∂z = c·(q − P on the top-k)
        grad = torch.sub(z, lse[:, None]).exp_().mul_(1.0 + c)  # (n, V)
        grad.scatter_add_(1, ids, -c * p)
    else:  # renorm, tempered: c·(softmax(z/τ) − P on the top-k)
        grad = torch.sub(z, lse[:, None]).exp_()  # (n, V) q
        grad.add_(torch.div(z, tau).sub_(lse_t[:, None]).exp_().mul_(c))
        grad.scatter_add_(1, ids, -c * p)
    return nll, kl, grad.scatter_add_(1, y[:, None], torch.full_like(nll, -1.0)[:, None])


class _ChunkedKD(torch.autograd.Function):
    """Forward computes the loss and its gradient chunk by chunk; backward hands it back."""

    @staticmethod
    def forward(ctx, logits, shift_labels, topk_ids, topk_logprobs, weights, alpha, tail, tau, scale, chunk_rows):  # type: ignore[override]
        B, L, V = logits.shape
        flat = logits.reshape(B * L, V)  # (N, V) view
        rows = (shift_labels.reshape(-1) != IGNORE_INDEX).nonzero().squeeze(1)  # (M,) response rows
        cdtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
        need_grad = ctx.needs_input_grad[0]
        grad_flat = torch.zeros_like(flat) if need_grad else None  # (N, V) logits dtype
        y_all, ids_all = shift_labels.reshape(-1), topk_ids.reshape(B * L, -1)
        lp_all = topk_logprobs.reshape(B * L, -1)
        c_all = alpha * weights.to(cdtype)[torch.arange(B * L, device=logits.device) // L]  # (N,)
        nll_sum = torch.zeros((), dtype=cdtype, device=logits.device)
        kl_sum, wkl_sum = nll_sum.clone(), nll_sum.clone()
        step = chunk_rows or max(1, CHUNK_ELEMENTS // V)
        with torch.autocast(logits.device.type, enabled=False):
            for start in range(0, rows.numel(), step):
                r = rows[start : start + step]  # (n,)
                z = flat.index_select(0, r).to(cdtype)  # (n, V)
                nll, kl, grad = _chunk(z, y_all[r], ids_all[r].long(), lp_all[r], c_all[r], alpha, tail, tau, need_grad)
                nll_sum += nll.sum()
                kl_sum += kl.sum()
                wkl_sum += (c_all[r] * kl).sum()
                if grad is not None:
                    grad_flat.index_copy_(0, r, grad.mul_(scale).to(flat.dtype))
        ctx.save_for_backward(grad_flat if need_grad else None)
        ctx.logits_shape = logits.shape
        tokens = torch.tensor(rows.numel(), device=logits.device)
        ctx.mark_non_differentiable(nll_sum, kl_sum, tokens)
        return scale * (nll_sum + wkl_sum), nll_sum, kl_sum, tokens  # float32 even for bf16 logits

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss, *_):  # type: ignore[override]
        (grad_flat,) = ctx.saved_tensors  # (N, V), already scaled: training passes grad_loss = 1
        grad = grad_flat if bool(grad_loss == 1) else grad_flat * grad_loss.to(grad_flat.dtype)
        return grad.view(ctx.logits_shape), None, None, None, None, None, None, None, None, None


def proxy_kd_loss(
    logits: torch.Tensor,  # (B, L, V) any float dtype
    shift_labels: torch.Tensor,  # (B, L) target of each position, IGNORE_INDEX outside responses
    topk_ids: torch.Tensor,  # (B, L, k) proxy top-k ids aligned to positions
    topk_logprobs: torch.Tensor,  # (B, L, k) their logprobs (≤ 0)
    weights: torch.Tensor,  # (B,) per-sample weight w
    *,
    alpha: float = 1.0,
    tail: Tail = "tail",
    temperature: float = 1.0,
    scale: float = 1.0,
    chunk_rows: int | None = None,
) -> KDLoss:
    """Σ over response positions of NLL(teacher token) + α·w·τ²·KL(proxy ‖ student) on the
    cached top-k, times `scale`. α = 0 is plain SFT on the teacher's tokens (no KL work at all).

    Pass the normaliser as `scale` (e.g. 1 / tokens) rather than dividing `loss` afterwards:
    the gradient is then stored pre-scaled and backward returns it without another copy."""
    if tail not in ("tail", "renorm"):
        raise ValueError(f"tail must be 'tail' or 'renorm', got {tail!r}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    loss, nll, kl, tokens = _ChunkedKD.apply(logits, shift_labels, topk_ids, topk_logprobs, weights, float(alpha), tail, float(temperature), float(scale), chunk_rows)
    return KDLoss(loss=loss, nll=nll, kl=kl, tokens=tokens)
