"""`pkd train-student` on the tiny family: outputs, resume, α = 0, refusals, damage, 2 processes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from transformers import TrainerCallback
from typer.testing import CliRunner

from pkd.cli import app
from pkd.config import RunConfig, TrainStudentConfig
from pkd.errors import CompatibilityError, IntegrityError
from pkd.records import Manifest
from pkd.steps.train_student import train_student
from pkd.store import Folder
from pkd.student.data import mean_weight
from scored_cache import score_cache

REPO = Path(__file__).resolve().parent.parent


def config(family, cache: str, out: Path, **kw) -> TrainStudentConfig:
    base = dict(cache=cache, student=str(family.student), out=str(out), learning_rate=3e-3, per_device_batch_size=4, max_length=64, logging_steps=1, save_steps=3, max_steps=6, precision="fp32", shuffle_buffer=64)
    return TrainStudentConfig(**(base | kw))


def losses(out: Path) -> list[float]:
    return [h["loss"] for h in json.loads((out / "report.json").read_text())["log_history"] if "loss" in h]


class StopAt(TrainerCallback):
    """Simulates an interruption right after the checkpoint of step `n`."""

    def __init__(self, n: int) -> None:
        self.n = n

    def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001
        if state.global_step >= self.n:
            control.should_training_stop = True
        return control


def test_trains_lora_and_writes_outputs(tiny_family, scored_cache, tmp_path):
    cfg = config(tiny_family, scored_cache, tmp_path / "s", max_steps=4, save_steps=10)
    res = train_student(cfg, RunConfig())
    assert res.status == "trained" and res.steps == 4 and res.tokens > 0
    out = tmp_path / "s"
    targets = json.loads((out / "model" / "adapter_config.json").read_text())["target_modules"]
    assert len(targets) > 2 and targets == sorted(targets)  # not PEFT's string-hash order
    report = json.loads((out / "report.json").read_text())
    logged = [h for h in report["log_history"] if "loss" in h]
    assert len(logged) == 4 and {"ce", "kl", "w_mean", "w_std", "w_min", "w_max", "tokens"} <= set(logged[0])
    assert all(0 < h["w_min"] <= h["w_mean"] <= h["w_max"] < 1 for h in logged)
    assert all(h["kl"] > 0 for h in logged)
    m = Folder(str(out)).read_manifest()
    assert m.kind == "student" and m.complete and m.inputs["cache"].startswith("logits-")
    assert m.config["alpha"] == 1.0 and any(f.path == "model/adapter_config.json" for f in m.files)
    again = train_student(cfg, RunConfig())
    assert again.status == "up to date"


def test_the_summary_counts_every_token_when_logging_steps_exceed_the_steps(tiny_family, scored_cache, tmp_path):
    """--logging-steps 10 over 3 steps: the last step is logged, so the summary's tokens are those
    of all 3 steps (it said "0 tokens"), the same as logging every step."""
    every = train_student(config(tiny_family, scored_cache, tmp_path / "a", max_steps=3, save_steps=10), RunConfig())
    rare = train_student(config(tiny_family, scored_cache, tmp_path / "b", max_steps=3, save_steps=10, logging_steps=10), RunConfig())
    assert rare.tokens > 0 and rare.tokens == every.tokens and rare.final and rare.final["loss"] > 0


def test_a_seed_fixes_the_lora_initialisation(tiny_family, scored_cache, tmp_path):
    """Trainer seeds only once the model exists; the adapter's A matrices are drawn before that,
    so a seed must cover them too, or one seed gives two different students."""
    import torch

    def adapter(name: str, seed: int) -> dict[str, torch.Tensor]:
        train_student(config(tiny_family, scored_cache, tmp_path / name, max_steps=2, save_steps=10), RunConfig(seed=seed))
        from safetensors.torch import load_file

        return load_file(tmp_path / name / "model" / "adapter_model.safetensors")

    a, again, other = adapter("a", 1), adapter("again", 1), adapter("other", 2)
    assert all(torch.equal(a[k], again[k]) for k in a)
    assert not all(torch.equal(a[k], other[k]) for k in a)


def test_resume_continues_the_uninterrupted_run(tiny_family, scored_cache, tmp_path):
    kw = dict(lora=False, max_steps=6, save_steps=3)
    full = train_student(config(tiny_family, scored_cache, tmp_path / "a", **kw), RunConfig())
    stopped = train_student(config(tiny_family, scored_cache, tmp_path / "b", **kw), RunConfig(), callbacks=[StopAt(3)])
    assert stopped.status == "stopped" and stopped.steps == 3
    assert (tmp_path / "b" / "checkpoints" / "checkpoint-3").is_dir() and not (tmp_path / "b" / "manifest.json").exists()
    resumed = train_student(config(tiny_family, scored_cache, tmp_path / "b", **kw), RunConfig())
    assert full.status == resumed.status == "trained"
    a, b = losses(tmp_path / "a"), losses(tmp_path / "b")
    assert len(a) == len(b) == 6 and len(set(a)) > 1
    np.testing.assert_allclose(a, b, rtol=1e-4)


def test_alpha_zero_is_sft_through_the_same_path(tiny_family, scored_cache, tmp_path):
    train_student(config(tiny_family, scored_cache, tmp_path / "s", alpha=0.0, max_steps=2, uniform_weights=True), RunConfig())
    logged = [h for h in json.loads((tmp_path / "s" / "report.json").read_text())["log_history"] if "loss" in h]
    folder = Folder(scored_cache)
    mean_w = mean_weight(folder, folder.read_manifest())  # --uniform-weights: every w = E[w] of the cache
    assert all(h["kl"] == 0 and h["w_mean"] == pytest.approx(mean_w, abs=1e-5) and h["w_std"] == 0 for h in logged)
    assert logged[0]["loss"] == pytest.approx(logged[0]["ce"], abs=1e-4)


def test_refuses_a_cache_for_another_tokenizer(tiny_family, tmp_path):
    uri = str(tmp_path / "other")
    score_cache(tiny_family, uri, n=4, tokenizer_fp="tok-someone-else")
    with pytest.raises(CompatibilityError, match="tokenizer fingerprint tok-someone-else"):
        train_student(config(tiny_family, uri, tmp_path / "s"), RunConfig())
    result = CliRunner().invoke(app, ["train-student", "--cache", uri, "--student", str(tiny_family.student), "--out", str(tmp_path / "s")])
    assert result.exit_code == 3 and "tokenizer fingerprint" in result.output


def test_corrupted_shard_stops_with_its_name_and_keeps_the_checkpoint(tiny_family, scored_cache, tmp_path):
    cache = tmp_path / "cache"
    shutil.copytree(scored_cache, cache)
    manifest = Folder(str(cache)).read_manifest()
    last = int(np.random.default_rng([0, 0]).permutation(len(manifest.files))[-1])  # read last in epoch 0
    victim = manifest.files[last].path
    data = bytearray((cache / victim).read_bytes())
    row_group = pq.ParquetFile(cache / victim).metadata.row_group(0)
    entries = next(row_group.column(c) for c in range(row_group.num_columns) if row_group.column(c).path_in_schema == "ids.list.element")  # the coded top-k ids, not read before training
    data[entries.data_page_offset + 40] ^= 0x10  # one bit: only its sha256 can tell
    (cache / victim).write_bytes(bytes(data))
    cfg = config(tiny_family, str(cache), tmp_path / "s", lora=False, shuffle_buffer=1, max_steps=12, save_steps=2)
    with pytest.raises(IntegrityError, match=f"{victim}: sha256"):
        train_student(cfg, RunConfig())  # 2 healthy shards = 32 samples = 8 steps of 4
    ckpt = tmp_path / "s" / "checkpoints" / "checkpoint-8"
    assert json.loads((ckpt / "trainer_state.json").read_text())["global_step"] == 8
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(ckpt)


@pytest.mark.slow
def test_two_processes_match_one_with_the_same_global_batch(tiny_family, scored_cache, tmp_path):
    common = ["--cache", scored_cache, "--student", str(tiny_family.student), "--full", "--lr", "3e-3", "--max-steps", "4", "--max-length", "64", "--logging-steps", "1", "--precision", "fp32", "--data-streams", "2"]
    env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cli = str(REPO / "cli.py")
    subprocess.run([sys.executable, cli, "train-student", *common, "--batch-size", "4", "--out", str(tmp_path / "one")], check=True, env=env, cwd=tmp_path)
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533"]
    subprocess.run([*launcher, cli, "train-student", *common, "--batch-size", "2", "--out", str(tmp_path / "two")], check=True, env=env, cwd=tmp_path)
    one, two = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert len(one) == len(two) == 4
    np.testing.assert_allclose(one, two, rtol=1e-3)
    m = Folder(str(tmp_path / "two")).read_manifest(Manifest)
    assert m.config["processes"] == 2 and m.config["data_streams"] == 2
