"""Any Trainer setting from a recipe: `[train_student.trainer]`, `[proxy_align.trainer]` and
`--trainer-arg KEY=VALUE` reach the real TrainingArguments / DPOConfig; unknown names and the
fields pkd owns are one line each."""

from __future__ import annotations

import pytest
from transformers import TrainerCallback
from typer.testing import CliRunner

from pkd.cli import app
from pkd.config import ProxyAlignConfig, RunConfig, TrainStudentConfig, resolve_recipe
from pkd.errors import ConfigError
from pkd.steps.proxy_align import _check_trainer_table
from pkd.steps.train_student import train_student


class Seen(TrainerCallback):
    """Keeps the TrainingArguments the Trainer actually runs with."""

    def on_train_begin(self, args, state, control, **kwargs):  # noqa: ANN001
        self.args = args


def test_a_trainer_table_reaches_the_trainer(tiny_family, scored_cache, tmp_path):
    recipe = resolve_recipe(None, ["train_student.trainer.torch_compile=false"], "train_student", {
        "cache": scored_cache, "student": str(tiny_family.student), "out": str(tmp_path / "s"), "max_steps": 2, "max_length": 64,
        "precision": "fp32", "report_to": "none", "trainer": {"optim": "adamw_torch_fused", "run_name": "r-1", "adam_beta2": 0.95},
    })  # fmt: skip
    assert recipe.train_student.trainer == {"torch_compile": False, "optim": "adamw_torch_fused", "run_name": "r-1", "adam_beta2": 0.95}
    seen = Seen()
    assert train_student(recipe.train_student, RunConfig(), callbacks=[seen]).status == "trained"
    assert seen.args.optim == "adamw_torch_fused" and seen.args.adam_beta2 == 0.95 and seen.args.run_name == "r-1"


@pytest.mark.parametrize(
    ("arg", "says"),
    [
        ("optimm=adamw_torch_fused", "[train_student.trainer] 'optimm': not a field of TrainingArguments; did you mean 'optim'?"),
        ("output_dir=/tmp/x", "[train_student.trainer] output_dir: set by pkd (pkd lays out its output folder (--out))"),
        ("learning_rate=0.1", "[train_student.trainer] learning_rate: pkd sets it from [train_student] learning_rate (--lr); set that instead"),
        ("optim=no_such_optimizer", "[train_student.trainer] optim='no_such_optimizer': TrainingArguments refused them"),
    ],
)
def test_a_bad_trainer_arg_is_one_line(tiny_family, scored_cache, tmp_path, arg, says):
    cmd = ["train-student", "--cache", scored_cache, "--student", str(tiny_family.student), "--out", str(tmp_path / "s"), "--trainer-arg", arg]
    result = CliRunner().invoke(app, cmd, terminal_width=400)
    assert result.exit_code == 2, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and says in errors[0], result.output
    assert not (tmp_path / "s" / "model").exists()


def test_run_name_and_project_join_the_table():
    from pkd.cli import _trainer_table

    assert _trainer_table(["optim=adamw_torch_fused", "torch_compile=true"], "r-1", "pkd-runs") == {
        "optim": "adamw_torch_fused", "torch_compile": True, "run_name": "r-1", "project": "pkd-runs",
    }  # fmt: skip
    assert _trainer_table(None, None, None) is None
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        _trainer_table(["optim"], None, None)


def test_proxy_align_table_is_checked_against_sft_and_dpo_configs():
    from trl import DPOConfig, SFTConfig

    from pkd.models.trainer_args import build_args

    _check_trainer_table(ProxyAlignConfig(trainer={"optim": "adamw_torch_fused", "ld_alpha": 0.5, "packing": False}))
    with pytest.raises(ConfigError, match=r"\[proxy_align.trainer\] 'ld_alfa': not a field of SFTConfig or DPOConfig; did you mean 'ld_alpha'\?"):
        _check_trainer_table(ProxyAlignConfig(trainer={"ld_alfa": 0.5}))
    with pytest.raises(ConfigError, match="precompute_ref_log_probs: set by pkd"):
        _check_trainer_table(ProxyAlignConfig(trainer={"precompute_ref_log_probs": False}))
    table = {"optim": "adamw_torch_fused", "ld_alpha": 0.5}  # ld_alpha: DPO only, left out of the warm-up's SFTConfig
    dpo = build_args(DPOConfig, {"output_dir": "unused", "report_to": "none", "use_cpu": True, "bf16": False}, table, "proxy_align")
    sft = build_args(SFTConfig, {"output_dir": "unused", "report_to": "none", "use_cpu": True, "bf16": False}, table, "proxy_align")
    assert dpo.optim == sft.optim == "adamw_torch_fused" and dpo.ld_alpha == 0.5 and not hasattr(sft, "ld_alpha")
