"""The chunked Proxy-KD loss against a dense full-vocabulary reference, hand-computed cases and a
float64 gradient check."""

from __future__ import annotations

import math

import pytest
import torch

from pkd.student.losses import IGNORE_INDEX, proxy_kd_loss, sample_weights


def dense_reference(logits, shift_labels, proxy_logp, weights, k, *, alpha, tail, tau, ce_weights=None):
    """Plain autograd over the full vocabulary: the proxy's full distribution truncated to its
    top-k (+ rest bucket: tail) and the student's full softmax aggregated into the same buckets;
    or (renorm) the proxy's top-k renormalised against the student's tempered full softmax at
    those ids. `ce_weights` (B,) weights each sample's NLL (--weight-ce)."""
    B, L, V = logits.shape
    logq = torch.log_softmax(logits.double(), -1)  # (B, L, V)
    logq_t = torch.log_softmax(logits.double() / tau, -1)  # (B, L, V)
    total = logits.new_zeros((), dtype=torch.float64)
    for b in range(B):
        for t in range(L):
            y = int(shift_labels[b, t])
            if y == IGNORE_INDEX:
                continue
            lp, ids = proxy_logp[b, t].double().topk(k)  # (k,)
            qs = logq[b, t, ids]  # (k,)
            if tail == "tail" and k < V:
                rest = torch.ones(V, dtype=torch.bool)
                rest[ids] = False
                a = torch.cat([lp, torch.log1p(-lp.exp().sum()).reshape(1)])
                bq = torch.cat([qs, torch.logsumexp(logq[b, t, rest], 0).reshape(1)])
                log_p, log_s = torch.log_softmax(a / tau, 0), torch.log_softmax(bq / tau, 0)
            elif tail == "tail":  # the top-k is the whole vocabulary: no rest bucket
                log_p, log_s = torch.log_softmax(lp / tau, 0), torch.log_softmax(qs / tau, 0)
            else:
                log_p, log_s = torch.log_softmax(lp / tau, 0), logq_t[b, t, ids]
            kl = tau * tau * (log_p.exp() * (log_p - log_s)).sum()
            ce = 1.0 if ce_weights is None else ce_weights[b]
            total = total + ce * (-logq[b, t, y]) + alpha * weights[b] * kl
    return total


def make_case(B=2, L=7, V=40, k=5, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(B, L, V, generator=g) * 2).to(dtype)
    proxy_logp = torch.log_softmax(torch.randn(B, L, V, generator=g) * 3, -1)  # (B, L, V)
    labels = torch.randint(0, V, (B, L), generator=g)
    labels[0, :2] = IGNORE_INDEX  # prompt positions
    labels[1, -3:] = IGNORE_INDEX  # right padding
    lp, ids = proxy_logp.topk(k, dim=-1)  # (B, L, k) rank order
    weights = torch.rand(B, generator=g, dtype=torch.float64)
    return logits, labels, ids, lp.float(), weights, proxy_logp


@pytest.mark.parametrize("tail", ["tail", "renorm"])
@pytest.mark.parametrize("tau", [1.0, 2.0])
@pytest.mark.parametrize("chunk_rows", [None, 3])
def test_matches_dense_reference_value_and_gradient(tail, tau, chunk_rows):
    logits, labels, ids, lp, w, proxy_logp = make_case()
    x = logits.clone().requires_grad_(True)
    out = proxy_kd_loss(x, labels, ids, lp, w, alpha=0.7, tail=tail, temperature=tau, chunk_rows=chunk_rows)
    out.loss.backward()
    ref_x = logits.clone().requires_grad_(True)
    # the reference truncates the float32-rounded proxy logprobs, as the cache stores them
    ref = dense_reference(ref_x, labels, proxy_logp.float(), w, ids.shape[-1], alpha=0.7, tail=tail, tau=tau)
    ref.backward()
    assert out.loss.item() == pytest.approx(ref.item(), rel=1e-6)
    torch.testing.assert_close(x.grad, ref_x.grad, rtol=1e-6, atol=1e-9)
    assert int(out.tokens) == int((labels != IGNORE_INDEX).sum())


def test_hand_computed_small_cases():
    z = torch.zeros(1, 1, 3, dtype=torch.float64, requires_grad=True)  # q = (1/3, 1/3, 1/3)
    y = torch.tensor([[1]])
    w = torch.ones(1, dtype=torch.float64)
    # tail: proxy top-1 = id 0 with p 0.5 -> P = (.5, .5), Q = (1/3, 2/3)
    out = proxy_kd_loss(z, y, torch.tensor([[[0]]]), torch.tensor([[[math.log(0.5)]]]), w, alpha=1.0)
    kl = 0.5 * math.log(0.5 / (1 / 3)) + 0.5 * math.log(0.5 / (2 / 3))
    assert out.nll.item() == pytest.approx(math.log(3))
    assert out.kl.item() == pytest.approx(kl)
    assert out.loss.item() == pytest.approx(math.log(3) + kl)
    out.loss.backward()
    # nll: q - onehot(1) = (1/3, -2/3, 1/3); kl: g = (-1/6, 1/6) -> (-1/6, 1/12, 1/12)
    expected = torch.tensor([1 / 3 - 1 / 6, -2 / 3 + 1 / 12, 1 / 3 + 1 / 12], dtype=torch.float64)
    torch.testing.assert_close(z.grad.view(-1), expected)
    # renorm: top-2 = (0, 1) with p (.5, .25) -> P = (2/3, 1/3) against the full q = (1/3, 1/3)
    out = proxy_kd_loss(z.detach(), y, torch.tensor([[[0, 1]]]), torch.log(torch.tensor([[[0.5, 0.25]]])), w, tail="renorm")
    assert out.kl.item() == pytest.approx(2 / 3 * math.log(2))


def test_renorm_sees_student_mass_outside_the_topk():
    """A student with the proxy's shape on the top-5 but half its mass elsewhere is log 2 away,
    not 0 (renormalising the student side would call it a perfect match), and gets a gradient
    that pulls the top-5 up."""
    V, k = 50, 5
    p_top = torch.tensor([0.4, 0.25, 0.15, 0.12, 0.08], dtype=torch.float64)  # proxy's top-5, Σ = 1
    q = torch.full((V,), 0.5 / (V - k), dtype=torch.float64)
    q[:k] = 0.5 * p_top  # same shape on the top-5, half the mass
    z = q.log().view(1, 1, V).clone().requires_grad_(True)
    ids = torch.arange(k).view(1, 1, k)
    lp = (0.9 * p_top).log().float().view(1, 1, k)  # the proxy's own top-5 hold 90%
    out = proxy_kd_loss(z, torch.tensor([[0]]), ids, lp, torch.ones(1, dtype=torch.float64), tail="renorm")
    assert out.kl.item() == pytest.approx(math.log(2), rel=1e-6)
    out.loss.backward()
    kl_grad = z.grad[0, 0] - (q - torch.nn.functional.one_hot(torch.tensor(0), V))  # minus the NLL's q − 1[y]
    torch.testing.assert_close(kl_grad, q - torch.cat([p_top, torch.zeros(V - k, dtype=torch.float64)]))
    assert (kl_grad[:k] < 0).all() and (kl_grad[k:] > 0).all()  # top-5 pulled up, the rest pushed down


@pytest.mark.parametrize("tail", ["tail", "renorm"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_topk_covering_the_whole_vocabulary_stays_finite(tail, dtype):
    """k = V: the tail bucket is empty on both sides; values and gradients stay finite and match
    the dense reference (float32 rounding of Σ p must not leave the proxy mass in an empty bucket)."""
    logits, labels, ids, lp, w, proxy_logp = make_case(V=12, k=12, dtype=dtype)
    x = logits.clone().requires_grad_(True)
    out = proxy_kd_loss(x, labels, ids, lp, w, alpha=0.7, tail=tail, chunk_rows=4)
    out.loss.backward()
    assert torch.isfinite(out.loss) and torch.isfinite(out.kl) and torch.isfinite(x.grad).all()
    ref_x = logits.double().clone().requires_grad_(True)
    ref = dense_reference(ref_x, labels, proxy_logp.float(), w, 12, alpha=0.7, tail=tail, tau=1.0)
    ref.backward()
    assert out.loss.item() == pytest.approx(ref.item(), rel=1e-5)
    torch.testing.assert_close(x.grad.double(), ref_x.grad, rtol=1e-4, atol=1e-6)


def test_alpha_zero_is_cross_entropy():
    logits, labels, ids, lp, w, _ = make_case(dtype=torch.float32)
    x = logits.clone().requires_grad_(True)
    out = proxy_kd_loss(x, labels, ids, lp, w, alpha=0.0)
    (out.loss / out.tokens).backward()
    y = logits.clone().requires_grad_(True)
    ref = torch.nn.functional.cross_entropy(y.view(-1, y.shape[-1]), labels.view(-1), ignore_index=IGNORE_INDEX)
    ref.backward()
    assert out.loss.item() / int(out.tokens) == pytest.approx(ref.item(), rel=1e-5)
    assert out.kl.item() == 0.0
    torch.testing.assert_close(x.grad, y.grad, rtol=1e-4, atol=1e-7)


def test_bf16_logits_keep_their_dtype_and_stay_close():
    logits, labels, ids, lp, w, _ = make_case(dtype=torch.float32)
    x16 = logits.to(torch.bfloat16).requires_grad_(True)
    out16 = proxy_kd_loss(x16, labels, ids, lp, w, chunk_rows=4)
    out16.loss.backward()
    assert x16.grad.dtype == torch.bfloat16
    x32 = logits.to(torch.bfloat16).float().requires_grad_(True)
    out32 = proxy_kd_loss(x32, labels, ids, lp, w)
    out32.loss.backward()
    assert out16.loss.float().item() == pytest.approx(out32.loss.item(), rel=1e-2)
    torch.testing.assert_close(x16.grad.float(), x32.grad, rtol=2e-2, atol=2e-3)


@pytest.mark.parametrize("tail", ["tail", "renorm"])
def test_gradcheck_float64(tail):
    logits, labels, ids, lp, w, _ = make_case(B=2, L=3, V=9, k=3, seed=1)
    fn = lambda x: proxy_kd_loss(x, labels, ids, lp.double(), w, alpha=0.8, tail=tail, temperature=1.5, chunk_rows=2).loss  # noqa: E731
    assert torch.autograd.gradcheck(fn, (logits.clone().requires_grad_(True),), eps=1e-6, atol=1e-6)


def test_sample_weights():
    ell = torch.tensor([-2.0, -1.0, 0.0])
    torch.testing.assert_close(sample_weights(ell, -1.0, 1.0), torch.sigmoid(torch.tensor([-1.0, 0.0, 1.0])))
    torch.testing.assert_close(sample_weights(ell, -1.0, 0.0), torch.full((3,), 0.5))


@pytest.mark.parametrize("tail", ["tail", "renorm"])
@pytest.mark.parametrize(("alpha", "tau"), [(0.7, 1.0), (0.7, 2.0), (0.0, 1.0)])
def test_weight_ce_matches_dense_reference_value_and_gradient(tail, alpha, tau):
    """--weight-ce: Σ a_b·NLL + α·w_b·τ²·KL with a_b = w_b / w̄, value and gradient, and the fused
    path (no logits) equal to it."""
    from pkd.student.losses import fused_proxy_kd_loss

    logits, labels, ids, lp, w, proxy_logp = make_case(seed=4)
    ce = w / 0.37
    x = logits.clone().requires_grad_(True)
    out = proxy_kd_loss(x, labels, ids, lp, w, alpha=alpha, tail=tail, temperature=tau, chunk_rows=3, ce_weights=ce)
    out.loss.backward()
    ref_x = logits.clone().requires_grad_(True)
    ref = dense_reference(ref_x, labels, proxy_logp.float(), w, ids.shape[-1], alpha=alpha, tail=tail, tau=tau, ce_weights=ce)
    ref.backward()
    assert out.loss.item() == pytest.approx(ref.item(), rel=1e-6)
    torch.testing.assert_close(x.grad, ref_x.grad, rtol=1e-6, atol=1e-9)
    plain = proxy_kd_loss(logits, labels, ids, lp, w, alpha=alpha, tail=tail, temperature=tau)
    assert out.nll.item() == pytest.approx(plain.nll.item())  # the logged CE stays unweighted
    assert out.loss.item() != pytest.approx(plain.loss.item())  # and the weighting did change the loss

    g = torch.Generator().manual_seed(5)
    B, L, d = logits.shape[0], logits.shape[1], 8
    hidden = torch.randn(B, L, d, generator=g, dtype=torch.float64)
    head = torch.randn(logits.shape[2], d, generator=g, dtype=torch.float64)
    h1, w1 = hidden.clone().requires_grad_(True), head.clone().requires_grad_(True)
    fused = fused_proxy_kd_loss(h1, w1, labels, ids, lp, w, alpha=alpha, tail=tail, temperature=tau, chunk_rows=3, ce_weights=ce)
    fused.loss.backward()
    h2, w2 = hidden.clone().requires_grad_(True), head.clone().requires_grad_(True)
    dense = dense_reference(h2 @ w2.T, labels, proxy_logp.float(), w, ids.shape[-1], alpha=alpha, tail=tail, tau=tau, ce_weights=ce)
    dense.backward()
    assert fused.loss.item() == pytest.approx(dense.item(), rel=1e-6)
    torch.testing.assert_close(h1.grad, h2.grad, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(w1.grad, w2.grad, rtol=1e-6, atol=1e-9)
