"""`pkd cache ...` end to end through the CLI, on local paths, memory:// and a local S3 server."""

import json
import os
import shutil

import pytest
from typer.testing import CliRunner

from pkd.cli import app
from synthetic import make_samples, write_cache

runner = CliRunner()


def pkd(*args: str):
    return runner.invoke(app, list(args))


@pytest.fixture
def cache(tmp_path) -> str:
    uri = str(tmp_path / "cache")
    write_cache(uri, make_samples(24, k=8), shard_rows=8)
    return uri


def test_help_lists_commands() -> None:
    out = pkd("--help").output
    assert "cache" in out and "recipe" in out
    out = pkd("cache", "--help").output
    for cmd in ("inspect", "verify", "merge", "push", "pull"):
        assert cmd in out


def test_inspect(cache: str) -> None:
    r = pkd("cache", "inspect", cache)
    assert r.exit_code == 0, r.output
    assert "24 /" in r.output and "bytes per token" in r.output and "tok-test" in r.output
    data = json.loads(pkd("cache", "inspect", cache, "--json").output)
    assert data["rows"] == 24 and data["codec"]["k"] == 8 and sum(data["seq_logprob_histogram"]["counts"]) == 24


def test_verify_ok(cache: str) -> None:
    r = pkd("cache", "verify", cache)
    assert r.exit_code == 0 and "3 files verified" in r.output


def _shard(cache: str, i: int = 1) -> str:
    return os.path.join(cache, "data", f"part-00000-{i:05d}.parquet")


def test_verify_missing_shard(cache: str) -> None:
    os.remove(_shard(cache))
    r = pkd("cache", "verify", cache)
    assert r.exit_code == 1 and "part-00000-00001.parquet: missing" in r.stderr


def test_verify_truncated_shard(cache: str) -> None:
    data = open(_shard(cache), "rb").read()
    open(_shard(cache), "wb").write(data[: len(data) // 2])
    r = pkd("cache", "verify", cache)
    assert r.exit_code == 1 and "truncated" in r.stderr and "part-00000-00001" in r.stderr


def test_verify_corrupted_shard_same_size(cache: str) -> None:
    data = bytearray(open(_shard(cache, 2), "rb").read())
    data[len(data) // 2] ^= 0xFF
    open(_shard(cache, 2), "wb").write(bytes(data))
    r = pkd("cache", "verify", cache)
    assert r.exit_code == 1 and "part-00000-00002.parquet: sha256" in r.stderr and "corrupted" in r.stderr


def test_verify_tampered_manifest_sha(cache: str) -> None:
    path = os.path.join(cache, "manifest.json")
    m = json.load(open(path))
    m["files"][0]["sha256"] = "f" * 64
    json.dump(m, open(path, "w"))
    r = pkd("cache", "verify", cache)
    assert r.exit_code == 1 and "part-00000-00000.parquet: sha256" in r.stderr
    assert "1 problem(s)" in r.stderr


def test_verify_stray_file(cache: str) -> None:
    shutil.copy(_shard(cache), os.path.join(cache, "data", "extra.parquet"))
    r = pkd("cache", "verify", cache)
    assert r.exit_code == 1 and "extra.parquet: not listed" in r.stderr


def test_unsafe_manifest_path_refused_by_pull(cache: str, tmp_path) -> None:
    path = os.path.join(cache, "manifest.json")
    m = json.load(open(path))
    m["files"][0]["path"] = "../../outside.parquet"
    json.dump(m, open(path, "w"))
    r = pkd("cache", "pull", cache, str(tmp_path / "dst"))
    assert r.exit_code == 1 and "unsafe path" in r.stderr
    assert not (tmp_path / "outside.parquet").exists() and not (tmp_path / "dst").exists()


def test_no_manifest(tmp_path) -> None:
    r = pkd("cache", "inspect", str(tmp_path))
    assert r.exit_code == 1 and "no manifest here" in r.stderr and "Traceback" not in r.output


def test_missing_backend_says_what_to_install() -> None:
    r = pkd("cache", "inspect", "gcs://bucket/cache")
    assert r.exit_code == 1 and "gcsfs" in r.stderr


def test_merge_parts_equals_whole(tmp_path) -> None:
    samples = make_samples(30, k=8)
    whole = write_cache(str(tmp_path / "whole"), samples, shard_rows=8)
    write_cache(str(tmp_path / "p0"), samples[:12], shard_rows=8, part=0)
    write_cache(str(tmp_path / "p1"), samples[12:], shard_rows=8, part=1)
    r = pkd("cache", "merge", str(tmp_path / "merged"), str(tmp_path / "p0"), str(tmp_path / "p1"))
    assert r.exit_code == 0, r.output
    merged = json.load(open(tmp_path / "merged" / "manifest.json"))
    assert merged["complete"] and merged["counts"] == {"rows": 30, "tokens": whole.tokens}
    assert merged["seq_logprob"]["mu"] == pytest.approx(whole.seq_logprob.mu, rel=1e-12)
    assert merged["seq_logprob"]["gamma"] == pytest.approx(whole.seq_logprob.gamma, rel=1e-12)
    assert pkd("cache", "verify", str(tmp_path / "merged")).exit_code == 0


def test_merge_refuses_different_tokenizer(tmp_path) -> None:
    write_cache(str(tmp_path / "a"), make_samples(4, k=8, prefix="a"), tokenizer_fp="tok-aaa")
    write_cache(str(tmp_path / "b"), make_samples(4, k=8, prefix="b"), tokenizer_fp="tok-bbb")
    r = pkd("cache", "merge", str(tmp_path / "m"), str(tmp_path / "a"), str(tmp_path / "b"))
    assert r.exit_code == 3 and "tokenizer_fingerprint: 'tok-aaa' vs 'tok-bbb'" in r.stderr
    assert not (tmp_path / "m").exists()


def test_merge_refuses_different_k_and_overlap(tmp_path) -> None:
    write_cache(str(tmp_path / "a"), make_samples(4, k=8))
    write_cache(str(tmp_path / "b"), make_samples(4, k=4))
    r = pkd("cache", "merge", str(tmp_path / "m"), str(tmp_path / "a"), str(tmp_path / "b"))
    assert r.exit_code == 3 and "codec" in r.stderr
    write_cache(str(tmp_path / "c"), make_samples(4, k=8))
    r = pkd("cache", "merge", str(tmp_path / "m"), str(tmp_path / "a"), str(tmp_path / "c"))
    assert r.exit_code == 3 and "sample 's00000' is in both" in r.stderr


def test_push_pull_memory_roundtrip(cache: str, tmp_path) -> None:
    r = pkd("cache", "push", cache, "memory://shared/run1")
    assert r.exit_code == 0 and "3 of 3 files" in r.output, r.output
    r = pkd("cache", "pull", "memory://shared/run1", str(tmp_path / "pulled"))
    assert r.exit_code == 0, r.output
    assert pkd("cache", "verify", str(tmp_path / "pulled")).exit_code == 0
    r = pkd("cache", "pull", "memory://shared/run1", str(tmp_path / "pulled"))
    assert r.exit_code == 0 and "0 of 3 files" in r.output  # already there: nothing re-sent


def test_pull_refuses_corrupted_source(cache: str, tmp_path) -> None:
    data = bytearray(open(_shard(cache), "rb").read())
    data[100] ^= 0xFF
    open(_shard(cache), "wb").write(bytes(data))
    r = pkd("cache", "pull", cache, str(tmp_path / "dst"))
    assert r.exit_code == 1 and "part-00000-00001.parquet: sha256 does not match" in r.stderr
    assert not (tmp_path / "dst" / "manifest.json").exists()
    assert not (tmp_path / "dst" / "data" / "part-00000-00001.parquet").exists()


def test_file_uri(cache: str, tmp_path) -> None:
    r = pkd("cache", "push", cache, f"file://{tmp_path}/viafile")
    assert r.exit_code == 0, r.output
    assert pkd("cache", "verify", f"file://{tmp_path}/viafile").exit_code == 0


@pytest.fixture(scope="module")
def s3_server():
    """A real S3-compatible server (moto's server mode) on 127.0.0.1, reached through s3fs. It runs
    in its own process: importing flask here would break in-process vLLM in later tests (vLLM's
    kernel rebinding probes every module attribute, and flask's context proxies raise)."""
    import subprocess
    import sys
    import time

    import httpx

    from pkd.engines.serve import free_port

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            httpx.get(endpoint, timeout=2)
            break
        except httpx.TransportError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError("moto server did not start") from None
            time.sleep(0.2)
    env = {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    import s3fs

    with pytest.MonkeyPatch.context() as mp:
        for k, v in env.items():
            mp.setenv(k, v)
        s3fs.S3FileSystem.clear_instance_cache()
        s3fs.S3FileSystem().mkdir("pkd-test")
        yield
    proc.terminate()
    proc.wait(10)


def test_push_pull_s3(s3_server, cache: str, tmp_path) -> None:
    r = pkd("cache", "push", cache, "s3://pkd-test/caches/run1")
    assert r.exit_code == 0, r.output + r.stderr
    assert pkd("cache", "verify", "s3://pkd-test/caches/run1").exit_code == 0
    assert json.loads(pkd("cache", "inspect", "s3://pkd-test/caches/run1", "--json").output)["rows"] == 24
    r = pkd("cache", "pull", "s3://pkd-test/caches/run1", str(tmp_path / "from-s3"))
    assert r.exit_code == 0, r.output + r.stderr
    assert pkd("cache", "verify", str(tmp_path / "from-s3")).exit_code == 0


def _part(i: int, n: int, chunks: list[int], **config) -> "LogitCacheManifest":
    """A manifest as `pkd cache-logits --part i/n` writes it (files named by chunk)."""
    from synthetic import header

    from pkd.records import FileEntry

    m = header(k=8)
    m.config = {"k": 8, "part": f"{i}/{n}", "shard_rows": 8} | config
    m.files = [FileEntry(path=f"data/part-{i:05d}-{c:05d}.parquet", sha256="0" * 64, bytes=1, rows=1) for c in chunks]
    return m


def test_only_all_the_parts_of_one_run_are_put_back_as_that_run() -> None:
    """Parts of one run are reassembled in chunk order; caches that are not parts are
    concatenated; parts over the same samples that are not exactly one run's N parts are refused
    (some parts missing, other settings, a part twice, a renamed shard)."""
    from pkd.cache.ops import run_of_parts
    from pkd.errors import CompatibilityError, IntegrityError
    from synthetic import header

    assert run_of_parts([_part(1, 3, [1, 4]), _part(0, 3, [0, 3, 6]), _part(2, 3, [2])]) == [[1, 4], [0, 3, 6], [2]]
    assert run_of_parts([header(k=8), header(k=8)]) is None  # not parts: concatenated
    assert run_of_parts([_part(0, 2, [0]), _part(1, 2, [1]).model_copy(update={"inputs": {"samples": "other"}})]) is None
    with pytest.raises(CompatibilityError, match="2 of the 3 parts of one cache-logits run: 1/3 missing"):
        run_of_parts([_part(0, 3, [0]), _part(2, 3, [2])])
    with pytest.raises(CompatibilityError, match="settings differ: shard_rows"):
        run_of_parts([_part(0, 2, [0]), _part(1, 2, [1], shard_rows=4)])
    with pytest.raises(CompatibilityError, match="split 2 and 3 ways"):
        run_of_parts([_part(0, 2, [0]), _part(1, 3, [1]), _part(2, 3, [2])])
    with pytest.raises(CompatibilityError, match="1/2 given more than once"):
        run_of_parts([_part(0, 2, [0]), _part(1, 2, []), _part(1, 2, [])])
    with pytest.raises(IntegrityError, match="part 1/2 lists data/part-00001-00002.parquet, not a shard that part writes"):
        run_of_parts([_part(0, 2, [0]), _part(1, 2, [2])])
