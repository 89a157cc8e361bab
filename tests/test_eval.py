"""`pkd eval` on teacher-sample output: metrics by hand, base vs adapter vs merged, the CLI."""

from __future__ import annotations

import json
import math
import re

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from typer.testing import CliRunner

from pkd.cli import app
from pkd.config import EvalConfig, RunConfig, TrainStudentConfig
from pkd.records import FileEntry, Manifest
from pkd.teacher.splits import split_of
from pkd.answers import matches, stated_answer
from pkd.steps.evaluate import encode, evaluate
from pkd.teacher.samples import sample_schema
from pkd.steps.train_student import train_student
from pkd.store import Folder
from pkd.models.tiny import synthetic_tasks


def write_teacher_samples(uri: str, n: int = 10) -> None:
    """A `pkd teacher-sample`-shaped folder: one shard + manifest; every other row has a reference."""
    rows = []
    for i, (prompt, answer) in enumerate(synthetic_tasks(n, seed=1)):
        pid = f"p{i}"
        rows.append({
            "sample_id": f"{pid}#0", "prompt_id": pid, "sample_index": 0, "split": split_of(pid),
            "messages": [{"role": "user", "content": prompt}], "response": answer, "finish_reason": "stop",
            "usage": None, "latency_s": 0.1, "teacher": "tiny", "reference": answer if i % 2 == 0 else None, "logprobs": None,
        })  # fmt: skip
    sink = pa.BufferOutputStream()
    pq.write_table(pa.Table.from_pylist(rows, schema=sample_schema()), sink)
    folder = Folder(uri)
    folder.write_bytes("shards/part-00000.parquet", sink.getvalue().to_pybytes())
    entry = FileEntry(path="shards/part-00000.parquet", sha256=folder.sha256("shards/part-00000.parquet"), bytes=folder.size("shards/part-00000.parquet"), rows=n)
    folder.write_manifest(Manifest(kind="teacher", complete=True, files=[entry]))


@pytest.fixture(scope="module")
def teacher_samples(tmp_path_factory) -> str:
    uri = str(tmp_path_factory.mktemp("teacher"))
    write_teacher_samples(uri)
    return uri


def test_metrics_match_a_direct_computation(tiny_family, teacher_samples):
    report = evaluate(EvalConfig(model=str(tiny_family.student), samples=teacher_samples, batch_size=3, max_new_tokens=8), RunConfig())
    assert report["rows"] == 10 and report["exact_match_rows"] == 5 and 0 <= report["exact_match"] <= 1
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_family.student)
    model = AutoModelForCausalLM.from_pretrained(tiny_family.student)
    nll = hits = count = 0.0
    for prompt, answer in synthetic_tasks(10, seed=1):
        ids, start = encode(tok, [{"role": "user", "content": prompt}], answer, 1024)
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([ids])).logits[0], -1)[start - 1 : -1]  # (T, V)
        target = torch.tensor(ids[start:])
        nll -= float(logp.gather(1, target[:, None]).sum())
        hits += float((logp.argmax(-1) == target).sum())
        count += len(target)
    assert report["tokens"] == count
    assert report["nll_per_token"] == pytest.approx(nll / count, rel=1e-5)
    assert report["top1_agreement"] == pytest.approx(hits / count)
    assert report["perplexity"] == pytest.approx(math.exp(nll / count), rel=1e-5)


def test_adapter_and_merged_model_agree(tiny_family, scored_cache, teacher_samples, tmp_path):
    cfg = TrainStudentConfig(cache=scored_cache, student=str(tiny_family.student), out=str(tmp_path / "s"), learning_rate=1e-2, max_steps=2, max_length=64, precision="fp32")
    train_student(cfg, RunConfig())
    adapter = tmp_path / "s" / "model"
    ev = lambda m: evaluate(EvalConfig(model=str(m), samples=teacher_samples, split="all", max_new_tokens=4), RunConfig())  # noqa: E731
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    merged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_family.student), str(adapter)).merge_and_unload()
    merged.save_pretrained(tmp_path / "merged")
    AutoTokenizer.from_pretrained(tiny_family.student).save_pretrained(tmp_path / "merged")
    a, m, base = ev(adapter), ev(tmp_path / "merged"), ev(tiny_family.student)
    assert a["nll_per_token"] == pytest.approx(m["nll_per_token"], rel=1e-4)
    assert a["nll_per_token"] != pytest.approx(base["nll_per_token"], rel=1e-6)


def test_cli_prints_json_and_writes_the_report(tiny_family, teacher_samples, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "r.json"
    result = CliRunner().invoke(app, ["eval", "--model", str(tiny_family.student), "--samples", teacher_samples, "--limit", "4", "--json", "--out", str(out), "--max-new-tokens", "4"])
    assert result.exit_code == 0, result.output
    assert json.loads(out.read_text())["rows"] == 4
    table = CliRunner().invoke(app, ["eval", "--model", str(tiny_family.student), "--samples", teacher_samples, "--limit", "2", "--max-new-tokens", "2"])
    assert table.exit_code == 0 and "top-1 agreement" in table.output
    # the log sits beside the report, or with no report beside the model; never under the cwd
    assert (tmp_path / "r.log").is_file() and f"{tiny_family.student}.eval.log" in table.output.replace("\n", "")
    assert not (tmp_path / "cache").exists()
    bad = CliRunner().invoke(app, ["eval", "--model", str(tmp_path), "--samples", teacher_samples])
    assert bad.exit_code == 2 and "neither a model" in bad.output


def test_answer_pattern_picks_the_last_stated_answer():
    pattern = re.compile(r"Answer:\s*(-?\d+)")
    assert stated_answer("2 + 2 = 4. Answer: 4", pattern) == "4"
    assert stated_answer("Answer: 3. No wait. Answer: 5", pattern) == "5"
    assert stated_answer("no answer here", pattern) is None
    assert stated_answer("  Whole  Text ", None) == "  Whole  Text "
    assert stated_answer("x = 7", re.compile(r"\d+")) == "7"  # no group: the whole match
    assert matches("so. Answer: 12", "12", pattern) and not matches("Answer: 12", "1", pattern)
    assert not matches("twelve", "twelve", pattern)  # a pattern that finds nothing never matches
    assert matches(" The  Answer ", "the answer", None)


def plant_demo_run(root) -> None:
    """What `make demo` leaves in a checkout: teacher samples where the embedded recipe's paths
    point (cache/demo/full/run/teacher and .../teacher-heldout)."""
    for name in ("teacher", "teacher-heldout"):
        write_teacher_samples(str(root / "cache" / "demo" / "full" / "run" / name))


def test_eval_scores_no_samples_it_was_not_given(tiny_family, tmp_path, monkeypatch):
    """From a folder holding a demo run, `pkd eval --model M` used to score the demo's held-out
    samples for a model that has nothing to do with the demo; now it names what to pass."""
    monkeypatch.chdir(tmp_path)
    plant_demo_run(tmp_path)
    result = CliRunner().invoke(app, ["eval", "--model", str(tiny_family.student), "--out", str(tmp_path / "r.json")])
    assert result.exit_code == 2 and "nothing to score" in result.output and "--samples" in result.output, result.output
    assert not (tmp_path / "r.json").exists()


def test_tasks_that_name_no_task_are_refused_as_such(tiny_family):
    result = CliRunner().invoke(app, ["eval", "--model", str(tiny_family.student), "--tasks", ","])
    assert result.exit_code == 2 and "[eval] 'tasks'" in result.output and "names no task" in result.output, result.output
