"""The fused output layer + loss (no (B, L, V) tensor) against the unfused loss on the logits it
would have built: values and gradients of hidden states and output weight."""

from __future__ import annotations

import pytest
import torch

from pkd.student.losses import IGNORE_INDEX, fused_proxy_kd_loss, proxy_kd_loss


def make_case(B=3, L=9, d=16, V=300, k=7, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, L, d, generator=g).to(dtype)
    weight = (torch.randn(V, d, generator=g) / d**0.5).to(dtype)
    labels = torch.randint(0, V, (B, L), generator=g)
    labels[0, :3] = IGNORE_INDEX
    labels[-1, -2:] = IGNORE_INDEX  # right padding
    lp, ids = torch.log_softmax(torch.randn(B, L, V, generator=g) * 3, -1).topk(k, dim=-1)  # (B, L, k)
    w = torch.rand(B, generator=g)
    return hidden, weight, labels, ids, lp, w


def both(hidden, weight, labels, ids, lp, w, **kw):
    """(fused result, its grads), (unfused result on hidden · Wᵀ, its grads)."""
    h1, w1 = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    fused = fused_proxy_kd_loss(h1, w1, labels, ids, lp, w, **kw)
    fused.loss.backward()
    h2, w2 = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    ref = proxy_kd_loss(h2 @ w2.T, labels, ids, lp, w, **kw)
    ref.loss.backward()
    return (fused, h1.grad, w1.grad), (ref, h2.grad, w2.grad)


@pytest.mark.parametrize("tail", ["tail", "renorm"])
@pytest.mark.parametrize("alpha", [0.0, 0.8])
@pytest.mark.parametrize("chunk_rows", [None, 4])
def test_fused_equals_unfused_in_fp32(tail, alpha, chunk_rows):
    (f, fh, fw), (r, rh, rw) = both(*make_case(), alpha=alpha, tail=tail, temperature=1.5 if tail == "renorm" else 1.0, scale=1 / 20, chunk_rows=chunk_rows)
    for a, b in ((f.loss, r.loss), (f.nll, r.nll), (f.kl, r.kl)):
        assert a.item() == pytest.approx(b.item(), rel=1e-5, abs=1e-7)
    assert int(f.tokens) == int(r.tokens)
    torch.testing.assert_close(fh, rh, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(fw, rw, rtol=1e-5, atol=1e-7)


def test_tied_embedding_gets_both_gradients():
    """One parameter used as input embedding and output layer: its gradient is the sum of both
    uses, as with the unfused loss."""
    hidden, weight, labels, ids, lp, w = make_case()
    tokens = torch.randint(0, weight.shape[0], hidden.shape[:2])
    grads = []
    for fused in (True, False):
        emb = weight.clone().requires_grad_(True)  # (V, d) tied
        h = emb[tokens] * hidden  # (B, L, d): depends on the embedding too
        out = fused_proxy_kd_loss(h, emb, labels, ids, lp, w) if fused else proxy_kd_loss(h @ emb.T, labels, ids, lp, w)
        out.loss.backward()
        grads.append(emb.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-7)


def test_frozen_output_layer_gets_no_gradient_work():
    hidden, weight, labels, ids, lp, w = make_case()
    h = hidden.clone().requires_grad_(True)
    fused_proxy_kd_loss(h, weight, labels, ids, lp, w).loss.backward()
    h2 = hidden.clone().requires_grad_(True)
    proxy_kd_loss(h2 @ weight.T, labels, ids, lp, w).loss.backward()
    torch.testing.assert_close(h.grad, h2.grad, rtol=1e-5, atol=1e-7)


def test_bf16_autocast_stays_close_to_fp32():
    hidden, weight, labels, ids, lp, w = make_case()
    h, W = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = fused_proxy_kd_loss(h, W, labels, ids, lp, w, scale=1 / 20)
    out.loss.backward()
    assert W.grad.dtype == torch.float32 and h.grad.dtype == torch.float32
    (ref, rh, rw), _ = both(hidden, weight, labels, ids, lp, w, scale=1 / 20)
    assert out.loss.item() == pytest.approx(ref.loss.item(), rel=2e-2)
    torch.testing.assert_close(h.grad, rh, rtol=5e-2, atol=5e-3)
    torch.testing.assert_close(W.grad, rw, rtol=5e-2, atol=5e-3)


def test_bf16_weights_and_hidden():
    hidden, weight, labels, ids, lp, w = make_case()
    h, W = hidden.bfloat16().requires_grad_(True), weight.bfloat16().requires_grad_(True)
    out = fused_proxy_kd_loss(h, W, labels, ids, lp, w, scale=1 / 20)
    out.loss.backward()
    assert h.grad.dtype == W.grad.dtype == torch.bfloat16
    (ref, rh, rw), _ = both(h.detach().float(), W.detach().float(), labels, ids, lp, w, scale=1 / 20)
    assert out.loss.item() == pytest.approx(ref.loss.item(), rel=1e-2)
    torch.testing.assert_close(h.grad.float(), rh, rtol=5e-2, atol=5e-3)
    torch.testing.assert_close(W.grad.float(), rw, rtol=5e-2, atol=5e-3)


def test_float64_gradcheck():
    hidden, weight, labels, ids, lp, w = make_case(B=2, L=3, d=4, V=11, k=3, dtype=torch.float64)
    fn = lambda h, W: fused_proxy_kd_loss(h, W, labels, ids, lp.double(), w.double(), alpha=0.8, chunk_rows=2).loss  # noqa: E731
    assert torch.autograd.gradcheck(fn, (hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)), eps=1e-6, atol=1e-6)
