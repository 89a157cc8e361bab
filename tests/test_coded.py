"""Format v2 codecs: top-k v2 (ANS-coded ids) decodes exactly what v1 does; top-k v3 (copies
from the previous position, anchored levels) keeps every id and stays under 1e-4 nats; sampled
v1 keeps every distinct draw with its count; all refuse corrupt input with CodecError."""

from __future__ import annotations

import numpy as np
import pytest

from pkd.cache.codec import TopkCodec, topk_tail_kl
from pkd.cache.coded import SampledCodec, TopkAnsCodec, codec_from_spec
from pkd.cache.entropy import IdModel, join_tables, split_tables
from pkd.cache.topk3 import TopkCopyCodec, find_copies
from pkd.errors import CodecError

V = 3000


def _topk(rng: np.random.Generator, n: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    logits = rng.standard_normal((n, V)) * 2.5 - np.log1p(np.arange(V))  # Zipf-ish
    lp = logits - np.logaddexp.reduce(logits, axis=1, keepdims=True)
    order = np.argsort(-lp, axis=1)[:, :k]
    return order.astype(np.int32), np.take_along_axis(lp, order, 1).astype(np.float32)


def test_topk_v2_decodes_exactly_like_v1_and_codes_ids_below_16_bits() -> None:
    rng = np.random.default_rng(0)
    lengths = np.array([40, 0, 75, 1, 30])
    ids, lp = _topk(rng, int(lengths.sum()), 16)
    v2 = TopkAnsCodec(k=16, vocab_size=V)
    columns, side = v2.encode_rows(ids, lp, None, lengths)
    got_ids, got_lp, counts = v2.decode_rows(columns, lengths, side)
    v1 = TopkCodec(k=16, vocab_size=V, lp_step=v2.lp_step)  # the same quantisation grid
    ref_ids, ref_lp = v1.decode(v1.encode(ids, lp), len(ids))
    np.testing.assert_array_equal(got_ids, ids)
    np.testing.assert_array_equal(got_lp, ref_lp)
    assert counts is None
    words, offsets = columns["ids"]
    assert len(offsets) == len(lengths) + 1 and offsets[2] == offsets[1]  # the empty row holds no words
    assert words.nbytes * 8 / ids.size < 12  # Zipf-like ids cost well under their 12 raw bits
    assert codec_from_spec(v2.spec()) == v2 and v2.spec()["version"] == 2
    assert codec_from_spec(v1.spec()) == v1


def test_sampled_codec_keeps_every_draw() -> None:
    rng = np.random.default_rng(1)
    n, draws = 50, 12
    p = rng.dirichlet(np.full(V, 0.05), size=n)
    lengths = np.array([20, 30])
    ids, counts, lp = np.zeros((n, draws), np.int32), np.zeros((n, draws), np.uint8), np.zeros((n, draws), np.float32)
    for t in range(n):
        u, c = np.unique(rng.choice(V, size=draws, p=p[t]), return_counts=True)
        perm = rng.permutation(len(u))  # any order in, descending logprob out
        ids[t, : len(u)], counts[t, : len(u)], lp[t, : len(u)] = u[perm], c[perm], np.log(p[t, u[perm]])
    codec = SampledCodec(k=draws, vocab_size=V)
    columns, side = codec.encode_rows(ids, lp, counts, lengths)
    got_ids, got_lp, got_counts = codec.decode_rows(columns, lengths, side)
    for t in range(n):
        assert dict(zip(ids[t][counts[t] > 0], counts[t][counts[t] > 0])) == dict(zip(got_ids[t][got_counts[t] > 0], got_counts[t][got_counts[t] > 0]))
        m = got_counts[t] > 0
        np.testing.assert_allclose(got_lp[t][m], np.log(p[t, got_ids[t][m]]), atol=0.05)
        assert (np.diff(got_lp[t][m]) <= 0).all() and (got_counts[t][~m] == 0).all()
    with pytest.raises(CodecError, match="sum to the 12 draws"):
        codec.encode_rows(ids, lp, np.maximum(counts, 1), lengths)


def test_corrupt_or_unknown_input_is_refused() -> None:
    rng = np.random.default_rng(2)
    lengths = np.array([30])
    ids, lp = _topk(rng, 30, 8)
    codec = TopkAnsCodec(k=8, vocab_size=V)
    columns, side = codec.encode_rows(ids, lp, None, lengths)
    with pytest.raises(CodecError, match="corrupt"):
        codec.decode_rows(columns, lengths, side[:10])
    with pytest.raises(CodecError, match="corrupt frequency table"):
        codec.decode_rows(columns, lengths, join_tables(b"\x05\0\0\0garbage", split_tables(side)[1]))
    words, offsets = columns["ids"]
    with pytest.raises(CodecError):
        codec.decode_rows({**columns, "ids": (words[:-2], offsets - np.array([0, 2]))}, lengths, side)
    with pytest.raises(CodecError, match="not in the shard's frequency table"):
        IdModel.fit(np.array([1, 2, 3])).encode(np.array([4]))
    with pytest.raises(CodecError, match="not supported"):
        codec_from_spec({**codec.spec(), "version": 9})
    with pytest.raises(CodecError, match="samples"):
        SampledCodec(k=300, vocab_size=V)


def test_one_symbol_alphabets_code() -> None:
    """A shard whose ids (or a rank's level deltas) take a single value still codes."""
    ids = np.tile(np.array([[7, 3]], np.int32), (5, 1))
    lp = np.tile(np.array([[-0.1, -3.0]], np.float32), (5, 1))
    codec = TopkAnsCodec(k=2, vocab_size=V)
    columns, side = codec.encode_rows(ids, lp, None, np.array([5]))
    got, _, _ = codec.decode_rows(columns, np.array([5]), side)
    np.testing.assert_array_equal(got, ids)
    one = IdModel.fit(np.array([4, 4, 4]))
    assert one.decode(one.encode(np.array([4, 4])), 2).tolist() == [4, 4]
    for codec in (TopkAnsCodec(k=2, vocab_size=V), TopkCopyCodec(k=2, vocab_size=V)):  # a shard of empty rows
        columns, side = codec.encode_rows(np.zeros((0, 2), np.int32), np.zeros((0, 2), np.float32), None, np.array([0, 0]))
        assert codec.decode_rows(columns, np.array([0, 0]), side)[0].shape == (0, 2)


def _runs(rng: np.random.Generator, n: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k of slowly drifting logits: neighbouring positions share most ids (copies, chains)."""
    base = rng.standard_normal(V) * 2.5 - np.log1p(np.arange(V))
    logits = base + np.cumsum(rng.standard_normal((n, V)) * 0.3, axis=0)  # (n, V) a random walk
    lp = logits - np.logaddexp.reduce(logits, axis=1, keepdims=True)
    order = np.argsort(-lp, axis=1)[:, :k]
    return order.astype(np.int32), np.take_along_axis(lp, order, 1).astype(np.float32)


@pytest.mark.parametrize("k", [1, 8])
def test_topk_v3_roundtrips_ids_with_copies_and_escapes(k: int) -> None:
    rng = np.random.default_rng(3)
    lengths = np.array([60, 0, 1, 45])
    ids, lp = _runs(rng, int(lengths.sum()), k)
    ids[5, -1] = V - 1  # an id seen once: escaped, coded raw
    codec = TopkCopyCodec(k=k, vocab_size=V)
    columns, side = codec.encode_rows(ids, lp, None, lengths)
    got_ids, got_lp, counts = codec.decode_rows(columns, lengths, side)
    np.testing.assert_array_equal(got_ids, ids)
    assert counts is None and got_lp.dtype == np.float32
    assert topk_tail_kl(lp, got_lp).mean() < 1e-4
    copies = find_copies(ids, np.array([0, 60, 60, 61]))
    assert (copies[[0, 60, 61]] == -1).all()  # a row's first position copies nothing
    if k > 1:
        assert (copies >= 0).mean() > 0.3  # the drift keeps ids: copies (and chains of them) occur
    assert codec_from_spec(codec.spec()) == codec and codec.spec()["version"] == 3
    assert codec_from_spec(TopkAnsCodec(k=k, vocab_size=V).spec()).version == 2  # v2 caches still read


def test_topk_v3_anchor_leaves_the_distribution_unchanged() -> None:
    """Shifting every logprob of a position by a constant is invisible after renormalisation,
    so v3 codes only the gaps below the top-1: its top-1 gap to the second is exact to a step."""
    rng = np.random.default_rng(4)
    ids, lp = _topk(rng, 200, 16)
    codec = TopkCopyCodec(k=16, vocab_size=V)
    columns, side = codec.encode_rows(ids, lp, None, np.array([200]))
    _, got, _ = codec.decode_rows(columns, np.array([200]), side)
    gap, got_gap = lp[:, 0] - lp[:, 1], got[:, 0] - got[:, 1]
    step = codec.lp_step * np.exp(-lp[:, 1] / 2)  # the grid's step near the second entry
    assert (np.abs(gap - got_gap) <= step).all()


def test_topk_v3_refuses_corrupt_input() -> None:
    rng = np.random.default_rng(5)
    lengths = np.array([30, 20])
    ids, lp = _runs(rng, 50, 8)
    codec = TopkCopyCodec(k=8, vocab_size=V)
    columns, side = codec.encode_rows(ids, lp, None, lengths)
    words, offsets = columns["ans"]
    with pytest.raises(CodecError, match="corrupt"):
        codec.decode_rows(columns, lengths, side[:10])
    with pytest.raises(CodecError, match="corrupt frequency table"):
        codec.decode_rows(columns, lengths, join_tables(b"\x08\0\0\0\x05\0\0\0garbage", split_tables(side)[1]))
    with pytest.raises(CodecError, match="another k"):
        TopkCopyCodec(k=7, vocab_size=V).decode_rows(columns, lengths, side)
    with pytest.raises(CodecError):
        codec.decode_rows({"ans": (words[:-2], offsets - np.array([0, 0, 2]))}, lengths, side)
    with pytest.raises(CodecError, match="anchor_step"):
        TopkCopyCodec(k=8, vocab_size=V, anchor_step=0)
