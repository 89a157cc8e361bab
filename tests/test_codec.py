"""Top-k codec v1: exact ids, bounded KL, spec round trip, errors that name what is wrong."""

import math

import numpy as np
import pytest

from pkd.cache.codec import TopkCodec, topk_tail_kl
from pkd.errors import CodecError


def _topk(logits: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(N, V) logits -> top-k ids and float32 logprobs in rank order, like the engines emit."""
    logp = logits - np.logaddexp.reduce(logits, axis=1, keepdims=True)  # (N, V)
    ids = np.argsort(-logp, axis=1, kind="stable")[:, :k]  # (N, k)
    return ids.astype(np.int32), np.take_along_axis(logp, ids, axis=1).astype(np.float32)


def _random_case(n: int, vocab: int, k: int, skewed: bool, seed: int = 0):
    rng = np.random.default_rng(seed)
    if skewed:  # Zipf-like: small ids likely, a few confident positions, a few flat ones
        scale = rng.choice([0.5, 2.0, 8.0], size=(n, 1))
        logits = -scale * np.log1p(np.arange(vocab))[None, :] + rng.gumbel(size=(n, vocab))
    else:
        logits = rng.normal(scale=3.0, size=(n, vocab))
    return _topk(logits, k)


def _roundtrip(codec: TopkCodec, ids: np.ndarray, lp: np.ndarray):
    streams = codec.encode(ids, lp)
    for name, (dtype, width) in codec.streams().items():
        assert streams[name].dtype == dtype and streams[name].shape == (len(ids) * width,)
    return codec.decode(streams, len(ids))


@pytest.mark.parametrize("skewed", [False, True])
@pytest.mark.parametrize("k", [1, 10, 20])
def test_roundtrip_ids_exact_kl_small(k: int, skewed: bool) -> None:
    ids, lp = _random_case(300, 2000, k, skewed)
    dec_ids, dec_lp = _roundtrip(TopkCodec(k=k, vocab_size=2000), ids, lp)
    assert dec_ids.dtype == np.int32 and dec_lp.dtype == np.float32
    assert dec_ids.shape == dec_lp.shape == (300, k)
    np.testing.assert_array_equal(dec_ids, ids)
    assert np.all(np.diff(dec_lp, axis=1) <= 0)  # rank order kept
    kl = topk_tail_kl(lp, dec_lp)
    assert kl.mean() < 1e-4 and kl.max() < 1e-3


@pytest.mark.parametrize("vocab", [2**17 - 1, 2**17, 2**17 + 1, 2**18 - 1, 2**18, 2**18 + 3])
def test_large_vocab_ids_exact(vocab: int) -> None:
    rng = np.random.default_rng(1)
    ids = np.stack([rng.choice(vocab, size=128, replace=False) for _ in range(40)]).astype(np.int32)
    ids[0, :2] = [vocab - 1, 0]  # the extremes of the id range
    # a valid distribution: 128 sorted entries plus a tail bucket (the last of 129 logits)
    logits = np.sort(rng.normal(scale=3.0, size=(40, 129)), axis=1)[:, ::-1]
    logits[:, -1] = rng.normal(scale=3.0, size=40)
    lp = (logits - np.logaddexp.reduce(logits, axis=1, keepdims=True))[:, :128].astype(np.float32)
    dec_ids, dec_lp = _roundtrip(TopkCodec(k=128, vocab_size=vocab), ids, lp)
    np.testing.assert_array_equal(dec_ids, ids)
    assert topk_tail_kl(lp, dec_lp).mean() < 1e-4


def test_k128_confident_and_flat_positions() -> None:
    ids, lp = _random_case(200, 5000, 128, skewed=True, seed=2)
    lp[0] = np.concatenate([[-1e-7], np.linspace(-17, -30, 127)]).astype(np.float32)  # tail ~1e-7
    dec_ids, dec_lp = _roundtrip(TopkCodec(k=128, vocab_size=5000), ids, lp)
    np.testing.assert_array_equal(dec_ids, ids)
    assert topk_tail_kl(lp, dec_lp).mean() < 1e-4


def test_minus_inf_logprobs_and_empty_input() -> None:
    codec = TopkCodec(k=3, vocab_size=10)
    ids = np.array([[4, 1, 7]], dtype=np.int32)
    lp = np.array([[0.0, -np.inf, -np.inf]], dtype=np.float32)
    dec_ids, dec_lp = _roundtrip(codec, ids, lp)
    np.testing.assert_array_equal(dec_ids, ids)
    assert dec_lp[0, 0] > -1e-6 and dec_lp[0, 2] < -30
    empty_ids, empty_lp = _roundtrip(codec, np.zeros((0, 3), np.int32), np.zeros((0, 3), np.float32))
    assert empty_ids.shape == empty_lp.shape == (0, 3)


def test_spec_roundtrip_and_errors() -> None:
    codec = TopkCodec(k=20, vocab_size=151_936, lp_step=0.01)
    spec = codec.spec()
    assert spec["name"] == "topk" and spec["version"] == 1 and spec["params"]["lp_step"] == 0.01
    assert TopkCodec.from_spec(spec) == codec
    with pytest.raises(CodecError, match="version 2"):
        TopkCodec.from_spec({**spec, "version": 2})
    with pytest.raises(CodecError, match="'zipk'"):
        TopkCodec.from_spec({**spec, "name": "zipk"})
    with pytest.raises(CodecError, match="'bogus'"):
        TopkCodec.from_spec({**spec, "params": {"bogus": 1}})
    with pytest.raises(CodecError, match="lp_step=-1"):
        TopkCodec.from_spec({**spec, "params": {"lp_step": -1}})


@pytest.mark.parametrize("k, vocab", [(0, 100), (2000, 5000), (5, 0), (5, 2**23), (20, 10), (2.5, 100)])
def test_bad_construction_names_value(k, vocab) -> None:
    with pytest.raises(CodecError, match="k=|vocab_size="):
        TopkCodec(k=k, vocab_size=vocab)


def test_encode_rejects_bad_input() -> None:
    codec = TopkCodec(k=2, vocab_size=10)
    with pytest.raises(CodecError, match=r"\(N, 2\)"):
        codec.encode(np.zeros((3, 3), np.int32), np.zeros((3, 3), np.float32))
    with pytest.raises(CodecError, match="outside"):
        codec.encode(np.array([[1, 10]]), np.array([[-1.0, -2.0]], np.float32))


def test_decode_wrong_lengths_raise() -> None:
    codec = TopkCodec(k=4, vocab_size=100)
    ids, lp = _random_case(5, 100, 4, skewed=True)
    streams = codec.encode(ids, lp)
    with pytest.raises(CodecError, match="'entries'.*expected 6 tokens"):
        codec.decode(streams, 6)
    with pytest.raises(CodecError, match="'tail'"):
        codec.decode({**streams, "tail": streams["tail"][:-1]}, 5)
    with pytest.raises(CodecError, match="missing"):
        codec.decode({"entries": streams["entries"]}, 5)


def test_tail_kl_by_hand() -> None:
    ref = np.log(np.array([[0.5, 0.25]]))  # tail 0.25
    assert topk_tail_kl(ref, ref) == pytest.approx([0.0], abs=1e-12)
    dec = np.log(np.array([[0.25, 0.25]]))  # tail 0.5
    expected = 0.5 * math.log(0.5 / 0.25) + 0.25 * math.log(1.0) + 0.25 * math.log(0.25 / 0.5)
    assert topk_tail_kl(ref, dec) == pytest.approx([expected], rel=1e-9)
    # A decoded top-k summing past 1 is renormalised (tail clipped), so KL stays >= 0.
    over = np.log(np.array([[0.7, 0.4]]))
    assert topk_tail_kl(ref, over)[0] > 0


def test_corrupt_k1_stream_is_a_codec_error() -> None:
    codec = TopkCodec(k=1, vocab_size=1000)
    streams = codec.encode(np.array([[5], [7]]), np.array([[-0.1], [-2.0]], np.float32))
    streams["entries"] = streams["entries"] | np.uint32(0xFFC00000)  # every level bit set: past the grid
    with pytest.raises(CodecError, match="corrupt entries stream"):
        codec.decode(streams, 2)
