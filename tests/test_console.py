"""One program's console: library output goes to the step's log file, pkd's own lines and bars to
the terminal; `-v` shows both; tables fit 80 columns; train-student logs true epochs and sends
CE/KL/weight statistics to the tracker (`--report-to`)."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
ENV = os.environ | {"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}

# Every kind of noise a step meets: Trainer's printed dictionaries, a logger, a warning, a raw
# write to fd 2 (C code) and a child process (vLLM's workers).
STEP = textwrap.dedent(
    """
    import logging, os, subprocess, sys, warnings
    from pkd.console import step_console, terminal

    with step_console("some-step", sys.argv[1], verbose=sys.argv[2] == "1"):
        terminal().print("pkd says hello")
        print("{'train_runtime': 1.0}")
        logging.getLogger("vllm").warning("vllm engine line")
        warnings.warn("a torch FutureWarning", FutureWarning)
        os.write(2, b"raw fd2 line\\n")
        subprocess.run([sys.executable, "-c", "import sys; print('child says hi'); print('child err', file=sys.stderr)"], check=True)
        if sys.argv[3] == "fail":
            raise SystemExit("the step failed")
    print("after the step")
    """
)
NOISE = ["train_runtime", "vllm engine line", "FutureWarning", "raw fd2 line", "child says hi", "child err"]


def run_step(tmp_path: Path, *, verbose: bool, fail: bool = False) -> tuple[subprocess.CompletedProcess, Path]:
    script = tmp_path / "step.py"
    script.write_text(STEP)
    out = tmp_path / "run" / "student"
    proc = subprocess.run(
        [sys.executable, str(script), str(out), "1" if verbose else "0", "fail" if fail else "ok"], capture_output=True, text=True, env=ENV, timeout=60
    )
    return proc, tmp_path / "run" / "student.log"


def test_library_output_goes_to_the_log_file_and_only_pkd_to_the_terminal(tmp_path):
    proc, log = run_step(tmp_path, verbose=False)
    terminal = proc.stdout + proc.stderr
    assert proc.returncode == 0, terminal
    assert "pkd says hello" in terminal and "after the step" in terminal
    assert str(log) in terminal.replace("\n", "")  # the path is printed first
    assert [n for n in NOISE if n in terminal] == []
    text = log.read_text()
    assert [n for n in NOISE if n not in text] == []
    assert "pkd says hello" not in text
    assert not (tmp_path / "run" / "student").exists()  # nothing lands in the step's own folder


def test_verbose_shows_the_libraries_too(tmp_path):
    proc, log = run_step(tmp_path, verbose=True)
    terminal = proc.stdout + proc.stderr
    assert proc.returncode == 0, terminal
    assert "pkd says hello" in terminal and "train_runtime" in terminal and "child says hi" in terminal
    assert "vllm engine line" in log.read_text()  # Python log records reach the file as well


def test_a_failing_step_points_at_its_log_and_appends_runs(tmp_path):
    run_step(tmp_path, verbose=False)
    proc, log = run_step(tmp_path, verbose=False, fail=True)
    terminal = proc.stdout + proc.stderr
    assert proc.returncode == 1 and "the step failed" in terminal
    assert "last words" in terminal and [n for n in NOISE if n in terminal] == []
    assert log.read_text().count("==> ") == 2  # one header per run, nothing overwritten


def _render(renderable) -> list[str]:
    from rich.console import Console

    buf = io.StringIO()
    Console(file=buf, width=80, force_terminal=False, color_system=None).print(renderable)
    return buf.getvalue().splitlines()


def _fits(lines: list[str]) -> None:
    assert max(len(line) for line in lines) <= 80
    assert not [line for line in lines if "…" in line], "a header or cell was cut"


def test_proxy_align_report_fits_80_columns():
    from pkd.align.report import table

    stage = {"nll_per_token": 1.23456, "top1_agreement": 0.654, "tokens": 12345, "samples": 64}
    rounds = [
        {"stage": f"round-{k:02d}"} | stage | {"pairs": 1000, "dropped_pairs": 12, "reward_margin": -0.1234, "reward_accuracy": 0.75, "gen_s": 1234.5, "merge_s": 321.0, "ref_s": 123.4, "train_s": 4321.0}
        for k in range(1, 4)
    ]
    stage |= {"exact_match": 0.915}
    report = {
        "heldout": {"from": "align", "samples": 64, "tokens": 12345, "exact_match_rows": 64, "answer": "last number"},
        "stages": [{"stage": "base"} | stage, {"stage": "warmup"} | stage | {"train_s": 12.0}, *rounds],
        "selection": {"stage": "round-02", "max_skill_drop": 5.0},
    }
    lines = _render(table(report))
    _fits(lines)
    assert any("round-02 *" in line for line in lines)  # the output stage is marked
    assert any("round-03" in line and "-0.1234" in line for line in lines)
    assert sum("round-0" in line for line in lines) == 6  # both tables list every round


def test_train_student_terminal_tracker_and_epochs(tiny_family, scored_cache, tmp_path):
    """The real command on the tiny family: only pkd's lines on the terminal, Trainer's
    dictionaries in the log, CE/KL/weights in TensorBoard, epoch = samples / cache rows."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "student"
    cmd = [sys.executable, str(REPO / "cli.py"), "train-student", "--cache", scored_cache, "--student", str(tiny_family.student), "--out", str(out)]
    cmd += ["--max-steps", "14", "--batch-size", "4", "--max-length", "64", "--logging-steps", "2", "--precision", "fp32", "--report-to", "tensorboard"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=ENV, cwd=tmp_path, timeout=300)
    terminal = proc.stdout + proc.stderr
    assert proc.returncode == 0, terminal
    assert "trained" in terminal and "14 steps" in terminal
    assert "{'" not in terminal and "train_runtime" not in terminal and "Warning" not in terminal
    assert "train_runtime" in (tmp_path / "student.log").read_text()
    # the loss path taken, once, in the log and in the summary (the tiny student's head fuses)
    path = "Proxy-KD loss: fused with the output layer"
    assert path in terminal and (tmp_path / "student.log").read_text().count(path) == 1
    assert json.loads((out / "report.json").read_text())["loss_path"].startswith("fused with the output layer")

    history = json.loads((out / "report.json").read_text())["log_history"]
    epochs = {h["step"]: h["epoch"] for h in history if "loss" in h}
    assert epochs[12] == pytest.approx(1.0) and epochs[6] == pytest.approx(0.5)  # 48 rows, 4 per step

    events = next((out / "checkpoints" / "runs").iterdir())
    acc = EventAccumulator(str(events))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train/loss", "train/ce", "train/kl", "train/w_mean", "train/w_std"} <= tags, tags
    assert acc.Scalars("train/epoch")[-1].value == pytest.approx(14 / 12, abs=1e-3)


def test_report_to_names_a_bad_tracker_in_one_line(tiny_family, scored_cache, tmp_path):
    from typer.testing import CliRunner

    from pkd.cli import app

    result = CliRunner().invoke(app, ["train-student", "--cache", scored_cache, "--student", str(tiny_family.student), "--out", str(tmp_path / "s"), "--report-to", "tensorbored"])
    assert result.exit_code == 2 and "report_to = 'tensorbored': not a tracker" in result.output


def _on_a_pty(cmd: list[str], cwd: Path, timeout: float = 300) -> tuple[int, str]:
    """Run `cmd` with stdin/stdout/stderr on a real pseudo-terminal 80 columns wide (as a user's
    terminal is; a pipe hides the bug where rich's display captured the libraries' prints) and
    return its exit status and everything the terminal received."""
    import fcntl
    import select
    import struct
    import termios
    import time

    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))
    env = ENV | {"TERM": "xterm-256color", "COLUMNS": "80", "LINES": "24"}
    env.pop("NO_COLOR", None)
    proc = subprocess.Popen(cmd, stdin=slave, stdout=slave, stderr=slave, cwd=cwd, env=env, start_new_session=True)
    os.close(slave)
    chunks, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        if select.select([master], [], [], 1.0)[0]:
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: every writer closed the pty
                break
            if not data:
                break
            chunks.append(data)
        elif proc.poll() is not None:
            break
    os.close(master)
    return proc.wait(timeout=30), b"".join(chunks).decode("utf-8", "replace")


def test_on_a_real_terminal_library_lines_go_to_the_log_not_the_screen(tiny_family, scored_cache, tmp_path):
    """train-student on a pty: Trainer's `{'loss': ...}` dictionaries are all in student.log
    and none on the screen, where pkd's bar and summary are."""
    out = tmp_path / "student"
    cmd = [sys.executable, str(REPO / "cli.py"), "train-student", "--cache", scored_cache, "--student", str(tiny_family.student), "--out", str(out)]
    cmd += ["--max-steps", "12", "--batch-size", "4", "--max-length", "64", "--logging-steps", "2", "--precision", "fp32", "--report-to", "none"]
    rc, screen = _on_a_pty(cmd, tmp_path)
    assert rc == 0, screen
    assert "trained" in screen and "train-student" in screen
    assert "{'" not in screen and "train_runtime" not in screen, screen
    logged = (tmp_path / "student.log").read_text()
    history = json.loads((out / "report.json").read_text())["log_history"]
    assert logged.count("{'loss'") == sum("loss" in h for h in history) == 6
    assert "train_runtime" in logged


def test_every_steps_progress_display_fits_80_columns(monkeypatch):
    """Each step's progress, at its widest numbers, rendered 80 columns wide: nothing cut."""
    from transformers import TrainerControl, TrainerState, TrainingArguments

    import pkd.console
    from pkd.progress import PartsProgress, StepProgress, trainer_progress

    monkeypatch.setenv("COLUMNS", "80")
    monkeypatch.setattr(pkd.console, "_terminal", None)

    def shown(display) -> list[str]:
        lines = _render(display.get_renderable())
        _fits(lines)
        return lines

    steps = [
        ("teacher-sample", "prompts", True, 30_000),
        ("cache-logits", "samples", False, 1_000_000),
        ("eval", "samples", False, 100_000),
    ]
    for description, unit, requests, total in steps:
        bar = StepProgress(total, done=total // 3, description=description, unit=unit, requests=requests)
        for _ in range(3):
            bar.update(done=total // 10, tokens=12_345_678, requests=total // 10, failures=3)
        lines = shown(bar._bar)
        assert description in lines[0] and f"/{total}" in lines[0] and "eta" in lines[0], lines
        assert f"{unit} " in lines[1] and "tok/s" in lines[1] and (("failed" in lines[1]) == requests), lines

    for description in ("train-student", "proxy-align round-12"):
        callback = trainer_progress(description, epoch_of=lambda step: step / 1000)
        state = TrainerState(max_steps=100_000, global_step=12_345)
        state.log_history = [{"step": 12_346, "tokens": 9_876_543}]
        args, control = TrainingArguments(output_dir="unused", report_to="none"), TrainerControl()
        callback.on_train_begin(args, state, control)
        try:
            callback.on_log(args, state, control, logs={"loss": 12.3456, "ce": 1.2345, "kl": 11.1111, "epoch": 12.34})
            lines = shown(callback.bar)
        finally:
            callback.on_train_end(args, state, control)
        assert description in lines[0] and "12345/100000" in lines[0] and "eta" in lines[0], lines
        assert "loss 12.346" in lines[1] and "kl 11.111" in lines[1] and "tok/s" in lines[1] and "ep 12.35" in lines[1], lines

    parts = PartsProgress(1_000)  # cache-logits --parts: one line of part counts
    parts.show({"done": 123, "running": 456, "pending": 321, "failed": 100})
    lines = shown(parts._bar)
    assert "123/1000" in lines[0] and "456 running" in lines[0] and "100 failed" in lines[0], lines
    # no display captures stdout/stderr: on a real terminal that pulls library lines out of the log
    for display in (parts._bar, StepProgress(1)._bar):
        assert not display.live._redirect_stdout and not display.live._redirect_stderr


def test_version_and_help_panels():
    from typer.testing import CliRunner

    from pkd import __version__
    from pkd.cli import app

    version = CliRunner().invoke(app, ["--version"])
    assert version.exit_code == 0 and version.output.strip() == f"pkd {__version__}"
    help_text = CliRunner(env={"COLUMNS": "80"}).invoke(app, ["train-student", "--help"], terminal_width=80).output
    assert help_text.index("--cache") < help_text.index("Loss") < help_text.index("--temperature") < help_text.index("Trainer and tracking")
    assert "…" not in help_text
