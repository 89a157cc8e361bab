"""`--uniform-weights` gives every sample the cache's token-weighted mean weight
Σ w_b·T_b / Σ T_b (w = σ((ℓ − μ)/γ), T_b: response tokens), not 1: the loss averages over tokens,
so this keeps the KD term's average scale and changes only how w is spread."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from pkd.cache.shards import iter_samples
from pkd.store import Folder
from pkd.student.data import CacheStream, mean_weight
from synthetic import make_samples, write_cache


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    uri = str(tmp_path_factory.mktemp("cache"))
    manifest = write_cache(uri, make_samples(40, k=4, seed=7), shard_rows=16)
    return Folder(uri), manifest


def proxy_weights(folder, manifest) -> tuple[np.ndarray, np.ndarray]:
    """σ((ℓ − μ)/γ) and the response-token count of every sample, from the decoded rows
    (independent of mean_weight)."""
    rows = list(iter_samples(folder, manifest))
    ell = np.array([s.seq_logprob for s in rows])
    tokens = np.array([s.num_tokens for s in rows], dtype=np.float64)
    mu, gamma = ell.mean(), ell.std()
    return 1 / (1 + np.exp(-(ell - mu) / gamma)), tokens


def token_mean(w: np.ndarray, tokens: np.ndarray) -> float:
    return float((w * tokens).sum() / tokens.sum())


def test_every_weight_is_the_cache_mean_weight(cache):
    folder, manifest = cache
    w, tokens = proxy_weights(folder, manifest)
    assert w.std() > 0.1 and abs(w.mean() - 1) > 0.3  # the weights are spread, E[w] is far from 1
    assert abs(token_mean(w, tokens) - w.mean()) > 1e-3  # the test tells the two means apart
    batches = itertools.islice(iter(CacheStream(folder, manifest, batch_size=8, max_length=64, uniform_weights=True)), 5)  # one epoch
    got = np.concatenate([b["weights"].numpy() for b in batches])
    np.testing.assert_allclose(got, np.full(40, token_mean(w, tokens)), rtol=1e-6)
    # the proxy-weighted epoch has the same token-weighted mean weight: the KD term's scale is unchanged
    batches = list(itertools.islice(iter(CacheStream(folder, manifest, batch_size=8, max_length=1024)), 5))
    weighted = np.concatenate([b["weights"].numpy() for b in batches])
    counted = np.concatenate([(b["labels"] != -100).sum(1).numpy() for b in batches])  # response tokens per row, in batch order
    assert counted.sum() == tokens.sum()  # nothing truncated: every response token is in the epoch
    assert weighted.std() > 0.1 and token_mean(weighted, counted) == pytest.approx(got.mean(), rel=1e-5)


def test_a_manifest_without_mu_gamma_gets_them_from_the_shards(cache):
    folder, manifest = cache
    bare = manifest.model_copy(update={"seq_logprob": None})
    assert mean_weight(folder, bare) == pytest.approx(token_mean(*proxy_weights(folder, manifest)), rel=1e-9)
