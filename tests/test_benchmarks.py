"""`pkd eval --tasks`: standard benchmarks through lm-evaluation-harness, offline, on a local task
(a YAML and a JSONL this test writes) and the tiny family's student (base and LoRA adapter).

The tasks are built so that the right answer is known without trusting lm-eval: the choices are
"yes" and "yes" repeated twelve times; summed log-likelihood always prefers the short one (every
extra token costs log-probability), so accuracy is 1.0 when the short choice is gold and 0.0 when
the long one is. A model that scored nothing, or scored another model, would not get both right.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from pkd.cli import app
from test_eval import plant_demo_run

pytest.importorskip("lm_eval")

REPO = Path(__file__).resolve().parent.parent
QUESTIONS = ["Is the sky blue?", "Is water wet?", "Do fish swim?", "Is two more than one?", "Is snow cold?", "Can birds fly?"]


def write_tasks(root: Path) -> Path:
    tasks = root / "tasks"
    tasks.mkdir()
    docs = tasks / "docs.jsonl"
    docs.write_text("".join(json.dumps({"question": q, "choices": ["yes", " ".join(["yes"] * 12)]}) + "\n" for q in QUESTIONS))
    for name, gold in (("pkd_short_gold", 0), ("pkd_long_gold", 1)):
        (tasks / f"{name}.yaml").write_text(
            f"task: {name}\n"
            "dataset_path: json\n"
            f"dataset_kwargs:\n  data_files:\n    test: {docs}\n"
            "test_split: test\n"
            "output_type: multiple_choice\n"
            "doc_to_text: \"Question: {{question}}\\nAnswer:\"\n"
            "doc_to_choice: choices\n"
            f"doc_to_target: {gold}\n"
            "metric_list:\n  - metric: acc\n"
        )
    return tasks


def adapter_of(student: Path, out: Path) -> Path:
    """A LoRA adapter on the student whose weights are not the identity."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(student), LoraConfig(r=8, target_modules="all-linear", init_lora_weights=False))
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(student).save_pretrained(out)
    return out


@pytest.mark.parametrize("kind", ["base", "adapter"])
def test_local_tasks_end_to_end(tiny_family, tmp_path, kind, monkeypatch):
    """Run from a folder that holds a demo run (`make demo` then `make test` in one clone): the
    demo's held-out samples must not find their way into the report."""
    monkeypatch.chdir(tmp_path)
    plant_demo_run(tmp_path)
    tasks = write_tasks(tmp_path)
    model = tiny_family.student if kind == "base" else adapter_of(tiny_family.student, tmp_path / "adapter")
    report_path = tmp_path / "report.json"
    args = ["eval", "--model", str(model), "--tasks", "pkd_short_gold,pkd_long_gold", "--include-path", str(tasks)]
    args += ["--limit", "5", "--num-fewshot", "0", "--batch-size", "4", "--max-length", "128", "--out", str(report_path)]
    if kind == "adapter":  # a chat-trained student: prompts in its chat format, every document logged
        args += ["--apply-chat-template", "--log-samples"]
    result = CliRunner().invoke(app, args, terminal_width=200)
    assert result.exit_code == 0, result.output
    report = json.loads(report_path.read_text())
    assert "rows" not in report and "no teacher samples named" in report["skipped"]  # benchmarks only
    bench = report["benchmarks"]
    assert bench["samples"] == {"pkd_short_gold": 5, "pkd_long_gold": 5}
    assert bench["num_fewshot"] == 0 and bench["limit"] == 5
    assert all("," in key for metrics in bench["tasks"].values() for key in metrics)  # no sample_len "metric"
    assert "sample_len" not in result.output
    if kind == "base":
        assert bench["tasks"]["pkd_short_gold"]["acc,none"] == 1.0
        assert bench["tasks"]["pkd_long_gold"]["acc,none"] == 0.0
        assert "pkd_short_gold" in result.output and "1.0000" in result.output
    else:
        assert bench["apply_chat_template"] is True
        logged = [json.loads(line) for line in (tmp_path / "report.samples.jsonl").read_text().splitlines()]
        assert len(logged) == 10 and {d["task"] for d in logged} == {"pkd_short_gold", "pkd_long_gold"}
        assert "<|im_start|>" in json.dumps(logged[0])  # the chat template was applied to the prompt


def test_unknown_task_is_one_line_before_the_model_loads(tmp_path):
    missing = tmp_path / "no-model-here"  # the model would fail to load: the task names are checked first
    result = CliRunner().invoke(app, ["eval", "--model", str(missing), "--tasks", "no_such_task_anywhere", "--out", str(tmp_path / "r.json")])
    assert result.exit_code == 2 and "'no_such_task_anywhere' not known to lm-eval" in result.output
    typo = CliRunner().invoke(app, ["eval", "--model", str(missing), "--tasks", "pkd_short_gol", "--include-path", str(write_tasks(tmp_path))], terminal_width=300)
    assert typo.exit_code == 2 and "did you mean 'pkd_short_gold'?" in typo.output


@pytest.mark.slow
def test_a_task_whose_data_cannot_be_fetched_says_so(tiny_family, tmp_path):
    """arc_easy is a real lm-eval task whose data lives on the Hub; offline it cannot be fetched."""
    env = os.environ | {"PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    cmd = [sys.executable, str(REPO / "cli.py"), "eval", "--model", str(tiny_family.student), "--tasks", "arc_easy", "--out", str(tmp_path / "r.json")]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "benchmark task 'arc_easy': its data could not be fetched" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "r.json").exists()
