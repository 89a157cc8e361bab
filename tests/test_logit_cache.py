import numpy as np
import pyarrow.parquet as pq
import pytest

from pkd.cache.codec import topk_tail_kl
from pkd.errors import ManifestError
from pkd.cache.shards import LogitCacheWriter, iter_samples, seq_logprob_stats
from pkd.records import LogitCacheManifest
from pkd.store import Folder
from synthetic import header, make_samples, write_cache


def _read(uri: str) -> list:
    folder = Folder(uri)
    return list(iter_samples(folder, folder.read_manifest(LogitCacheManifest)))


def test_roundtrip_streams_back_what_was_written(tmp_path) -> None:
    samples = make_samples(40, k=8)
    m = write_cache(str(tmp_path), samples, shard_rows=16)
    assert m.complete and len(m.files) == 3 and m.rows == 40
    assert m.tokens == sum(s.num_tokens for s in samples)
    back = _read(str(tmp_path))
    assert [b.sample_id for b in back] == [s.sample_id for s in samples]
    for a, b in zip(samples, back):
        np.testing.assert_array_equal(a.input_ids, b.input_ids)
        assert a.response_start == b.response_start
        np.testing.assert_array_equal(a.topk_ids, b.topk_ids)
        assert topk_tail_kl(a.topk_logprobs, b.topk_logprobs).mean() < 1e-3  # codec v1 is lossy
        np.testing.assert_array_equal(a.token_logprob, b.token_logprob)


def test_seq_logprob_stats_match_numpy(tmp_path) -> None:
    samples = make_samples(50, k=4)
    m = write_cache(str(tmp_path), samples, shard_rows=7)
    ell = np.array([s.seq_logprob for s in samples])
    assert m.seq_logprob.count == 50
    assert m.seq_logprob.mu == pytest.approx(ell.mean(), rel=1e-9)
    assert m.seq_logprob.gamma == pytest.approx(ell.std(), rel=1e-9)
    chunks = np.array_split(ell, 5)
    assert seq_logprob_stats(chunks).gamma == pytest.approx(ell.std(), rel=1e-9)


def test_shards_are_plain_parquet(tmp_path) -> None:
    import datasets

    write_cache(str(tmp_path), make_samples(20, k=4), shard_rows=8)
    files = sorted(str(p) for p in (tmp_path / "data").glob("*.parquet"))
    table = pq.read_table(files[0])
    assert {"sample_id", "input_ids", "response_start", "token_logprob", "seq_logprob"} <= set(table.column_names)
    ds = datasets.load_dataset("parquet", data_files=files, split="train")
    assert len(ds) == 20 and ds[0]["sample_id"] == "s00000"


def test_memory_uri(tmp_path) -> None:
    samples = make_samples(10, k=4)
    write_cache("memory://lc-roundtrip", samples, shard_rows=4)
    assert [s.sample_id for s in _read("memory://lc-roundtrip")] == [s.sample_id for s in samples]


def test_resume_after_crash_equals_uninterrupted(tmp_path) -> None:
    samples = make_samples(30, k=4)
    full = write_cache(str(tmp_path / "full"), samples, shard_rows=8)

    folder = Folder(str(tmp_path / "crash"))
    w = LogitCacheWriter(folder, header(k=4), shard_rows=8)
    for s in samples[:20]:  # two shards committed, four samples buffered: then the process dies
        w.add(s)
    (tmp_path / "crash" / "data" / "part-00000-00002.parquet").write_bytes(b"renamed but never in the manifest")
    (tmp_path / "crash" / "data" / "part-00000-00003.parquet.tmp-0badc0de").write_bytes(b"half written")

    w2 = LogitCacheWriter(folder, header(k=4), shard_rows=8)
    done = w2.committed_ids()
    assert done == {s.sample_id for s in samples[:16]}
    for s in samples:
        if s.sample_id not in done:
            w2.add(s)
    resumed = w2.close()
    assert [f.sha256 for f in resumed.files] == [f.sha256 for f in full.files]
    assert resumed.seq_logprob == full.seq_logprob
    assert sorted(p.name for p in (tmp_path / "crash" / "data").iterdir()) == sorted(p.name for p in (tmp_path / "full" / "data").iterdir())


def test_resume_refuses_a_different_cache(tmp_path) -> None:
    write_cache(str(tmp_path), make_samples(5, k=4), shard_rows=2)
    with pytest.raises(ManifestError, match="different tokenizer_fingerprint"):
        LogitCacheWriter(Folder(str(tmp_path)), header(k=4, tokenizer_fp="tok-other"))


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_token_logprob_is_refused_at_the_write(tmp_path, bad) -> None:
    from pkd.errors import IntegrityError

    samples = make_samples(6, k=4)
    samples[4].token_logprob = samples[4].token_logprob.copy()
    samples[4].token_logprob[1] = bad
    folder = Folder(str(tmp_path / "c"))
    writer = LogitCacheWriter(folder, header(k=4), shard_rows=3)
    for s in samples[:3]:
        writer.add(s)  # one committed shard: kept
    with pytest.raises(IntegrityError, match=f"sample {samples[4].sample_id!r}: token logprob .* at response position 1 is not a finite number"):
        for s in samples[3:]:
            writer.add(s)
        writer.close()
    m = folder.read_manifest(LogitCacheManifest)
    assert not m.complete and len(m.files) == 1 and m.rows == 3


def test_a_top_k_row_below_any_distribution_is_refused_at_the_write(tmp_path) -> None:
    """All of a position's top-k logprobs ≤ −104 decoded to +inf (the decoder rescales a mass that
    underflows to 0); the top-1 of a distribution over V ids is ≥ −log V, so refuse such a row,
    naming the sample and the position. A uniform row (top-1 = −log V exactly) is fine."""
    from pkd.errors import IntegrityError

    samples = make_samples(3, k=4)
    uniform = samples[0]
    uniform.topk_logprobs = np.full_like(uniform.topk_logprobs, -np.log(512))  # VOCAB = 512
    bad = samples[2]
    bad.topk_logprobs = bad.topk_logprobs.copy()
    bad.topk_logprobs[min(2, bad.num_tokens - 1)] = -110.0
    with pytest.raises(IntegrityError, match=rf"sample {bad.sample_id!r}: the top-k logprobs at response position {min(2, bad.num_tokens - 1)} are all ≤ -110"):
        write_cache(str(tmp_path / "bad"), samples)
    m = write_cache(str(tmp_path / "ok"), samples[:2])
    got = list(iter_samples(Folder(str(tmp_path / "ok")), m))
    assert np.isfinite(got[0].topk_logprobs).all()
