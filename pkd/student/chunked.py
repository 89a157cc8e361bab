"""Chunked output-layer losses whose gradient is computed during the forward, in closed form.

A `ChunkLoss` maps one chunk of logit rows to per-row losses and their gradient with respect to
those logits; `pkd.student.losses` builds one for the Proxy-KD divergence, and any other
divergence with a closed-form gradient plugs in the same way. Two drivers run it over the rows
that carry a target (response positions), a few rows at a time:

- `chunked_logits_loss`: the model built the (B, L, V) logits. Each chunk's gradient is written
  into one buffer of the logits' dtype (the gradient plain SFT allocates anyway); autograd keeps
  no per-chunk intermediates.
- `fused_head_loss`: the logits are never built. From the last hidden states h (B, L, d) and the
  output-embedding weight W (V, d), each chunk makes z = h_c · Wᵀ (n, V), takes its loss and
  ∂/∂z, and accumulates ∂h_c = ∂z · W and ∂W += ∂zᵀ · h_c. No (B, L, V) tensor, value or
  gradient, ever exists: the extra memory is a few (n, V) chunk temporaries plus ∂W (V, d), the
  size of W. W may be tied to the input embedding (autograd adds both gradients).

Both store their gradients already multiplied by `scale` (pass the loss normaliser there), so
backward hands them back without another copy when training calls it with grad = 1.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

CHUNK_ELEMENTS = 1 << 24  # rows per chunk = this // V: ~64 MiB per float32 (n, V) temporary

# (z (n, V) compute dtype, the chunk's own copy: may be overwritten; r (n,) flat row indices;
#  need_grad) -> nll (n,), kl (n,), loss (n,) the rows' contribution, ∂loss/∂z (n, V) or None
ChunkLoss = Callable[[torch.Tensor, torch.Tensor, bool], tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]]


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Losses and softmaxes run in float32 (float64 stays float64, for gradient checks)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _rows_per_chunk(V: int, chunk_rows: int | None) -> int:
    return chunk_rows or max(1, CHUNK_ELEMENTS // V)


class _ChunkedLogits(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, rows, chunk_loss, scale, chunk_rows):  # type: ignore[override]
        B, L, V = logits.shape
        flat = logits.reshape(B * L, V)  # (N, V) view
        cdtype = compute_dtype(logits.dtype)
        need_grad = ctx.needs_input_grad[0]
        grad_flat = torch.zeros_like(flat) if need_grad else None  # (N, V) logits dtype
        sums = torch.zeros(3, dtype=cdtype, device=logits.device)  # Σ loss, Σ nll, Σ kl
        step = _rows_per_chunk(V, chunk_rows)
        with torch.autocast(logits.device.type, enabled=False):
            for start in range(0, rows.numel(), step):
                r = rows[start : start + step]  # (n,)
                nll, kl, loss, grad = chunk_loss(flat.index_select(0, r).to(cdtype), r, need_grad)
                sums += torch.stack([loss.sum(), nll.sum(), kl.sum()])
                if grad is not None:
                    grad_flat.index_copy_(0, r, grad.mul_(scale).to(flat.dtype))
        ctx.save_for_backward(grad_flat)
        ctx.logits_shape = logits.shape
        return _outputs(ctx, sums, scale, rows)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss, *_):  # type: ignore[override]
        (grad_flat,) = ctx.saved_tensors  # (N, V), already scaled
        return _times(grad_flat, grad_loss).view(ctx.logits_shape), None, None, None, None


class _FusedHead(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, rows, chunk_loss, scale, chunk_rows):  # type: ignore[override]
        B, L, d = hidden.shape
        V = weight.shape[0]
        device = hidden.device.type
        # the matmuls run where the model's own output layer would: in the autocast dtype if on
        mm_dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype
        cdtype = compute_dtype(mm_dtype)
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        flat = hidden.reshape(B * L, d)  # (N, d)
        w = weight.detach().to(mm_dtype)  # (V, d), a copy only if the dtypes differ
        grad_h = torch.zeros_like(flat) if need_h else None  # (N, d) hidden dtype
        grad_w = torch.zeros(V, d, dtype=compute_dtype(weight.dtype), device=weight.device) if need_w else None  # (V, d)
        sums = torch.zeros(3, dtype=cdtype, device=hidden.device)  # Σ loss, Σ nll, Σ kl
        step = _rows_per_chunk(V, chunk_rows)
        with torch.autocast(device, enabled=False):
            for start in range(0, rows.numel(), step):
                r = rows[start : start + step]  # (n,)
                h = flat.detach().index_select(0, r).to(mm_dtype)  # (n, d)
                z = (h @ w.T).to(cdtype)  # (n, V)
                nll, kl, loss, grad = chunk_loss(z, r, need_h or need_w)
                del z
                sums += torch.stack([loss.sum(), nll.sum(), kl.sum()])
                if grad is None:
                    continue
                grad.mul_(scale)  # (n, V) ∂(scale · loss)/∂z
                if need_h:
                    grad_h.index_copy_(0, r, (grad.to(mm_dtype) @ w).to(flat.dtype))
                if need_w:  # accumulated in float32 even for bf16 weights
                    grad_w.addmm_(grad.T.to(grad_w.dtype), h.to(grad_w.dtype))
        ctx.save_for_backward(grad_h, grad_w)
        ctx.shapes = hidden.shape, weight.dtype
        return _outputs(ctx, sums, scale, rows)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss, *_):  # type: ignore[override]
        grad_h, grad_w = ctx.saved_tensors  # already scaled
        hidden_shape, weight_dtype = ctx.shapes
        gh = None if grad_h is None else _times(grad_h, grad_loss).view(hidden_shape)
        gw = None if grad_w is None else _times(grad_w, grad_loss).to(weight_dtype)
        return gh, gw, None, None, None, None


def _outputs(ctx, sums: torch.Tensor, scale: float, rows: torch.Tensor):  # noqa: ANN001
    """(scale · Σ loss, Σ nll, Σ kl, row count); only the first carries a gradient."""
    loss, nll, kl = sums.unbind()
    tokens = torch.tensor(rows.numel(), device=rows.device)
    ctx.mark_non_differentiable(nll, kl, tokens)
    return scale * loss, nll, kl, tokens


def _times(grad: torch.Tensor, grad_loss: torch.Tensor) -> torch.Tensor:
    return grad if bool(grad_loss == 1) else grad * grad_loss.to(grad.dtype)


def chunked_logits_loss(logits: torch.Tensor, rows: torch.Tensor, chunk_loss: ChunkLoss, *, scale: float = 1.0, chunk_rows: int | None = None):
    """`chunk_loss` summed over `rows` (M,) of the flattened (B, L, V) `logits`, times `scale`.
    Returns (loss, Σ nll, Σ kl, row count)."""
    return _ChunkedLogits.apply(logits, rows, chunk_loss, float(scale), chunk_rows)


def fused_head_loss(hidden: torch.Tensor, weight: torch.Tensor, rows: torch.Tensor, chunk_loss: ChunkLoss, *, scale: float = 1.0, chunk_rows: int | None = None):
    """As `chunked_logits_loss` for logits = hidden (B, L, d) · weightᵀ (V, d), without building
    them. Returns (loss, Σ nll, Σ kl, row count)."""
    return _FusedHead.apply(hidden, weight, rows, chunk_loss, float(scale), chunk_rows)
