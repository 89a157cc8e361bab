"""`--uniform-weights` gives every sample the cache's mean weight E[σ((ℓ − μ)/γ)], not 1: the
ablation changes only how w is spread and keeps α·E[w]."""

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


def proxy_weights(folder, manifest) -> np.ndarray:
    """σ((ℓ − μ)/γ) of every sample, from the decoded rows (independent of mean_weight)."""
    ell = np.array([s.seq_logprob for s in iter_samples(folder, manifest)])
    mu, gamma = ell.mean(), ell.std()
    return 1 / (1 + np.exp(-(ell - mu) / gamma))


def test_every_weight_is_the_cache_mean_weight(cache):
    folder, manifest = cache
    w = proxy_weights(folder, manifest)
    assert w.std() > 0.1 and abs(w.mean() - 1) > 0.3  # the weights are spread, E[w] is far from 1
    batches = itertools.islice(iter(CacheStream(folder, manifest, batch_size=8, max_length=64, uniform_weights=True)), 5)  # one epoch
    got = np.concatenate([b["weights"].numpy() for b in batches])
    np.testing.assert_allclose(got, np.full(40, w.mean()), rtol=1e-6)
    # the proxy-weighted epoch has the same mean weight: α·E[w] is unchanged
    batches = itertools.islice(iter(CacheStream(folder, manifest, batch_size=8, max_length=64)), 5)
    weighted = np.concatenate([b["weights"].numpy() for b in batches])
    assert weighted.std() > 0.1 and weighted.mean() == pytest.approx(got.mean(), rel=1e-5)


def test_a_manifest_without_mu_gamma_gets_them_from_the_shards(cache):
    folder, manifest = cache
    bare = manifest.model_copy(update={"seq_logprob": None})
    assert mean_weight(folder, bare) == pytest.approx(proxy_weights(folder, manifest).mean(), rel=1e-9)
