"""Publishing what was made, offline: the student's model card and `pkd push-model --dry-run`
(one commit's plan, the card); `pkd teacher-export` as a conversational dataset TRL reads; the
cache's dataset card with its license/terms, size, task and model names."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from pkd.cache.hub import dataset_card, parse_hub_uri
from pkd.student.hub import parse_model_uri, push_model
from pkd.cache.ops import read_cache_manifest
from pkd.cli import app
from pkd.config import RunConfig, TrainStudentConfig
from pkd.errors import ConfigError, IntegrityError
from pkd.steps.train_student import train_student
from pkd.store import Folder
from synthetic import make_samples, write_cache
from test_eval import write_teacher_samples

EVAL = {
    "model": "student/model", "samples": "teacher", "split": "distill", "nll_per_token": 1.2345, "top1_agreement": 0.5, "exact_match": 0.25,
    "benchmarks": {"lm_eval_version": "0.4.9", "tasks": {"arith": {"exact_match,none": 0.4, "exact_match_stderr,none": 0.05, "sample_len": 12}}, "samples": {"arith": 10}},
}  # fmt: skip


@pytest.fixture(scope="module")
def student(tiny_family, scored_cache, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("student") / "s"
    cfg = TrainStudentConfig(cache=scored_cache, student=str(tiny_family.student), out=str(out), max_steps=2, max_length=64, precision="fp32", report_to=["none"])
    assert train_student(cfg, RunConfig(), command="pkd train-student --cache C --student S").status == "trained"
    return out


def test_the_student_folder_has_a_model_card(student):
    card = (student / "README.md").read_text()
    header = yaml.safe_load(card.split("---")[1])
    assert header["library_name"] == "peft" and "knowledge-distillation" in header["tags"]
    assert "tiny-teacher" in card and "α (KD strength) | 1.0" in card and "pkd train-student --cache C --student S" in card
    assert any(f.path == "README.md" for f in Folder(str(student)).read_manifest().files)


def test_push_model_dry_run_prints_the_card_and_one_commit(student, tmp_path):
    (tmp_path / "eval.json").write_text(json.dumps(EVAL))
    cmd = ["push-model", str(student), "hf://acme/tiny-student", "--dry-run", "--eval", str(tmp_path / "eval.json"), "--license", "apache-2.0"]
    r = CliRunner().invoke(app, cmd, terminal_width=200)
    assert r.exit_code == 0, r.output
    assert "one commit to model acme/tiny-student:" in r.output
    for path in ("adapter_config.json", "adapter_model.safetensors", "pkd_report.json", "README.md"):
        assert f"  {path}  <- " in r.output, path
    assert "license: apache-2.0" in r.output and "| NLL / token | 1.2345 |" in r.output
    assert "| arith | exact_match | 0.4000 | 0.0500 |" in r.output and "sample_len" not in r.output  # a count, not a metric


def test_push_model_refuses_a_changed_folder_and_a_dataset_uri(student, tmp_path):
    with pytest.raises(ConfigError, match="hf://ORG/NAME"):
        parse_model_uri("hf://datasets/acme/x")
    assert parse_model_uri("hf://acme/m@v2").revision == "v2"
    copy = tmp_path / "copy"
    import shutil

    shutil.copytree(student, copy)
    (copy / "model" / "adapter_config.json").write_text("{}")
    with pytest.raises(IntegrityError, match="adapter_config.json"):
        push_model(copy, "hf://acme/m", tmp_path, dry_run=True)


def test_teacher_export_is_a_conversational_dataset(tiny_family, tmp_path):
    import datasets
    from transformers import AutoTokenizer
    from trl.data_utils import is_conversational

    teacher = str(tmp_path / "teacher")
    write_teacher_samples(teacher)
    r = CliRunner().invoke(app, ["teacher-export", teacher, str(tmp_path / "out"), "--license", "Provider terms of use, see https://example.com/terms"], terminal_width=200)
    assert r.exit_code == 0, r.output
    rows = datasets.load_dataset(str(tmp_path / "out"), split="train")
    assert len(rows) == 10
    row = rows[0]
    assert is_conversational(row) and row["messages"][-1]["role"] == "assistant" and row["messages"][:-1] == row["prompt"]
    assert row["completion"] == row["messages"][-1:]
    tok = AutoTokenizer.from_pretrained(tiny_family.tokenizer)
    assert row["messages"][-1]["content"] in tok.apply_chat_template(row["messages"], tokenize=False)
    card = (tmp_path / "out" / "README.md").read_text()
    assert "license: other" in card and "Provider terms of use" in card and "n<1K" in card
    hub = CliRunner().invoke(app, ["teacher-export", teacher, "hf://datasets/acme/tiny-teacher", "--split", "distill", "--dry-run"], terminal_width=200)
    assert hub.exit_code == 0 and "one commit to dataset acme/tiny-teacher: 2 files" in hub.output and "data/train-00000.parquet" in hub.output


def test_cache_card_has_license_size_task_and_model_names(tmp_path):
    uri = str(tmp_path / "cache")
    write_cache(uri, make_samples(24, k=8), shard_rows=8)
    card = dataset_card(read_cache_manifest(Folder(uri)), parse_hub_uri("hf://datasets/acme/c"), license="cc-by-4.0", proxy="acme/proxy-70b", student="acme/student-7b")
    header = yaml.safe_load(card.split("---")[1])
    assert header["license"] == "cc-by-4.0" and header["size_categories"] == ["n<1K"] and header["task_categories"] == ["text-generation"]
    assert "| teacher model | teacher-test |" in card and "| proxy model | acme/proxy-70b |" in card and "acme/student-7b" in card
    r = CliRunner().invoke(app, ["cache", "push", uri, "hf://datasets/acme/c", "--dry-run", "--license", "API terms", "--proxy-name", "p"], terminal_width=200)
    assert r.exit_code == 0 and "license: other" in r.output and 'license_name: "API terms"' in r.output
