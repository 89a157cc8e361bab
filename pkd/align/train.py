"""Training of the proxy with TRL: warm-up SFT on D_w, and one DPO + NLL round on a chunk's pairs.

The reference of round k is the proxy of round k−1 (DESIGN §1), not the frozen base: the round
starts from the previous adapter loaded trainable, TRL copies it into a frozen "ref" adapter
(DPOTrainer does this for a PeftModel given without `peft_config`), and
`precompute_ref_log_probs=True` scores every pair with it once before training, so training
runs one forward per pair instead of two. For full fine-tuning the model as loaded (the
previous round's weights) is the reference, precomputed the same way.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pkd.models.lora import target_modules
from pkd.models.trainer_args import build_args
from pkd.config import ProxyAlignConfig, report_to
from pkd.progress import status


def runtime(precision: str) -> tuple[bool, Any]:
    """(train on CPU?, model dtype): bf16 on a GPU unless fp32 is asked for, fp32 on CPU."""
    import torch

    gpu = torch.cuda.is_available()
    bf16 = precision == "bf16" or (precision == "auto" and gpu)
    return not gpu, torch.bfloat16 if bf16 else torch.float32


def load_model(model_dir: str | Path, precision: str) -> Any:
    from transformers import AutoModelForCausalLM

    use_cpu, dtype = runtime(precision)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype, use_safetensors=True)
    return model if use_cpu else model.to("cuda")


def lora_config(cfg: ProxyAlignConfig) -> Any:
    from peft import LoraConfig

    return LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout, target_modules=target_modules(cfg.lora_target), bias="none", task_type="CAUSAL_LM")


def load_policy(base_dir: str | Path, previous: str | Path | None, cfg: ProxyAlignConfig, seed: int = 0) -> Any:
    """The proxy to train next: base + previous LoRA adapter (trainable), or previous full weights;
    a new adapter (the warm-up's) is initialised under `seed`."""
    if not cfg.lora:
        return load_model(previous or base_dir, cfg.precision)
    from peft import PeftModel

    from pkd.models.lora import new_adapter

    base = load_model(base_dir, cfg.precision)
    if previous is None:
        return new_adapter(base, lora_config(cfg), seed)
    return PeftModel.from_pretrained(base, str(previous), is_trainable=True)


def _args(cfg: ProxyAlignConfig, scratch: Path, seed: int, epochs: float) -> dict[str, Any]:
    """TrainingArguments shared by both stages (TRL's bf16/checkpointing defaults overridden)."""
    import torch

    use_cpu, dtype = runtime(cfg.precision)
    return dict(
        output_dir=str(scratch), use_cpu=use_cpu, bf16=dtype == torch.bfloat16, gradient_checkpointing=cfg.gradient_checkpointing,
        learning_rate=cfg.learning_rate, lr_scheduler_type=cfg.lr_scheduler, num_train_epochs=epochs,
        per_device_train_batch_size=cfg.per_device_batch_size, gradient_accumulation_steps=cfg.grad_accum,
        max_length=cfg.max_length, logging_steps=cfg.logging_steps, seed=seed, data_seed=seed,
        save_strategy="no", report_to=report_to(cfg.report_to, "[proxy_align] report_to"), disable_tqdm=True,
    )  # fmt: skip


def _callbacks(stage: str, progress: bool) -> list[Any]:
    from pkd.progress import trainer_progress

    return [trainer_progress(f"proxy-align {stage}", enabled=progress)]


def _losses(history: list[dict[str, Any]], key: str) -> list[float]:
    return [h[key] for h in history if key in h]


Measure = Callable[[Any], dict[str, Any]]


def _log_heldout(trainer: Any, prefix: str, figures: dict[str, Any]) -> None:
    """Held-out figures of a stage to the trackers, beside the Trainer's own logs."""
    trainer.log({f"{prefix}/{k}": float(v) for k, v in figures.items() if isinstance(v, int | float) and not isinstance(v, bool)})


def warmup_sft(
    model: Any, tokenizer: Any, rows: list[dict[str, Any]], cfg: ProxyAlignConfig, seed: int, scratch: Path, *,
    progress: bool = False, base: dict[str, Any] | None = None, measure: Measure | None = None,
) -> dict[str, Any]:  # fmt: skip
    """SFT on teacher responses: prompt/completion rows, loss on the completion (the assistant
    turn) only. Returns training stats, and under "heldout" what `measure` says of the trained
    model; trackers (`report_to`, under scratch/runs/) get the base model's figures (`base`) and those."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    args = build_args(SFTConfig, _args(cfg, scratch, seed, cfg.warmup_epochs) | {"completion_only_loss": True}, cfg.trainer, "proxy_align")
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer, callbacks=_callbacks("warmup", progress))
    start = time.monotonic()
    out = trainer.train()
    stats = {"steps": out.global_step, "train_loss": out.training_loss, "loss_curve": _losses(trainer.state.log_history, "loss"), "train_s": time.monotonic() - start}
    if base is not None:
        _log_heldout(trainer, "heldout_base", base)
    if measure is not None:
        stats["heldout"] = measure(model)
        _log_heldout(trainer, "heldout", stats["heldout"])
    return stats


def dpo_round(
    model: Any, tokenizer: Any, rows: list[dict[str, Any]], cfg: ProxyAlignConfig, seed: int, scratch: Path, *,
    stage: str = "round", progress: bool = False, measure: Measure | None = None,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:  # fmt: skip
    """Minimise L_pref + nll_weight · NLL(y|x) over the pairs, the reference precomputed with the
    model as it is now. Returns the tokenized rows with their `ref_*_logps` and training stats
    (with "heldout": what `measure` says of the trained model, also sent to the trackers)."""
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    args = build_args(DPOConfig, _args(cfg, scratch, seed, cfg.epochs) | dict(
        beta=cfg.beta, loss_type=["sigmoid", "sft"], loss_weights=[1.0, cfg.nll_weight], precompute_ref_log_probs=True,
    ), cfg.trainer, "proxy_align")  # fmt: skip
    start = time.monotonic()
    with status(f"proxy-align {stage}: reference log-probs of {len(rows)} pairs", enabled=progress):
        trainer = DPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer, callbacks=_callbacks(stage, progress))
    ref_s = time.monotonic() - start  # tokenization + the reference forward over every pair
    start = time.monotonic()
    out = trainer.train()
    train_s = time.monotonic() - start
    history = trainer.state.log_history
    stats = {
        "steps": out.global_step, "train_loss": out.training_loss, "loss_curve": _losses(history, "loss"),
        "train_reward_margin": _losses(history, "rewards/margins"), "train_reward_accuracy": _losses(history, "rewards/accuracies"),
        "ref_s": ref_s, "train_s": train_s,
    }  # fmt: skip
    if measure is not None:
        stats["heldout"] = measure(model)
        _log_heldout(trainer, "heldout", stats["heldout"])
    columns = ["prompt_ids", "chosen_ids", "rejected_ids", "ref_chosen_logps", "ref_rejected_logps"]
    tokenized = trainer.train_dataset.select_columns(columns).to_list()
    if cfg.lora:  # the frozen copy has served its purpose; keep only the trained adapter
        model.delete_adapter("ref")
    return tokenized, stats


def save_proxy(model: Any, tokenizer: Any, out: Path) -> None:
    """The adapter alone (LoRA) or the full model, with the tokenizer, as safetensors."""
    from pkd.models.lora import sort_adapter_targets

    model.save_pretrained(str(out), safe_serialization=True)
    sort_adapter_targets(out)
    tokenizer.save_pretrained(str(out))


def merge(base_dir: str | Path, adapter_dir: Path, out: Path, precision: str) -> None:
    """base + adapter folded into one plain model (for engines or tools without LoRA)."""
    from peft import PeftModel
    from transformers import AutoTokenizer

    model = PeftModel.from_pretrained(load_model(base_dir, precision), str(adapter_dir)).merge_and_unload()
    model.save_pretrained(str(out), safe_serialization=True)
    AutoTokenizer.from_pretrained(str(adapter_dir)).save_pretrained(str(out))


def free_memory() -> None:
    """Return freed accelerator memory to the device between stages (the next stage, or vLLM,
    needs it); the caller drops its references first."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
