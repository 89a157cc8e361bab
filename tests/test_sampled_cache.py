"""Sampled (RS-KD) caches end to end on the tiny family: `pkd cache-logits --sampled N` draws
from the proxy's full distribution, seeded per sample (parts and resumption draw the same ids),
and the cache verifies, merges and trains like a top-k one; format v1 caches still read."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from pkd.cache.codec import TopkCodec
from pkd.cache.ops import merge, verify
from pkd.cache.shards import LogitCacheWriter, iter_samples
from pkd.config import RunConfig
from pkd.errors import CompatibilityError
from pkd.records import LogitCacheManifest
from pkd.steps.cache_logits import run_cache_logits
from pkd.store import Folder
from tests.synthetic import make_samples
from tests.test_cache_logits import config, hf_cache, root, samples, tokenizer  # noqa: F401  (fixtures)

N = 12


@pytest.fixture(scope="module")
def sampled_cache(root: Path) -> str:  # noqa: F811
    run_cache_logits(config(root, "sampled", mode="sampled", samples=N), RunConfig(), progress=False)
    return str(root / "sampled")


def test_sampled_cache_holds_draws_from_the_full_distribution(root: Path, sampled_cache: str, tiny_family) -> None:  # noqa: F811
    from transformers import AutoModelForCausalLM
    from peft import PeftModel

    folder = Folder(sampled_cache)
    manifest = folder.read_manifest()
    assert manifest.format_version == 2 and manifest.codec["name"] == "sampled" and manifest.codec["k"] == N
    assert verify(folder).ok
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(tiny_family.proxy)), str(root / "proxy" / "adapter")).eval()
    top_freq, top_p, n_positions = 0.0, 0.0, 0
    for s in samples(sampled_cache).values():
        assert (s.counts.sum(1) == N).all()
        with torch.no_grad():
            logits = model(torch.as_tensor(s.input_ids[None].astype(np.int64))).logits[0, s.response_start - 1 : -1]
        lp = torch.log_softmax(logits.float(), -1).numpy()  # (T, V)
        valid = s.counts > 0
        rows = np.nonzero(valid)[0]
        np.testing.assert_allclose(s.topk_logprobs[valid], lp[rows, s.topk_ids[valid]], atol=0.06)  # quantised
        top = lp.argmax(1)
        top_freq += float(np.where(s.topk_ids == top[:, None], s.counts, 0).sum()) / N
        top_p += float(np.exp(lp.max(1)).sum())
        n_positions += len(lp)
    # Σ_t (draws of the argmax)/N estimates Σ_t p_t(argmax): within 4 standard errors (≤ ½/√(N·T))
    assert abs(top_freq - top_p) < 4 * 0.5 * (n_positions / N) ** 0.5


def test_parts_draw_the_same_ids_as_one_run(root: Path, sampled_cache: str, hf_cache: str) -> None:  # noqa: F811
    for i in range(2):
        run_cache_logits(config(root, f"sampled-part{i}", mode="sampled", samples=N, part=f"{i}/2", batch_tokens=300), RunConfig(), progress=False)
    merged = Folder(str(root / "sampled-merged"))
    merge([Folder(str(root / f"sampled-part{i}")) for i in range(2)], merged)
    whole, joined = samples(sampled_cache), samples(merged.uri)
    assert set(whole) == set(joined)
    for sid, a in whole.items():
        b = joined[sid]
        np.testing.assert_array_equal(a.topk_ids, b.topk_ids)
        np.testing.assert_array_equal(a.counts, b.counts)
    with pytest.raises(CompatibilityError, match="codec"):
        merge([Folder(sampled_cache), Folder(hf_cache)], Folder(str(root / "mixed")))


def test_sampled_mode_refuses_vllm_in_one_line(root: Path, tmp_path: Path) -> None:  # noqa: F811
    from typer.testing import CliRunner

    from pkd.cli import app

    result = CliRunner().invoke(app, ["cache-logits", "--teacher", str(root / "teacher"), "--proxy", str(root / "proxy"), "--sampled", "4", "--engine", "vllm", "--out", str(tmp_path / "out")])
    assert result.exit_code != 0 and "transformers engine" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "out").exists()
    result = CliRunner().invoke(app, ["cache-logits", "--teacher", str(root / "teacher"), "--proxy", str(root / "proxy"), "--sampled", "0", "--out", str(tmp_path / "out")])
    assert result.exit_code != 0 and "'samples'" in result.output and "Traceback" not in result.output


def test_inspect_shows_the_sampled_codec(sampled_cache: str) -> None:
    from typer.testing import CliRunner

    from pkd.cli import app

    result = CliRunner().invoke(app, ["cache", "inspect", sampled_cache])
    assert result.exit_code == 0, result.output
    assert "sampled v1" in result.output and "v2" in result.output


def test_format_v1_caches_still_read_verify_and_merge(tmp_path: Path) -> None:
    """A cache written by pkd before format v2 (codec topk v1, no id table) decodes as before."""
    parts = []
    for p in range(2):
        folder = Folder(str(tmp_path / f"v1-{p}"))
        codec = TopkCodec(k=4, vocab_size=50)
        header = LogitCacheManifest(format_version=1, codec=codec.spec(), vocab_size=50, tokenizer_fingerprint="tok", proxy_fingerprint="proxy", teacher_model="t")
        writer = LogitCacheWriter(folder, header, shard_rows=3, part=p)
        written = make_samples(5, k=4, seed=p, vocab=50, prefix=f"p{p}-")
        for s in written:
            writer.add(s)
        writer.close()
        parts.append(folder)
        assert verify(folder).ok
        got = list(iter_samples(folder, folder.read_manifest()))
        assert [s.sample_id for s in got] == [s.sample_id for s in written]
        np.testing.assert_array_equal(got[0].topk_ids, written[0].topk_ids)
    out = Folder(str(tmp_path / "v1-merged"))
    merged = merge(parts, out)
    assert merged.format_version == 1 and merged.rows == 10 and verify(out).ok


def test_train_student_on_a_sampled_cache(tiny_family, sampled_cache: str, tmp_path: Path) -> None:
    """The trainer picks the RS-KD loss for a sampled cache; CE and the KL estimate are logged."""
    import json

    from pkd.config import TrainStudentConfig
    from pkd.steps.train_student import train_student

    cfg = TrainStudentConfig(cache=sampled_cache, student=str(tiny_family.student), out=str(tmp_path / "s"), learning_rate=3e-3, per_device_batch_size=4, max_length=64, logging_steps=1, max_steps=4, save_steps=10, precision="fp32", shuffle_buffer=64, data_streams=1)
    assert train_student(cfg, RunConfig()).status == "trained"
    logged = [h for h in json.loads((tmp_path / "s" / "report.json").read_text())["log_history"] if "loss" in h]
    assert len(logged) == 4 and all(np.isfinite(h["loss"]) and h["kl"] > 0 and h["ce"] > 0 for h in logged)


def test_train_student_refuses_a_kd_temperature_other_than_the_proposal(tiny_family, sampled_cache: str, tmp_path: Path) -> None:
    """T ≠ τ biases the RS-KD gradient (bench/rs_kd_bias.py): one line saying how to redraw, and
    nothing written; it used to train silently."""
    from typer.testing import CliRunner

    from pkd.cli import app

    out = tmp_path / "s"
    result = CliRunner().invoke(app, ["train-student", "--cache", sampled_cache, "--student", str(tiny_family.student), "--out", str(out), "--temperature", "2"])
    errors = [x for x in result.output.splitlines() if x.startswith("error:")]
    assert result.exit_code != 0 and len(errors) == 1 and "Traceback" not in result.output, result.output
    assert "unbiased only at T = τ" in errors[0] and f"--sampled {N} --proposal-temperature 2" in errors[0]
    assert not [p for p in out.rglob("*") if p.is_file()]
