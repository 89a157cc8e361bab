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

The chunking and the two drivers (from the logits, or fused with the output layer from the
hidden states so that no (B, L, V) tensor exists) live in `pkd.student.chunked`; this module
holds the divergence. Its gradient with respect to the logits z of a row, in closed form:

    ∂/∂z_j [nll]      = q_j − 1[j = y]                      q = softmax(z)
    ∂/∂b   [kl]       = τ (softmax(b/τ) − P)  =: g           b = student bucket log-probs
    ∂/∂z_j [kl] tail  = g_j (j ∈ top-k)  or  g_rest · q_j / q_rest (j ∉ top-k),  − q_j Σ g
    ∂/∂z_j [kl] renorm = τ (softmax(z/τ)_j − P_j)           P_j = 0 off the top-k
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from pkd.student.chunked import ChunkLoss, chunked_logits_loss, fused_head_loss

IGNORE_INDEX = -100
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


def _topk_rows(
    z: torch.Tensor,  # (n, V) compute dtype, the chunk's own copy (overwritten)
    y: torch.Tensor,  # (n,) target ids
    ids: torch.Tensor,  # (n, k) cached top-k ids
    lp: torch.Tensor,  # (n, k) cached top-k logprobs
    c_kl: torch.Tensor,  # (n,) α·w per row
    alpha: float,
    tail: Tail,
    tau: float,
    need_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """nll (n,), kl (n,) and ∂(nll + c_kl·kl)/∂z (n, V) for one chunk of rows (see module doc).

    Four passes over the (n, V) chunk whatever the loss (max, exp in place, sum, scale in place),
    the rest is (n, k) work: with a rest bucket the top-k ids are masked first, so the max, the
    exponentials and their sum are the rest's own (its log-mass is exact, not 1 − Σ top-k), and
    the top-k entries are filled in afterwards."""
    zy = z.gather(1, y[:, None]).squeeze(1)  # (n,)
    zs = z.gather(1, ids) if alpha else None  # (n, k)
    rest_bucket = bool(alpha) and tail == "tail"
    if rest_bucket:
        z.scatter_(1, ids, float("-inf"))  # the rest ids only
    m = z.amax(dim=-1)  # (n,) max over the rest (tail) or all ids; −inf: no rest ids (k = V)
    has = torch.isfinite(m)
    m = torch.where(has, m, 0.0)
    e = z.sub_(m[:, None]).exp_()  # (n, V) in place; 0 on the masked top-k
    s = e.sum(dim=-1)  # (n,) ≥ 1 where `has`
    lse_e = torch.where(has, m + s.log(), float("-inf"))  # (n,) logsumexp of what e covers
    lse = torch.logaddexp(lse_e, torch.logsumexp(zs, dim=-1)) if rest_bucket else lse_e  # (n,)
    nll = lse - zy
    kl = torch.zeros_like(nll)
    if alpha:
        lp = lp.to(z.dtype)
        if rest_bucket:
            # the proxy's mass off the top-k; none when the top-k is the whole vocabulary (float
            # rounding of Σ p would otherwise leave mass in a bucket the student cannot fill)
            p_rest = torch.where(has, 1.0 - lp.exp().sum(-1), 0.0).clamp_min(0.0)  # (n,)
            a = torch.cat([lp, p_rest.log()[:, None]], dim=1)  # (n, k+1)
            b = torch.cat([zs, lse_e[:, None]], dim=1) - lse[:, None]  # (n, k+1) student buckets
            log_q = torch.log_softmax(b / tau, dim=-1)
        else:  # renorm: the student's full-vocabulary log-probs (tempered) at the proxy's ids
            e_t = e if tau == 1.0 else e.pow(1.0 / tau)  # (n, V) ∝ softmax(z/τ)
            lse_t = lse if tau == 1.0 else m / tau + e_t.sum(-1).log()  # (n,)
            a, log_q = lp, zs / tau - lse_t[:, None]  # (n, k): Σ exp(log_q) ≤ 1, never renormalised
        log_p = torch.log_softmax(a / tau, dim=-1)  # (n, K) proxy buckets (renorm: its top-k renormalised)
        p = log_p.exp()
        kl = tau * tau * torch.where(p > 0, p * (log_p - log_q), 0.0).sum(-1)  # (n,)
    if not need_grad:
        return nll, kl, None
    to_q = torch.exp(m - lse)[:, None]  # (n, 1) q = e · to_q
    c = c_kl[:, None] * tau  # (n, 1)
    if not alpha:
        grad = e.mul_(to_q)  # q
    elif rest_bucket:
        g = c * (log_q.exp() - p)  # (n, k+1) ∂(c_kl·kl)/∂b
        k = ids.shape[1]
        coef = 1.0 - g.sum(-1, keepdim=True)  # (n, 1)
        # off the top-k: q_j (1 − Σg) + g_rest q_j / q_rest, with q_j / q_rest = e_j / s
        grad = e.mul_(coef * to_q + torch.where(has, g[:, k] / s, 0.0)[:, None])  # (n, V), 0 on the top-k
        grad.scatter_add_(1, ids, (zs - lse[:, None]).exp() * coef + g[:, :k])  # the top-k ids
    elif tau == 1.0:  # renorm: ∂(c_kl·kl)/∂z = c·(q − P on the top-k)
        grad = e.mul_(to_q * (1.0 + c))
        grad.scatter_add_(1, ids, -c * p)
    else:  # renorm, tempered: q + c·(softmax(z/τ) − P on the top-k)
        grad = e.mul_(to_q).add_(e_t.mul_(c * torch.exp(m / tau - lse_t)[:, None]))
        grad.scatter_add_(1, ids, -c * p)
    return nll, kl, grad.scatter_add_(1, y[:, None], torch.full_like(nll, -1.0)[:, None])


def flatten_rows(
    shift_labels: torch.Tensor,  # (B, L) target of each position, IGNORE_INDEX outside responses
    weights: torch.Tensor,  # (B,) per-sample weight w
    alpha: float,
    *per_position: torch.Tensor,  # each (B, L, k) cached ids / logprobs / counts
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """The batch as flat rows for a `ChunkLoss`: targets (N,), response rows (M,), α·w per row
    (N,) and each per-position tensor as (N, k); N = B·L."""
    B, L = shift_labels.shape
    y_all = shift_labels.reshape(-1)  # (N,)
    rows = (y_all != IGNORE_INDEX).nonzero().squeeze(1)  # (M,)
    c_row = alpha * per_row(weights, L)  # (N,) α·w
    return y_all, rows, c_row, [t.reshape(B * L, -1) for t in per_position]


def per_row(values: torch.Tensor, L: int) -> torch.Tensor:
    """A per-sample value (B,) repeated for each of its L positions: (B·L,) float64."""
    return values.double().repeat_interleave(L)


def ce_weighted(chunk_loss: ChunkLoss, ce_row: torch.Tensor | None) -> ChunkLoss:
    """`--weight-ce`: CE weighted per row too, a·NLL + c·KL with a = ce_row > 0. `chunk_loss` must
    weight the KL by c/a; scaling its row loss and gradient by a then gives a·NLL + c·KL, so the
    closed-form gradients stay the ones tested."""
    if ce_row is None:
        return chunk_loss

    def weighted(z: torch.Tensor, r: torch.Tensor, need_grad: bool):
        a = ce_row[r].to(z.dtype)  # (n,)
        nll, kl, loss, grad = chunk_loss(z, r, need_grad)
        if grad is not None:
            grad.mul_(a[:, None])
        return nll, kl, a * loss, grad

    return weighted


def topk_kd_rows(
    shift_labels: torch.Tensor,  # (B, L) target of each position, IGNORE_INDEX outside responses
    topk_ids: torch.Tensor,  # (B, L, k) proxy top-k ids aligned to positions
    topk_logprobs: torch.Tensor,  # (B, L, k) their logprobs (≤ 0)
    weights: torch.Tensor,  # (B,) per-sample weight w
    *,
    alpha: float,
    tail: Tail,
    temperature: float,
    ce_weights: torch.Tensor | None = None,  # (B,) > 0: weight CE per sample too (--weight-ce)
) -> tuple[torch.Tensor, ChunkLoss]:
    """The response rows (M,) of the flattened batch and the Proxy-KD `ChunkLoss` over them."""
    if tail not in ("tail", "renorm"):
        raise ValueError(f"tail must be 'tail' or 'renorm', got {tail!r}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    y_all, rows, c_row, (ids_all, lp_all) = flatten_rows(shift_labels, weights, alpha, topk_ids, topk_logprobs)
    ce_row = None if ce_weights is None else per_row(ce_weights, shift_labels.shape[1])  # (N,)
    if ce_row is not None:
        c_row = c_row / ce_row  # see ce_weighted

    def chunk_loss(z: torch.Tensor, r: torch.Tensor, need_grad: bool):
        c = c_row[r].to(z.dtype)  # (n,)
        nll, kl, grad = _topk_rows(z, y_all[r], ids_all[r].long(), lp_all[r], c, alpha, tail, temperature, need_grad)
        return nll, kl, nll + c * kl, grad

    return rows, ce_weighted(chunk_loss, ce_row)


def proxy_kd_loss(
    logits: torch.Tensor,  # (B, L, V) any float dtype
    shift_labels: torch.Tensor,  # (B, L)
    topk_ids: torch.Tensor,  # (B, L, k)
    topk_logprobs: torch.Tensor,  # (B, L, k)
    weights: torch.Tensor,  # (B,)
    *,
    alpha: float = 1.0,
    tail: Tail = "tail",
    temperature: float = 1.0,
    scale: float = 1.0,
    chunk_rows: int | None = None,
    ce_weights: torch.Tensor | None = None,
) -> KDLoss:
    """Σ over response positions of NLL(teacher token) + α·w·τ²·KL(proxy ‖ student) on the
    cached top-k, times `scale`, from the student's logits; with `ce_weights` (B,) the NLL of
    sample b is weighted by ce_weights[b] too. α = 0 is plain SFT on the teacher's
    tokens (no KL work at all). The reference for `fused_proxy_kd_loss`.

    Pass the normaliser as `scale` (e.g. 1 / tokens) rather than dividing `loss` afterwards:
    the gradient is then stored pre-scaled and backward returns it without another copy."""
    rows, chunk_loss = topk_kd_rows(shift_labels, topk_ids, topk_logprobs, weights, alpha=float(alpha), tail=tail, temperature=float(temperature), ce_weights=ce_weights)
    return KDLoss(*chunked_logits_loss(logits, rows, chunk_loss, scale=scale, chunk_rows=chunk_rows))


def fused_proxy_kd_loss(
    hidden: torch.Tensor,  # (B, L, d) the student's last hidden states (after the final norm)
    weight: torch.Tensor,  # (V, d) its output-embedding weight (logits = hidden · weightᵀ)
    shift_labels: torch.Tensor,  # (B, L)
    topk_ids: torch.Tensor,  # (B, L, k)
    topk_logprobs: torch.Tensor,  # (B, L, k)
    weights: torch.Tensor,  # (B,)
    *,
    alpha: float = 1.0,
    tail: Tail = "tail",
    temperature: float = 1.0,
    scale: float = 1.0,
    chunk_rows: int | None = None,
    ce_weights: torch.Tensor | None = None,
) -> KDLoss:
    """`proxy_kd_loss` of the logits hidden · weightᵀ, computed without ever building them or
    their gradient (see `pkd.student.chunked`); gradients flow to both `hidden` and `weight`."""
    rows, chunk_loss = topk_kd_rows(shift_labels, topk_ids, topk_logprobs, weights, alpha=float(alpha), tail=tail, temperature=float(temperature), ce_weights=ce_weights)
    return KDLoss(*fused_head_loss(hidden, weight, rows, chunk_loss, scale=scale, chunk_rows=chunk_rows))
