"""The streaming student dataset: alignment, determinism, disjoint streams, resume, damage."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from pkd.errors import CompatibilityError, IntegrityError
from pkd.student.losses import IGNORE_INDEX
from pkd.cache.shards import iter_samples
from pkd.store import Folder
from pkd.student.data import CacheStream, check_student_compatible, row_groups, stream_keys
from synthetic import make_samples, write_cache


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    uri = str(tmp_path_factory.mktemp("cache"))
    manifest = write_cache(uri, make_samples(96, k=8, seed=3), shard_rows=16)
    return Folder(uri), manifest


def rows(batch: dict[str, torch.Tensor]) -> list[tuple[int, ...]]:
    """Each sample of a batch as the tuple of its (unpadded) ids: identifies it."""
    return [tuple(ids[m.bool()].tolist()) for ids, m in zip(batch["input_ids"], batch["attention_mask"])]


def take(stream, n: int) -> list[dict[str, torch.Tensor]]:
    return list(itertools.islice(iter(stream), n))


def test_batches_align_cached_topk_with_positions(cache):
    folder, manifest = cache
    decoded = {tuple(s.input_ids.tolist()): s for s in iter_samples(folder, manifest)}
    batch = take(CacheStream(folder, manifest, batch_size=8, max_length=64), 1)[0]
    assert set(batch) == {"input_ids", "attention_mask", "labels", "shift_labels", "topk_ids", "topk_logprobs", "weights"}
    for b, key in enumerate(rows(batch)):
        s = decoded[key]
        for p in range(batch["input_ids"].shape[1]):
            y = int(batch["shift_labels"][b, p])
            if y == IGNORE_INDEX:
                assert not s.response_start - 1 <= p < len(key) - 1  # outside the response
                continue
            t = p + 1 - s.response_start  # cache row predicting token p + 1
            assert y == s.input_ids[p + 1] == batch["labels"][b, p + 1]
            assert batch["topk_ids"][b, p].tolist() == s.topk_ids[t].tolist()
            assert torch.equal(batch["topk_logprobs"][b, p], torch.from_numpy(s.topk_logprobs[t]))
        assert int((batch["shift_labels"][b] != IGNORE_INDEX).sum()) == s.num_tokens
    mu, gamma = manifest.seq_logprob.mu, manifest.seq_logprob.gamma
    expected = [1 / (1 + np.exp(-(decoded[k].seq_logprob - mu) / gamma)) for k in rows(batch)]
    np.testing.assert_allclose(batch["weights"].numpy(), expected, rtol=1e-6)


def test_truncation_keeps_alignment(cache):
    folder, manifest = cache
    batch = take(CacheStream(folder, manifest, batch_size=16, max_length=10, uniform_weights=True), 1)[0]
    assert batch["input_ids"].shape[1] <= 10 and len(set(batch["weights"].tolist())) == 1
    valid = batch["shift_labels"] != IGNORE_INDEX
    assert torch.equal(batch["shift_labels"][:, :-1][valid[:, :-1]], batch["input_ids"][:, 1:][valid[:, :-1]])
    assert not valid[:, -1].any()


def test_order_is_deterministic_for_a_seed(cache):
    folder, manifest = cache
    a = take(CacheStream(folder, manifest, batch_size=4, max_length=64, seed=1, shuffle_buffer=32), 30)
    b = take(CacheStream(folder, manifest, batch_size=4, max_length=64, seed=1, shuffle_buffer=32), 30)
    c = take(CacheStream(folder, manifest, batch_size=4, max_length=64, seed=2, shuffle_buffer=32), 30)
    assert [rows(x) for x in a] == [rows(x) for x in b] != [rows(x) for x in c]
    # 30 batches × 4 = 120 samples: the first 96 are one epoch, each sample once
    first_epoch = [r for x in a for r in rows(x)][:96]
    assert len(set(first_epoch)) == 96


def test_streams_split_row_groups_disjointly(cache):
    _, manifest = cache
    groups = row_groups(manifest)
    total = sum(g.rows for g in groups)
    first_epoch = []
    for s in range(3):
        mine = {int(g) for g in np.random.default_rng([0, 0]).permutation(len(groups))[s::3]}
        size = sum(groups[g].rows for g in mine)
        keys = list(itertools.islice(stream_keys(groups, seed=0, stream=s, num_streams=3, buffer=8), size))
        assert {g for g, _ in keys} == mine and len(set(keys)) == size
        first_epoch.append(set(keys))
    assert sum(map(len, first_epoch)) == len(set().union(*first_epoch)) == total


def test_two_ranks_see_the_global_batches_of_one_process(cache):
    folder, manifest = cache
    kw = dict(max_length=64, seed=5, shuffle_buffer=16, num_streams=2)
    single = take(CacheStream(folder, manifest, batch_size=6, **kw), 12)
    r0 = take(CacheStream(folder, manifest, batch_size=3, rank=0, world_size=2, **kw), 12)
    r1 = take(CacheStream(folder, manifest, batch_size=3, rank=1, world_size=2, **kw), 12)
    for s, a, b in zip(single, r0, r1):
        assert sorted(rows(s)) == sorted(rows(a) + rows(b))
    seen0 = {r for x in r0[:10] for r in rows(x)}
    seen1 = {r for x in r1[:10] for r in rows(x)}
    assert not seen0 & seen1  # 10 batches × 3 < one stream's epoch: disjoint row groups


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_continues_the_same_stream(cache, workers):
    folder, manifest = cache
    kw = dict(batch_size=5, max_length=64, seed=7, shuffle_buffer=16, num_streams=2)
    loader = lambda ds: DataLoader(ds, batch_size=None, num_workers=workers)  # noqa: E731
    full = take(loader(CacheStream(folder, manifest, **kw)), 40)  # past one epoch (96 / 5)
    resumed_ds = CacheStream(folder, manifest, **kw)
    resumed_ds.start_batch = 13
    resumed = take(loader(resumed_ds), 27)
    for a, b in zip(full[13:], resumed):
        for key in a:
            assert torch.equal(a[key], b[key]), key


def test_damaged_shards_are_named(cache, tmp_path):
    folder, manifest = cache
    import shutil

    shutil.copytree(folder.root, tmp_path / "c")
    damaged = Folder(str(tmp_path / "c"))
    victim = manifest.files[3].path
    data = bytearray(damaged.read_bytes(victim))
    data[200:1200] = bytes(1000)  # same size: only decoding can tell
    (tmp_path / "c" / victim).write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match=victim):
        take(CacheStream(damaged, manifest, batch_size=8, max_length=64, shuffle_buffer=1), 20)
    (tmp_path / "c" / victim).write_bytes(bytes(data[:-100]))
    with pytest.raises(IntegrityError, match="truncated"):
        take(CacheStream(damaged, manifest, batch_size=8, max_length=64, shuffle_buffer=1), 20)


class FakeTokenizer:
    """The duck type tokenizer_fingerprint reads."""

    def __init__(self, n: int, template: str = "t") -> None:
        from tokenizers import Tokenizer, models

        self.backend_tokenizer = Tokenizer(models.WordLevel({f"w{i}": i for i in range(n)}, unk_token="w0"))
        self.chat_template, self.n = template, n

    def __len__(self) -> int:
        return self.n


def test_compatibility_check_says_what_differs(cache):
    _, manifest = cache
    tok = FakeTokenizer(512)
    from pkd.fingerprint import tokenizer_fingerprint

    ok = manifest.model_copy(update={"tokenizer_fingerprint": tokenizer_fingerprint(tok)})
    check_student_compatible(ok, tok, 512, "cache")
    check_student_compatible(ok, tok, 640, "cache")  # student pads its embedding further
    with pytest.raises(CompatibilityError, match="tokenizer fingerprint"):
        check_student_compatible(manifest, tok, 512, "cache")
    with pytest.raises(CompatibilityError, match="vocab size 512 \\(cache\\) vs 500"):
        check_student_compatible(ok, tok, 500, "cache")
