"""The RS-KD loss on sampled caches: unbiased against the dense KL, exact gradients, and a
student trained from a sampled cache approaching the distribution it was drawn from."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pkd.cache.coded import SampledCodec
from pkd.student.losses import IGNORE_INDEX
from pkd.student.sampled_loss import rs_kd_chunk, sampled_kd_loss

V = 8


def _draw(rng: np.random.Generator, p: np.ndarray, rows: int, n: int, tau: float = 1.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`rows` independent positions of n draws from p^{1/τ}: distinct ids, proxy log p, counts."""
    r = p ** (1 / tau)
    r /= r.sum()
    draws = rng.choice(len(p), size=(rows, n), p=r)  # (rows, n)
    ids = np.zeros((rows, n), np.int64)
    counts = np.zeros((rows, n), np.int64)
    for i, d in enumerate(draws):
        u, c = np.unique(d, return_counts=True)
        ids[i, : len(u)], counts[i, : len(u)] = u, c
    lp = np.log(p)[ids]
    return torch.from_numpy(ids), torch.from_numpy(lp), torch.from_numpy(counts)


def _dense(p: np.ndarray, z: torch.Tensor) -> tuple[float, np.ndarray]:
    q = torch.softmax(z, -1).numpy()
    return float((p * (np.log(p) - np.log(q))).sum()), q - p  # KL(p‖q), ∂KL/∂z


@pytest.mark.parametrize("n", [1, 4, 12])
def test_kl_and_gradient_are_unbiased(n: int) -> None:
    rng = np.random.default_rng(n)
    p = rng.dirichlet(np.full(V, 0.5))
    z = torch.from_numpy(rng.normal(size=V))
    kl_dense, grad_dense = _dense(p, z)
    rows = 20_000
    ids, lp, counts = _draw(rng, p, rows, n)
    kl, grad = rs_kd_chunk(z.expand(rows, V).clone(), ids, lp, counts, torch.ones(rows, dtype=torch.float64))
    se = kl.std().item() / rows**0.5
    assert abs(kl.mean().item() - kl_dense) < 4 * se + 1e-9
    g_mean = grad.mean(0).numpy()
    g_se = np.maximum(grad.std(0).numpy(), np.sqrt(p * (1 - p) / n)) / rows**0.5  # rare ids may never be drawn
    assert (np.abs(g_mean - grad_dense) < 4 * g_se).all()


def test_tempered_proposal_is_importance_weighted() -> None:
    """Draws from p^{1/2}: weighted, the gradient still estimates q − p (bias O(1/N) only);
    unweighted it would estimate q − p^{1/2}, far off."""
    rng = np.random.default_rng(1)
    p = rng.dirichlet(np.full(V, 0.3))
    z = torch.zeros(V, dtype=torch.float64)
    kl_dense, grad_dense = _dense(p, z)
    rows, n = 4000, 64
    ids, lp, counts = _draw(rng, p, rows, n, tau=2.0)
    kl, grad = rs_kd_chunk(z.expand(rows, V).clone(), ids, lp, counts, torch.ones(rows, dtype=torch.float64), proposal_temperature=2.0)
    assert np.abs(grad.mean(0).numpy() - grad_dense).max() < 0.01
    assert abs(kl.mean().item() - kl_dense) < 0.02 * max(kl_dense, 1)
    _, naive = rs_kd_chunk(z.expand(rows, V).clone(), ids, lp, counts, torch.ones(rows, dtype=torch.float64), proposal_temperature=1.0)
    assert np.abs(naive.mean(0).numpy() - grad_dense).max() > 0.05  # the weights matter


@pytest.mark.parametrize("temperature,proposal", [(1.0, 1.0), (2.0, 1.0), (1.0, 1.5)])
def test_closed_form_gradient_matches_autograd(temperature: float, proposal: float) -> None:
    rng = np.random.default_rng(2)
    p = rng.dirichlet(np.ones(V))
    ids, lp, counts = _draw(rng, p, 6, 5, tau=proposal)
    z = torch.from_numpy(rng.normal(size=(6, V))).requires_grad_()
    coef = torch.rand(6, dtype=torch.float64)
    kl, grad = rs_kd_chunk(z.detach(), ids, lp, counts, coef, temperature=temperature, proposal_temperature=proposal)
    # the estimator written out plainly, differentiated by autograd
    c = counts.double()
    log_w = torch.where(counts > 0, c.log(), float("-inf")) + torch.where(counts > 0, lp, 0.0) * (1 / temperature - 1 / proposal)
    a = torch.softmax(log_w, -1)
    ce = -(a * torch.log_softmax(z / temperature, -1).gather(1, ids)).sum(-1) * temperature**2
    (coef * ce).sum().backward()
    torch.testing.assert_close(grad, z.grad)
    assert (kl > -1e-9).all() or temperature != 1.0  # a KL estimate at T = 1 draws from p itself


def test_loss_matches_autograd_of_nll_plus_weighted_kl() -> None:
    """The chunked loss: value and gradient of Σ nll + α·w·kl, any chunking, masked rows."""
    rng = np.random.default_rng(3)
    B, L, n = 2, 5, 4
    p = rng.dirichlet(np.ones(V))
    ids, lp, counts = (t.reshape(B, L, n) for t in _draw(rng, p, B * L, n))
    logits = torch.from_numpy(rng.normal(size=(B, L, V))).requires_grad_()
    labels = torch.from_numpy(rng.integers(0, V, size=(B, L)))
    labels[0, :2] = IGNORE_INDEX
    w = torch.tensor([0.3, 0.8], dtype=torch.float64)
    out = sampled_kd_loss(logits, labels, ids, lp, counts, w, alpha=0.7, temperature=2.0, scale=0.1, chunk_rows=3)
    out.loss.backward()
    mine = logits.grad.clone()
    logits.grad = None
    mask = labels != IGNORE_INDEX
    nll = torch.nn.functional.cross_entropy(logits[mask], labels[mask], reduction="sum")
    kl, _ = rs_kd_chunk(logits[mask].detach(), ids[mask], lp[mask], counts[mask], torch.ones(int(mask.sum()), dtype=torch.float64), temperature=2.0, need_grad=False)
    a = torch.softmax(torch.where(counts[mask] > 0, counts[mask].double().log(), float("-inf")) + lp[mask] * (1 / 2.0 - 1), -1)
    ce = -(a * torch.log_softmax(logits[mask] / 2.0, -1).gather(1, ids[mask])).sum(-1) * 4.0
    coef = 0.7 * w[:, None].expand(B, L)[mask]
    (0.1 * (nll + (coef * ce).sum())).backward()
    torch.testing.assert_close(mine, logits.grad)
    torch.testing.assert_close(out.nll, nll.detach())
    torch.testing.assert_close(out.kl, kl.sum())
    torch.testing.assert_close(out.loss, 0.1 * (nll.detach() + (coef * kl).sum()))


def test_weight_ce_weights_the_nll_of_each_sample() -> None:
    """--weight-ce on a sampled cache: value and gradient of Σ a_b·nll + α·w_b·kl."""
    rng = np.random.default_rng(4)
    B, L, n = 2, 5, 4
    p = rng.dirichlet(np.ones(V))
    ids, lp, counts = (t.reshape(B, L, n) for t in _draw(rng, p, B * L, n))
    logits = torch.from_numpy(rng.normal(size=(B, L, V))).requires_grad_()
    labels = torch.from_numpy(rng.integers(0, V, size=(B, L)))
    labels[1, 3:] = IGNORE_INDEX
    w = torch.tensor([0.3, 0.8], dtype=torch.float64)
    ce_w = w / 0.55
    out = sampled_kd_loss(logits, labels, ids, lp, counts, w, alpha=0.7, chunk_rows=3, ce_weights=ce_w)
    out.loss.backward()
    mine = logits.grad.clone()
    logits.grad = None
    mask = labels != IGNORE_INDEX
    nll_rows = torch.nn.functional.cross_entropy(logits[mask], labels[mask], reduction="none")
    a = ce_w[:, None].expand(B, L)[mask]
    kl, _ = rs_kd_chunk(logits[mask].detach(), ids[mask], lp[mask], counts[mask], torch.ones(int(mask.sum()), dtype=torch.float64), need_grad=False)
    share = torch.softmax(torch.where(counts[mask] > 0, counts[mask].double().log(), float("-inf")), -1)
    cross = -(share * torch.log_softmax(logits[mask], -1).gather(1, ids[mask])).sum(-1)
    coef = 0.7 * w[:, None].expand(B, L)[mask]
    ((a * nll_rows).sum() + (coef * cross).sum()).backward()
    torch.testing.assert_close(mine, logits.grad)
    torch.testing.assert_close(out.loss, (a * nll_rows).sum().detach() + (coef * kl).sum())


def test_student_trained_from_a_sampled_cache_approaches_the_distribution() -> None:
    """Free student logits per context, trained on RS-KD alone (α·KL, no NLL signal beyond it)
    from a cache written and read back by the sampled codec, end up near the proxy's p."""
    rng = np.random.default_rng(4)
    contexts, positions, n, vocab = 3, 400, 12, 32
    p = rng.dirichlet(np.full(vocab, 0.4), size=contexts)  # (C, V) the proxy at each context
    ids = np.zeros((contexts * positions, n), np.int32)
    counts = np.zeros_like(ids, dtype=np.uint8)
    for c in range(contexts):
        for t in range(positions):
            u, k = np.unique(rng.choice(vocab, size=n, p=p[c]), return_counts=True)
            ids[c * positions + t, : len(u)], counts[c * positions + t, : len(u)] = u, k
    ctx = np.repeat(np.arange(contexts), positions)
    lp = np.where(counts > 0, np.log(p[ctx[:, None], ids]), 0.0).astype(np.float32)
    codec = SampledCodec(k=n, vocab_size=vocab)
    lengths = np.full(contexts, positions)
    columns, side = codec.encode_rows(ids, lp, counts, lengths)
    d_ids, d_lp, d_counts = (torch.from_numpy(a.astype(np.int64 if a.dtype != np.float32 else np.float32)) for a in codec.decode_rows(columns, lengths, side))

    z = torch.zeros(contexts, vocab, requires_grad=True)
    opt = torch.optim.Adam([z], lr=0.05)
    labels = torch.full((1, contexts * positions), IGNORE_INDEX)
    labels[0] = 0  # every position is a response row; α dominates (the NLL target is one fixed id)
    for _ in range(300):
        opt.zero_grad()
        logits = z[torch.from_numpy(ctx)][None]  # (1, C·T, V)
        out = sampled_kd_loss(logits, labels, d_ids[None], d_lp[None], d_counts[None], torch.ones(1), alpha=50.0, scale=1.0 / (contexts * positions))
        out.loss.backward()
        opt.step()
    q = torch.softmax(z.detach().double(), -1).numpy()
    kl = (p * (np.log(p) - np.log(q))).sum(-1)  # (C,)
    kl_uniform = (p * (np.log(p) + np.log(vocab))).sum(-1)
    assert (kl < 0.05).all() and (kl < kl_uniform / 10).all(), (kl, kl_uniform)


@pytest.mark.parametrize(("temperature", "proposal_temperature"), [(1.0, 1.0), (2.0, 2.0), (1.0, 1.5)])
@pytest.mark.parametrize("chunk_rows", [None, 4])
def test_fused_sampled_loss_equals_the_loss_on_the_logits(temperature, proposal_temperature, chunk_rows):
    """The RS-KD loss from hidden states and W (no (B, L, V) logits) against the same loss on the
    logits it would have built: values and the gradients of both, fp32, 1e-5 relative."""
    from pkd.student.losses import IGNORE_INDEX
    from pkd.student.sampled_loss import fused_sampled_kd_loss, sampled_kd_loss

    g = torch.Generator().manual_seed(3)
    B, L, d, V, N = 3, 9, 16, 300, 12
    hidden = torch.randn(B, L, d, generator=g)
    weight = torch.randn(V, d, generator=g) / d**0.5
    labels = torch.randint(0, V, (B, L), generator=g)
    labels[0, :3] = IGNORE_INDEX
    proxy = torch.log_softmax(torch.randn(B * L, V, generator=g) * 2, -1)  # (B·L, V)
    draws = torch.multinomial(proxy.exp(), N, replacement=True, generator=g)  # (B·L, N)
    ids, counts = torch.zeros_like(draws), torch.zeros_like(draws)
    for r in range(B * L):  # distinct ids first, their counts, zero-count padding after
        u, c = draws[r].unique(return_counts=True)
        ids[r, : len(u)], counts[r, : len(u)] = u, c
    lps = proxy.gather(1, ids)
    ids, lps, counts = (x.reshape(B, L, N) for x in (ids, lps, counts))
    w = torch.rand(B, generator=g)
    kw = dict(alpha=0.7, temperature=temperature, proposal_temperature=proposal_temperature, scale=1 / 20, chunk_rows=chunk_rows)
    h1, w1 = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    fused = fused_sampled_kd_loss(h1, w1, labels, ids, lps, counts, w, **kw)
    fused.loss.backward()
    h2, w2 = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    ref = sampled_kd_loss(h2 @ w2.T, labels, ids, lps, counts, w, **kw)
    ref.loss.backward()
    for a, b in ((fused.loss, ref.loss), (fused.nll, ref.nll), (fused.kl, ref.kl)):
        assert a.item() == pytest.approx(b.item(), rel=1e-5, abs=1e-7)
    assert float(ref.kl) > 0
    torch.testing.assert_close(h1.grad, h2.grad, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(w1.grad, w2.grad, rtol=1e-5, atol=1e-7)


def test_the_gradient_is_unbiased_at_t_equal_tau_and_biased_otherwise() -> None:
    """bench/rs_kd_bias.py's Monte Carlo, smaller: at T = τ = 2 the error is noise, at T = 1 with
    draws at τ = 2 it is far outside it (why train-student refuses T ≠ τ)."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("rs_kd_bias", Path(__file__).resolve().parent.parent / "bench" / "rs_kd_bias.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    gen = torch.Generator().manual_seed(0)
    p_logits, z = 2.0 * torch.randn(50, generator=gen, dtype=torch.float64), torch.randn(50, generator=gen, dtype=torch.float64)
    same, se = bench.relative_bias(p_logits, z, 2.0, 2.0, 12, 40_000, seed=1)
    assert abs(same) < 4 * se
    other, se = bench.relative_bias(p_logits, z, 1.0, 2.0, 12, 40_000, seed=1)
    assert other < -0.04 and abs(other) > 20 * se
