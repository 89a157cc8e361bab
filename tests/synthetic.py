"""Synthetic logit caches for store/format tests: real top-k of real softmaxes over random
Zipf-like logits, written through the real writer (no model needed)."""

from __future__ import annotations

import numpy as np

from pkd.cache.topk3 import TopkCopyCodec
from pkd.cache.shards import LogitCacheWriter, LogitSample
from pkd.records import LogitCacheManifest
from pkd.store import Folder

VOCAB = 512


def make_sample(rng: np.random.Generator, i: int, k: int, vocab: int = VOCAB, prefix: str = "s") -> LogitSample:
    prompt_len, resp_len = int(rng.integers(3, 9)), int(rng.integers(1, 24))
    input_ids = rng.integers(0, vocab, prompt_len + resp_len).astype(np.int32)
    logits = rng.standard_normal((resp_len, vocab)) * 2.5 - np.log1p(np.arange(vocab))  # (T, V), Zipf-ish
    logp = logits - np.logaddexp.reduce(logits, axis=1, keepdims=True)
    order = np.argsort(-logp, axis=1)[:, :k]  # (T, k) rank order
    targets = input_ids[prompt_len:]
    return LogitSample(
        sample_id=f"{prefix}{i:05d}",
        input_ids=input_ids,
        response_start=prompt_len,
        topk_ids=order.astype(np.int32),
        topk_logprobs=np.take_along_axis(logp, order, axis=1).astype(np.float32),
        token_logprob=logp[np.arange(resp_len), targets].astype(np.float32),
    )


def make_samples(n: int, k: int = 8, seed: int = 0, vocab: int = VOCAB, prefix: str = "s") -> list[LogitSample]:
    rng = np.random.default_rng(seed)
    return [make_sample(rng, i, k, vocab, prefix) for i in range(n)]


def header(k: int = 8, vocab: int = VOCAB, tokenizer_fp: str = "tok-test", proxy_fp: str = "proxy-test", **kw) -> LogitCacheManifest:
    return LogitCacheManifest(
        codec=TopkCopyCodec(k=k, vocab_size=vocab).spec(),
        vocab_size=vocab,
        tokenizer_fingerprint=tokenizer_fp,
        proxy_fingerprint=proxy_fp,
        teacher_model="teacher-test",
        inputs={"samples": "sha-test"},
        config={"k": k},
        **kw,
    )


def write_cache(uri: str, samples: list[LogitSample], *, shard_rows: int = 16, part: int = 0, **header_kw) -> LogitCacheManifest:
    k = samples[0].topk_ids.shape[1]
    writer = LogitCacheWriter(Folder(uri), header(k=k, **header_kw), shard_rows=shard_rows, part=part)
    for s in samples:
        writer.add(s)
    return writer.close()
