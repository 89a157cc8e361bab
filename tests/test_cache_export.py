"""`pkd cache export`: a cache as plain Parquet that `datasets` loads alone (no pkd decoder),
equal to pkd's own decoding and to the scored values within the codec's quantisation; the
axolotl layout; resuming; refusals."""

from __future__ import annotations

import numpy as np
import pytest
from typer.testing import CliRunner

from pkd.cache.codec import topk_tail_kl
from pkd.cache.coded import TopkAnsCodec
from pkd.cache.export import export_cache
from pkd.cache.ops import read_cache_manifest
from pkd.cache.shards import LogitCacheWriter, iter_samples
from pkd.cli import app
from pkd.errors import ConfigError
from pkd.store import Folder
from synthetic import header, make_samples

VOCAB, K = 32_000, 20


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> tuple[str, list]:
    """A cache as cache-logits writes it (ANS top-k codec, 3 shards) over a 32k vocabulary."""
    uri = str(tmp_path_factory.mktemp("cache"))
    samples = make_samples(40, k=K, vocab=VOCAB, seed=3)
    manifest = header(k=K, vocab=VOCAB).model_copy(update={"codec": TopkAnsCodec(k=K, vocab_size=VOCAB).spec()})
    writer = LogitCacheWriter(Folder(uri), manifest, shard_rows=16)
    for s in samples:
        writer.add(s)
    writer.close()
    return uri, samples


def _load(out) -> list[dict]:
    import datasets  # the only reader: no pkd code below

    return list(datasets.load_dataset(str(out), split="train"))


def test_plain_export_loads_with_datasets_and_matches_the_cache(cache, tmp_path):
    uri, original = cache
    out = tmp_path / "plain"
    result = CliRunner().invoke(app, ["cache", "export", uri, str(out), "--format", "plain"], terminal_width=200)
    assert result.exit_code == 0, result.output
    assert "exported" in result.output and "bytes against the cache's" in result.output
    rows = {r["sample_id"]: r for r in _load(out)}
    manifest = read_cache_manifest(Folder(uri))
    decoded = list(iter_samples(Folder(uri), manifest))
    assert len(rows) == len(decoded) == len(original) == manifest.rows
    by_id, kl = {s.sample_id: s for s in original}, []
    for s in decoded:
        r = rows[s.sample_id]
        assert r["input_ids"] == s.input_ids.tolist() and r["response_start"] == s.response_start
        np.testing.assert_array_equal(np.array(r["topk_ids"]), s.topk_ids)  # what pkd decodes, exactly
        np.testing.assert_array_equal(np.array(r["topk_logprobs"], np.float32), s.topk_logprobs)
        np.testing.assert_array_equal(np.array(r["token_logprob"], np.float32), s.token_logprob)
        scored = by_id[s.sample_id]  # and the proxy's values, to the codec's quantisation
        np.testing.assert_array_equal(np.array(r["topk_ids"]), scored.topk_ids)
        np.testing.assert_allclose(np.array(r["topk_logprobs"]), scored.topk_logprobs, atol=TopkAnsCodec.lp_step_max)
        kl.append(topk_tail_kl(scored.topk_logprobs, np.array(r["topk_logprobs"])))
        assert 0 < r["weight"] < 1
    kl = np.concatenate(kl)  # nats per token, over the k entries and the tail
    assert kl.mean() < 2e-4 and kl.max() < 5e-3, (kl.mean(), kl.max())
    card = (out / "README.md").read_text()
    assert "data/*.parquet" in card and "teacher-test" in card and "`topk_logprobs`" in card


def test_axolotl_export_has_the_kd_plugins_columns(cache, tmp_path):
    uri, _ = cache
    s = export_cache(Folder(uri), Folder(str(tmp_path / "ax")), "axolotl")
    assert s.rows == 40 and s.shards == s.written == 3
    decoded = {tuple(d.input_ids.tolist()): d for d in iter_samples(Folder(uri), read_cache_manifest(Folder(uri)))}
    for r in _load(tmp_path / "ax"):
        d = decoded[tuple(r["input_ids"])]
        start, length = d.response_start, len(d.input_ids)
        ids, lps, mask = (np.array(r[c]) for c in ("target_token_ids", "target_logprobs", "target_mask"))
        assert ids.shape == lps.shape == mask.shape == (length, K) and len(r["labels"]) == len(r["attention_mask"]) == length
        assert r["labels"][:start] == [-100] * start and r["labels"][start:] == d.input_ids[start:].tolist()
        assert (mask[:start] == 0).all() and (mask[start:] == 1).all() and np.isneginf(lps[:start]).all()
        np.testing.assert_array_equal(ids[start:], d.topk_ids)  # row p: the distribution of token p
        np.testing.assert_array_equal(lps[start:].astype(np.float32), d.topk_logprobs)


def test_an_interrupted_export_resumes_and_a_foreign_folder_is_refused(cache, tmp_path):
    uri, _ = cache
    out = Folder(str(tmp_path / "e"))
    first = export_cache(Folder(uri), out, "plain")
    kept = sorted(out.listdir("data"))
    out.remove(kept[-1])  # as if killed before the last shard's rename
    again = export_cache(Folder(uri), out, "plain")
    assert again.written == 1 and again.export_bytes == first.export_bytes and sorted(out.listdir("data")) == kept
    with pytest.raises(ConfigError, match="holds an export of another format"):
        export_cache(Folder(uri), out, "axolotl")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="holds no pkd export"):
        export_cache(Folder(uri), Folder(str(tmp_path / "other")), "plain")
