"""The RS-KD student loss on sampled caches (random-sampling KD, Anshumann et al., ACL 2025):
an estimate of the forward KL from ids drawn from the proxy's full distribution, as plain torch.

At a response position the cache holds the distinct ids x_j among N draws from the proposal
r ∝ p^{1/τ_r} (p: the proxy, τ_r: the proposal temperature), their counts c_j and log p(x_j).
The KD target at temperature T is p_T ∝ p^{1/T}; each draw is importance-weighted
(self-normalised, so the unknown normalisers cancel):

    a_j   = c_j · p_j^{1/T − 1/τ_r} / Σ_i c_i · p_i^{1/T − 1/τ_r}        (= c_j / N when T = τ_r)
    kl    = T² · Σ_j a_j (log p̂_T(x_j) − log q_T(x_j))                   q_T = softmax(z / T)
    ∂kl/∂z = T · (q_T − Σ_j a_j e_{x_j})

With T = τ_r, at any τ_r, the weights are the draw frequencies and the gradient is unbiased:
E[Σ_j (c_j/N) e_{x_j}] = r = p_T, so E[∂kl/∂z] = T·(q_T − p_T) = ∂T²KL(p_T ‖ q_T)/∂z. With
T ≠ τ_r the self-normalisation estimates the normalisers from the same N draws, which biases the
gradient strongly at N = 12 (V = 50: −8.2% at T = 1, τ_r = 2; +27.6% at τ_r = 0.5; +21.4% at
T = 2, τ_r = 1; within ±4e-4 at T = τ_r = 1, 2 and 0.5: `python bench/rs_kd_bias.py`), so `pkd train-student` refuses a KD temperature
other than the cache's proposal temperature. log p̂_T = log p/T − log Ẑ_T with Ẑ_T estimated from
the same draws (it only shifts the reported KL, not the gradient).

`rs_kd_chunk` is the per-chunk divergence (rows of student logits in, KL and its gradient out);
`sampled_kd_rows` adds the NLL and the α·w weighting as a `ChunkLoss`, which the two drivers of
`pkd.student.chunked` run like the top-k loss: `sampled_kd_loss` on the model's logits,
`fused_sampled_kd_loss` from the hidden states without ever building them.
"""

from __future__ import annotations

import torch

from pkd.student.chunked import ChunkLoss, chunked_logits_loss, fused_head_loss
from pkd.student.losses import KDLoss, ce_weighted, flatten_rows, per_row


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


def sampled_kd_rows(
    shift_labels: torch.Tensor,  # (B, L) target of each position, IGNORE_INDEX outside responses
    ids: torch.Tensor,  # (B, L, N) drawn ids aligned to positions
    logprobs: torch.Tensor,  # (B, L, N) proxy log p of each
    counts: torch.Tensor,  # (B, L, N) draws of each, 0 = padding
    weights: torch.Tensor,  # (B,) per-sample weight w
    *,
    alpha: float,
    temperature: float,
    proposal_temperature: float,
    ce_weights: torch.Tensor | None = None,  # (B,) > 0: weight CE per sample too (--weight-ce)
) -> tuple[torch.Tensor, ChunkLoss]:
    """The response rows (M,) of the flattened batch and the RS-KD `ChunkLoss` over them (NLL of
    the teacher token + α·w·kl), for either driver of `pkd.student.chunked`."""
    if temperature <= 0 or proposal_temperature <= 0:
        raise ValueError(f"temperatures must be > 0, got {temperature} and {proposal_temperature}")
    y_all, rows, coef_all, (ids_all, lp_all, c_all) = flatten_rows(shift_labels, weights, alpha, ids, logprobs, counts)
    ce_row = None if ce_weights is None else per_row(ce_weights, shift_labels.shape[1])  # (N,)
    if ce_row is not None:
        coef_all = coef_all / ce_row  # see pkd.student.losses.ce_weighted

    def chunk_loss(z: torch.Tensor, r: torch.Tensor, need_grad: bool):
        y, coef = y_all[r], coef_all[r].to(z.dtype)  # (n,)
        kl, g_kl = torch.zeros(len(r), dtype=z.dtype, device=z.device), None
        if alpha:
            kl, g_kl = rs_kd_chunk(z, ids_all[r].long(), lp_all[r], c_all[r], coef, temperature=temperature, proposal_temperature=proposal_temperature, need_grad=need_grad)
        lse = torch.logsumexp(z, dim=-1)  # (n,)
        nll = lse - z.gather(1, y[:, None]).squeeze(1)  # (n,)
        if not need_grad:
            return nll, kl, nll + coef * kl, None
        grad = z.sub_(lse[:, None]).exp_()  # (n, V) softmax(z), in place: z is the chunk's own copy
        grad.scatter_add_(1, y[:, None], torch.full_like(nll, -1.0)[:, None])  # − e_y
        if g_kl is not None:
            grad.add_(g_kl)
        return nll, kl, nll + coef * kl, grad

    return rows, ce_weighted(chunk_loss, ce_row)


def sampled_kd_loss(
    logits: torch.Tensor,  # (B, L, V) any float dtype
    shift_labels: torch.Tensor,  # (B, L)
    ids: torch.Tensor,  # (B, L, N)
    logprobs: torch.Tensor,  # (B, L, N)
    counts: torch.Tensor,  # (B, L, N)
    weights: torch.Tensor,  # (B,)
    *,
    alpha: float = 1.0,
    temperature: float = 1.0,
    proposal_temperature: float = 1.0,
    scale: float = 1.0,
    chunk_rows: int | None = None,
    ce_weights: torch.Tensor | None = None,
) -> KDLoss:
    """Σ over response positions of NLL(teacher token) + α·w·T²·KL̂(proxy ‖ student) from the
    sampled cache, times `scale` (pass the normaliser here, as for `proxy_kd_loss`), from the
    student's logits. The reference for `fused_sampled_kd_loss`."""
    rows, chunk_loss = sampled_kd_rows(shift_labels, ids, logprobs, counts, weights, alpha=float(alpha), temperature=float(temperature), proposal_temperature=float(proposal_temperature), ce_weights=ce_weights)
    return KDLoss(*chunked_logits_loss(logits, rows, chunk_loss, scale=scale, chunk_rows=chunk_rows))


def fused_sampled_kd_loss(
    hidden: torch.Tensor,  # (B, L, d) the student's last hidden states
    weight: torch.Tensor,  # (V, d) its output-embedding weight
    shift_labels: torch.Tensor,  # (B, L)
    ids: torch.Tensor,  # (B, L, N)
    logprobs: torch.Tensor,  # (B, L, N)
    counts: torch.Tensor,  # (B, L, N)
    weights: torch.Tensor,  # (B,)
    *,
    alpha: float = 1.0,
    temperature: float = 1.0,
    proposal_temperature: float = 1.0,
    scale: float = 1.0,
    chunk_rows: int | None = None,
    ce_weights: torch.Tensor | None = None,
) -> KDLoss:
    """`sampled_kd_loss` of the logits hidden · weightᵀ without building them (pkd.student.chunked)."""
    rows, chunk_loss = sampled_kd_rows(shift_labels, ids, logprobs, counts, weights, alpha=float(alpha), temperature=float(temperature), proposal_temperature=float(proposal_temperature), ce_weights=ce_weights)
    return KDLoss(*fused_head_loss(hidden, weight, rows, chunk_loss, scale=scale, chunk_rows=chunk_rows))
