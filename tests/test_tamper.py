"""Tampered logit caches: deleted, truncated, appended, swapped and same-size-rewritten shards,
seeded single-bit flips anywhere in a shard, `data/` replaced by a file, and manifest edits
(counts, μ/γ, entries, sha256, bytes, teacher). `pkd cache verify`, `pkd cache pull` and `pkd
train-student` must each refuse every case, in one line, with no traceback; the untouched cache
passes all three. The public reader `iter_samples` raises pkd's IntegrityError for every case that
damages a shard (the manifest-only edits leave the samples it yields intact)."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner, Result

from pkd.cache.coded import codec_from_spec
from pkd.cache.ops import read_cache_manifest
from pkd.cache.shards import decode_batch, iter_samples, open_shard, shard_side, write_shard
from pkd.cli import app
from pkd.errors import IntegrityError
from pkd.store import Folder

FLIPS = 16


def _manifest_edit(edit: Callable[[dict], None]) -> Callable[[Path], None]:
    def apply(cache: Path) -> None:
        m = json.loads((cache / "manifest.json").read_text())
        edit(m)
        (cache / "manifest.json").write_text(json.dumps(m, indent=2))

    return apply


def _shards(cache: Path) -> list[Path]:
    return [cache / f["path"] for f in json.loads((cache / "manifest.json").read_text())["files"]]


def _delete(cache: Path) -> None:
    _shards(cache)[1].unlink()


def _truncate(cache: Path) -> None:
    p = _shards(cache)[1]
    p.write_bytes(p.read_bytes()[:-100])


def _append(cache: Path) -> None:
    p = _shards(cache)[0]
    p.write_bytes(p.read_bytes() + b"\0" * 16)


def _swap(cache: Path) -> None:
    a, b = _shards(cache)[:2]
    da, db = a.read_bytes(), b.read_bytes()
    a.write_bytes(db)
    b.write_bytes(da)


def _data_is_a_file(cache: Path) -> None:
    shutil.rmtree(cache / "data")
    (cache / "data").write_text("not a folder")


def _rewrite_same_size(cache: Path) -> None:
    """A well-formed shard with other numbers, exactly the size of the one it replaces."""
    folder = Folder(str(cache))
    manifest = read_cache_manifest(folder)
    entry = manifest.files[2]
    codec, pf = codec_from_spec(manifest.codec), open_shard(folder, entry.path)
    samples = [s for b in pf.iter_batches() for s in decode_batch(b, codec, shard_side(pf))]
    for attempt in range(1, 400):
        changed = [s for s in samples]
        s = changed[attempt % len(changed)]
        s.token_logprob = s.token_logprob.copy()
        s.token_logprob[0] = np.float32(s.token_logprob[0] - 1e-3 * attempt)
        rewritten = write_shard(Folder(str(cache / "tmp")), "x.parquet", changed, manifest, codec)
        if rewritten.bytes == entry.bytes and rewritten.sha256 != entry.sha256:
            shutil.move(cache / "tmp" / "x.parquet", cache / entry.path)
            shutil.rmtree(cache / "tmp")
            return
    raise AssertionError("found no same-size rewrite")


def _flip(seed: int) -> Callable[[Path], None]:
    def apply(cache: Path) -> None:
        rng = np.random.default_rng(seed)
        shards = _shards(cache)
        p = shards[int(rng.integers(len(shards)))]
        data = bytearray(p.read_bytes())
        data[int(rng.integers(len(data)))] ^= 1 << int(rng.integers(8))
        p.write_bytes(bytes(data))

    return apply


def _footer_flip(cache: Path) -> None:
    """One bit of the footer's pkd metadata (the JSON naming codec and fingerprints), made into a
    byte that is not UTF-8."""
    p = _shards(cache)[0]
    data = bytearray(p.read_bytes())
    at = data.rindex(b"tokenizer_fingerprint")
    data[at + 3] |= 0x80
    p.write_bytes(bytes(data))


def _drop_entry(consistent: bool) -> Callable[[Path], None]:
    def edit(m: dict) -> None:
        gone = m["files"].pop(1)
        if consistent:  # counts made to agree with the shorter list: only the unlisted shard tells
            m["counts"]["rows"] -= gone["rows"]
            m["counts"]["tokens"] -= gone["tokens"]
            m["seq_logprob"]["count"] -= gone["rows"]

    return _manifest_edit(edit)


def _set(path: str, value: Callable[[object], object]) -> Callable[[Path], None]:
    def edit(m: dict) -> None:
        *head, last = path.split(".")
        node = m
        for key in head:
            node = node[int(key)] if isinstance(node, list) else node[key]
        node[last] = value(node[last])

    return _manifest_edit(edit)


CASES: dict[str, Callable[[Path], None]] = {
    "deleted shard": _delete,
    "truncated shard": _truncate,
    "appended shard": _append,
    "swapped shards": _swap,
    "same-size rewritten shard": _rewrite_same_size,
    "data/ is a file": _data_is_a_file,
    "footer metadata bit flip": _footer_flip,
    **{f"bit flip {seed}": _flip(seed) for seed in range(FLIPS)},
    "counts.rows edited": _set("counts.rows", lambda v: v + 1),
    "counts.tokens edited": _set("counts.tokens", lambda v: v - 5),
    "μ edited": _set("seq_logprob.mu", lambda v: v + 0.5),
    "γ edited": _set("seq_logprob.gamma", lambda v: v * 1e-6),
    "entry removed": _drop_entry(consistent=False),
    "entry removed, counts adjusted": _drop_entry(consistent=True),
    "entry sha256 edited": _set("files.0.sha256", lambda v: ("0" if v[0] != "0" else "1") + v[1:]),
    "entry rows edited": _set("files.2.rows", lambda v: v - 1),
    "entry bytes edited": _set("files.1.bytes", lambda v: v + 1),
    "teacher_model edited": _set("teacher_model", lambda v: f"{v}-other"),
}


def _one_line(result: Result) -> str:
    # a progress bar may precede the message on its line (it ends in "\r", not "\n")
    lines = [x[x.index("error: ") :] if "error: " in x else x for x in result.output.splitlines() if "error: " in x or x.startswith("bad ")]
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert lines and "Traceback" not in result.output, result.output
    return lines[0]


@pytest.fixture
def tampered(scored_cache: str, tmp_path: Path) -> Callable[[str], Path]:
    def make(case: str) -> Path:
        cache = tmp_path / case.replace(" ", "_").replace("/", "")
        shutil.rmtree(cache, ignore_errors=True)
        shutil.copytree(scored_cache, cache)
        if case != "untouched":
            CASES[case](cache)
        return cache

    return make


def test_verify_and_pull_refuse_every_tampered_cache(tampered: Callable[[str], Path], tmp_path: Path) -> None:
    runner = CliRunner()
    clean = tampered("untouched")
    assert runner.invoke(app, ["cache", "verify", str(clean)]).exit_code == 0
    assert runner.invoke(app, ["cache", "pull", str(clean), str(tmp_path / "pulled-clean")]).exit_code == 0
    caught = {"verify": 0, "pull": 0}
    for case in CASES:
        cache = tampered(case)
        verify = runner.invoke(app, ["cache", "verify", str(cache)])
        assert verify.exit_code != 0, f"verify passed {case}"
        _one_line(verify)
        caught["verify"] += 1
        pull = runner.invoke(app, ["cache", "pull", str(cache), str(tmp_path / f"pulled-{caught['pull']}")])
        assert pull.exit_code != 0, f"pull took {case}: {pull.output}"
        _one_line(pull)
        caught["pull"] += 1
    print(f"tampered caches caught: {caught} of {len(CASES)}")


def test_pull_into_a_damaged_copy_repairs_it(scored_cache: str, tmp_path: Path) -> None:
    runner, dst = CliRunner(), tmp_path / "copy"
    assert runner.invoke(app, ["cache", "pull", scored_cache, str(dst)]).exit_code == 0
    _flip(3)(dst)
    _delete(dst)
    again = runner.invoke(app, ["cache", "pull", scored_cache, str(dst)])
    assert again.exit_code == 0 and "2 of 3 files transferred" in again.output, again.output
    assert runner.invoke(app, ["cache", "verify", str(dst)]).exit_code == 0
    assert "0 of 3 files transferred" in runner.invoke(app, ["cache", "pull", scored_cache, str(dst)]).output


MANIFEST_ONLY = {"counts.rows edited", "counts.tokens edited", "μ edited", "γ edited", "entry removed", "entry removed, counts adjusted"}


def _read_all(cache: Path) -> list:
    folder = Folder(str(cache))
    return list(iter_samples(folder, read_cache_manifest(folder)))


def test_iter_samples_refuses_every_damaged_shard(tampered: Callable[[str], Path]) -> None:
    """The reader the dataset card tells users to call: pkd's one error, naming the shard, for
    every case that changes a shard's bytes or the entry describing them."""
    clean = {s.sample_id: s for s in _read_all(tampered("untouched"))}
    caught = returned = 0
    for case in CASES:
        try:
            samples = _read_all(tampered(case))
        except IntegrityError as e:
            assert "data/" in str(e), f"{case}: {e}"
            caught += 1
            continue
        assert case in MANIFEST_ONLY, f"iter_samples returned data for {case}"
        for s in samples:  # what it yields is the untouched cache's data
            np.testing.assert_array_equal(s.topk_ids, clean[s.sample_id].topk_ids)
            np.testing.assert_array_equal(s.token_logprob, clean[s.sample_id].token_logprob)
        returned += 1
    print(f"iter_samples: {caught} of {len(CASES)} tampered caches refused, {returned} manifest-only edits read intact")
    assert caught == len(CASES) - len(MANIFEST_ONLY)


def test_iter_samples_catches_every_single_byte_change(scored_cache: str, tmp_path: Path) -> None:
    """60 seeded single-byte changes anywhere in a shard: each one raises IntegrityError (before
    the sha256 check, 9 returned other numbers and 4 raised OSError or UnicodeDecodeError)."""
    shutil.copytree(scored_cache, tmp_path / "c")
    shards = _shards(tmp_path / "c")
    originals = [p.read_bytes() for p in shards]
    for seed in range(60):
        rng = np.random.default_rng(1000 + seed)
        i = int(rng.integers(len(shards)))
        data = bytearray(originals[i])
        data[int(rng.integers(len(data)))] ^= int(rng.integers(1, 256))
        shards[i].write_bytes(bytes(data))
        with pytest.raises(IntegrityError, match="sha256|bytes|readable"):
            _read_all(tmp_path / "c")
        shards[i].write_bytes(originals[i])
    assert len(_read_all(tmp_path / "c")) == 48


def test_pull_replaces_a_destination_manifest_that_differs(scored_cache: str, tmp_path: Path) -> None:
    """The destination holds the same shards under a manifest with another teacher_model: pull
    rewrites the source's manifest (it used to keep the wrong one and say all was verified)."""
    runner, dst = CliRunner(), tmp_path / "copy"
    assert runner.invoke(app, ["cache", "pull", scored_cache, str(dst)]).exit_code == 0
    _set("teacher_model", lambda v: f"{v}-other")(dst)
    again = runner.invoke(app, ["cache", "pull", scored_cache, str(dst)])
    assert again.exit_code == 0 and "0 of 3 files transferred" in again.output and "manifest differed" in again.output, again.output
    assert json.loads((dst / "manifest.json").read_text()) == json.loads((Path(scored_cache) / "manifest.json").read_text())
    assert runner.invoke(app, ["cache", "verify", str(dst)]).exit_code == 0
    assert "manifest differed" not in runner.invoke(app, ["cache", "pull", scored_cache, str(dst)]).output


def test_pull_checks_each_shard_size(scored_cache: str, tmp_path: Path) -> None:
    """A source manifest listing a wrong size: pull refuses (it reported 3 of 3 verified, and
    `verify` failed on the copy), and leaves no manifest at the destination."""
    src = tmp_path / "src"
    shutil.copytree(scored_cache, src)
    _set("files.1.bytes", lambda v: v - 7)(src)
    result = CliRunner().invoke(app, ["cache", "pull", str(src), str(tmp_path / "dst")])
    assert result.exit_code != 0 and "the manifest says" in _one_line(result), result.output
    assert not (tmp_path / "dst" / "manifest.json").exists()


@pytest.mark.slow
def test_train_student_refuses_every_tampered_cache(tampered: Callable[[str], Path], tiny_family, tmp_path: Path) -> None:
    runner = CliRunner()

    def train(cache: Path, out: Path, *extra: str) -> Result:
        # 48 rows in 3 shards, 16 per batch, 3 steps: one epoch opens every shard
        args = ["train-student", "--cache", str(cache), "--student", str(tiny_family.student), "--out", str(out), "--full", "--max-steps", "3",
                "--batch-size", "16", "--max-length", "48", "--precision", "fp32", "--save-steps", "100", "--set", "train_student.shuffle_buffer=1", *extra]  # fmt: skip
        return runner.invoke(app, args)

    ok = train(tampered("untouched"), tmp_path / "student-ok")
    assert ok.exit_code == 0 and "trained" in ok.output, ok.output
    refused = 0
    for i, case in enumerate(CASES):
        out = tmp_path / f"student-{i}"
        result = train(tampered(case), out)
        assert result.exit_code != 0, f"train-student trained on {case}: {result.output}"
        _one_line(result)
        assert not (out / "manifest.json").exists() and not (out / "model").exists()
        refused += 1
    print(f"train-student refused {refused} of {len(CASES)} tampered caches")
    in_worker = train(tampered("bit flip 0"), tmp_path / "student-worker", "--workers", "1")  # the check runs in a DataLoader process
    assert in_worker.exit_code != 0 and "sha256" in _one_line(in_worker) and "Original Traceback" not in in_worker.output
