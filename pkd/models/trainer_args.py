"""Any Trainer setting from a recipe: the `[train_student.trainer]` and `[proxy_align.trainer]`
tables (and `--trainer-arg KEY=VALUE`) pass fields straight to transformers' `TrainingArguments`
or TRL's `SFTConfig`/`DPOConfig`, so DeepSpeed, `optim`, `torch_compile`, evaluation, `hub_model_id`
and whatever the next release adds need no pkd flag.

Names are checked against the real dataclass, so a typo is one line with the closest field. Two
kinds of fields are refused: those a pkd key already sets (one place per setting, and the
`run_config.json` record that resumption compares stays complete), and those pkd owns because
its layout, resumption or data stream depend on them.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from pkd.errors import ConfigError

# Fields a pkd key of the section sets: TrainingArguments name -> the pkd key (or flag) to use.
STUDENT_KEYS = {
    "per_device_train_batch_size": "per_device_batch_size (--batch-size)", "gradient_accumulation_steps": "grad_accum (--grad-accum)",
    "learning_rate": "learning_rate (--lr)", "lr_scheduler_type": "lr_scheduler", "warmup_steps": "warmup_steps",
    "weight_decay": "weight_decay", "max_grad_norm": "max_grad_norm", "num_train_epochs": "epochs (--epochs)",
    "max_steps": "max_steps (--max-steps)", "logging_steps": "logging_steps (--logging-steps)", "save_steps": "save_steps (--save-steps)",
    "save_total_limit": "save_total_limit", "seed": "seed (--seed)", "bf16": "precision (--precision)", "use_cpu": "precision (--precision)",
    "dataloader_num_workers": "dataloader_workers (--workers)", "gradient_checkpointing": "gradient_checkpointing",
    "report_to": "report_to (--report-to)",
}  # fmt: skip
ALIGN_KEYS = {
    "per_device_train_batch_size": "per_device_batch_size (--batch-size)", "gradient_accumulation_steps": "grad_accum (--grad-accum)",
    "learning_rate": "learning_rate (--lr)", "lr_scheduler_type": "lr_scheduler (--lr-scheduler)",
    "num_train_epochs": "warmup_epochs / epochs", "max_length": "max_length (--max-length)", "logging_steps": "logging_steps (--logging-steps)",
    "seed": "seed (--seed)", "data_seed": "seed (--seed)", "bf16": "precision (--precision)", "use_cpu": "precision (--precision)",
    "gradient_checkpointing": "gradient_checkpointing", "report_to": "report_to (--report-to)", "beta": "beta (--beta)",
    "loss_weights": "nll_weight (--nll-weight)",
}  # fmt: skip
# Fields pkd owns, with the reason.
_COMMON_OWNED = {
    "output_dir": "pkd lays out its output folder (--out)",
    "disable_tqdm": "pkd draws its own progress display",
}
STUDENT_OWNED = _COMMON_OWNED | {
    "remove_unused_columns": "the cache stream's columns are the loss's inputs",
    "ignore_data_skip": "the cache stream resumes itself",
}
ALIGN_OWNED = _COMMON_OWNED | {
    "save_strategy": "proxy-align commits each stage itself, and resumes by stage",
    "loss_type": "the round's loss is the paper's DPO + NLL (nll_weight sets the balance)",
    "precompute_ref_log_probs": "the previous round's proxy is the reference, scored once before the round",
    "completion_only_loss": "the warm-up learns the teacher's responses only",
}


def check_trainer_settings(values: dict[str, Any], section: str, classes: tuple[type, ...], keys: dict[str, str], owned: dict[str, str]) -> dict[str, Any]:
    """`values` if every name is a field of one of `classes` that pkd neither sets nor owns;
    otherwise a ConfigError naming the field (and the closest one, or the pkd key to use)."""
    fields = {f.name for cls in classes for f in dataclasses.fields(cls) if f.init}
    where = f"[{section}.trainer]"
    for name in values:
        if name in owned:
            raise ConfigError(f"{where} {name}: set by pkd ({owned[name]})")
        if name in keys:
            raise ConfigError(f"{where} {name}: pkd sets it from [{section}] {keys[name]}; set that instead")
        if name not in fields:
            close = difflib.get_close_matches(name, sorted(fields), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"{where} {name!r}: not a field of {' or '.join(c.__name__ for c in classes)}{hint}")
    return values


def build_args(cls: type, pkd_args: dict[str, Any], extra: dict[str, Any], section: str) -> Any:
    """`cls(**pkd_args, **extra)`, keeping only the `extra` fields `cls` has (proxy-align's table
    serves both SFTConfig and DPOConfig); a value the class rejects is one line naming the table."""
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    given = {k: v for k, v in extra.items() if k in names}
    try:
        return cls(**pkd_args, **given)
    except (ValueError, TypeError) as e:
        if not given:
            raise
        raise ConfigError(f"[{section}.trainer] {', '.join(f'{k}={v!r}' for k, v in given.items())}: {cls.__name__} refused them: {str(e).splitlines()[0]}") from None


# Fields that change where a run is reported, not what it trains: a resumed run may change them.
TRACKING_FIELDS = frozenset({"run_name", "project", "trackio_space_id", "logging_dir", "logging_first_step", "logging_nan_inf_filter", "push_to_hub", "hub_model_id", "hub_strategy", "hub_private_repo", "hub_token"})


def training_settings(values: dict[str, Any]) -> dict[str, Any]:
    """The table's fields that fix the trained result (for the run record resumption compares)."""
    return {k: v for k, v in sorted(values.items()) if k not in TRACKING_FIELDS}


@contextmanager
def tracker_project(project: str | None) -> Iterator[None]:
    """`project` for the trackers that read it from the environment (wandb: WANDB_PROJECT, mlflow:
    MLFLOW_EXPERIMENT_NAME; trackio reads TrainingArguments.project), while a step trains."""
    names = ("WANDB_PROJECT", "MLFLOW_EXPERIMENT_NAME")
    saved = {k: os.environ.get(k) for k in names}
    if project is not None:
        os.environ.update(dict.fromkeys(names, project))
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
