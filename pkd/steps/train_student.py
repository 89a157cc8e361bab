"""`pkd train-student`: stream a logit cache into a weighted Proxy-KD student (DESIGN §1, §5).

Reads: the cache (manifest + shards, any fsspec URI) and the student base model. The proxy is
never loaded. Writes to `out/`: `checkpoints/checkpoint-N` (Trainer's, resumable), `model/`
(LoRA adapter or full weights + tokenizer), `report.json`, and `manifest.json` (kind "student",
written last). Runs the same under `torchrun` / `accelerate launch` (each rank reads its own
streams; rank 0 writes the outputs).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pkd.config import RunConfig, TrainStudentConfig, report_to
from pkd.errors import ConfigError, ManifestError, PkdError
from pkd.fingerprint import files_fingerprint, sha256_file
from pkd.models.lora import new_adapter, sort_adapter_targets
from pkd.models.resolve import resolve_model
from pkd.models.trainer_args import STUDENT_KEYS, STUDENT_OWNED, build_args, check_trainer_settings, tracker_project, training_settings
from pkd.records import FileEntry, LogitCacheManifest, Manifest, dump_manifest
from pkd.store import Folder

RUN_CONFIG = "run_config.json"  # the config a run started with: resuming needs the same one


@dataclass
class StudentResult:
    out: Path
    status: str  # "trained", "up to date" or "stopped" (before max_steps: resumable)
    steps: int
    tokens: int
    tokens_per_s: float
    final: dict[str, float]
    loss_path: str = ""  # fused with the output layer, or not and why (ProxyKDTrainer.loss_path)


def cache_fingerprint(manifest: LogitCacheManifest) -> str:
    """A cache's identity for lineage: the hash of its complete manifest (which lists every
    shard's sha256)."""
    return "logits-" + hashlib.sha256(dump_manifest(manifest).encode()).hexdigest()


def _open_cache(uri: str) -> tuple[Folder, LogitCacheManifest]:
    """The cache's manifest, checked against its shards before any training: its kind, that it is
    complete, every shard present at its size, its counts against its file list (and no unlisted
    shard), and μ/γ against the shards' seq_logprob. Each shard's sha256 is checked as the
    data stream first opens it (pkd.student.data.CacheReader)."""
    from pkd.cache.ops import check_counts, check_present, check_stats, read_cache_manifest

    folder = Folder(uri)
    manifest = read_cache_manifest(folder)
    if not manifest.complete:
        raise ManifestError(f"{folder.where('manifest.json')}: the cache is incomplete (an interrupted `pkd cache-logits`?); finish it first")
    check_present(folder, manifest)
    check_counts(folder, manifest)
    check_stats(folder, manifest)
    return folder, manifest


def check_sampled_temperature(manifest: LogitCacheManifest, temperature: float) -> None:
    """A sampled cache trains only at the temperature its draws came from: at T = τ the draw
    frequencies estimate p_T without bias, at any τ; at T ≠ τ the self-normalised importance
    weights estimate the normalisers from the same draws, and the gradient is biased by 8-28% at
    N = 12 (bench/rs_kd_bias.py), with nothing in the loss to show it."""
    if manifest.codec.get("name") != "sampled":
        return
    tau = float(manifest.codec.get("params", {}).get("proposal_temperature", 1.0))
    if temperature != tau:
        raise ConfigError(
            f"[train_student] temperature = {temperature:g} with a sampled cache drawn at proposal temperature {tau:g}: the RS-KD "
            f"loss is unbiased only at T = τ (python bench/rs_kd_bias.py measures the bias otherwise). Train with --temperature {tau:g}, "
            f"or redraw the cache at T: pkd cache-logits --sampled {manifest.codec.get('k')} --proposal-temperature {temperature:g} --out NEW_FOLDER"
        )


def _resolve(cfg: TrainStudentConfig, run: RunConfig) -> tuple[str, Path, Path]:
    if not cfg.student:
        raise ConfigError("[train_student] student: no student model given (--student DIR)")
    raw = cfg.out or run.artifact_dir("student")
    if "://" in raw:  # checked on the string: Path() folds "s3://b/x" into the local "s3:/b/x"
        raise ConfigError(f"[train_student] out = {raw}: must be a local folder (Trainer writes checkpoints there); train into a local folder and copy the result afterwards")
    student = resolve_model(cfg.student, "student model")
    out = Path(raw)
    Folder(str(out)).check_folder("--out", write=True)
    return cfg.cache or run.artifact_dir("logits"), student, out


def _config_record(cfg: TrainStudentConfig, seed: int, world: int, streams: int, max_steps: int) -> dict[str, Any]:
    """What fixes the result: the section (minus paths) with its derived values filled in."""
    rec = cfg.model_dump(exclude={"cache", "student", "out", "report_to", "trainer"})
    if settings := training_settings(cfg.trainer):  # absent when empty: records made before the table still match
        rec["trainer"] = settings
    return rec | {"seed": seed, "processes": world, "data_streams": streams, "max_steps": max_steps}


def _check_same_run(out: Path, record: dict[str, Any]) -> bool:
    """Refuse an --out holding a run with other settings; True if the record is still to write
    (by `_record_run`, once everything else is validated: a refused run leaves nothing behind)."""
    path = out / RUN_CONFIG
    if not path.is_file():
        return True
    try:
        before = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, OSError) as e:
        raise ConfigError(f"{path}: not a readable run record ({type(e).__name__}); delete it, or use another --out") from None
    changed = sorted(k for k in set(before) | set(record) if before.get(k) != record.get(k))
    if changed:
        raise ConfigError(f"{out} holds a run started with different settings ({', '.join(changed)}); use another --out or delete it")
    return False


def _record_run(out: Path, record: dict[str, Any]) -> None:
    from pkd.errors import StorageError

    try:
        out.mkdir(parents=True, exist_ok=True)
        (out / RUN_CONFIG).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    except OSError as e:
        raise StorageError(f"--out {out}: cannot write there ({type(e).__name__}: {e.strerror or e})") from None


def train_student(cfg: TrainStudentConfig, run: RunConfig, *, callbacks: list | None = None, progress: bool = False, command: str | None = None) -> StudentResult:
    """Train (or resume, or find already done) the student described by `cfg`; `progress` draws
    pkd's bar on the terminal; `command` (the command line that ran it) goes into the model card."""
    from transformers import TrainingArguments

    check_trainer_settings(cfg.trainer, "train_student", (TrainingArguments,), STUDENT_KEYS, STUDENT_OWNED)
    cache_uri, student, out = _resolve(cfg, run)
    # one run per --out (flock: a killed run releases it); torchrun's other ranks are this run's own
    with Folder(str(out)).locked("`pkd train-student`") if os.environ.get("RANK", "0") == "0" else nullcontext():
        return _train(cfg, run, cache_uri, student, out, callbacks=callbacks, progress=progress, command=command)


def _train(cfg: TrainStudentConfig, run: RunConfig, cache_uri: str, student: Path, out: Path, *, callbacks: list | None, progress: bool, command: str | None) -> StudentResult:
    import torch
    from transformers import AutoConfig, AutoTokenizer, TrainingArguments
    from transformers.trainer_utils import get_last_checkpoint

    from pkd.progress import trainer_progress
    from pkd.student.trainer import KDSettings, ProxyKDTrainer
    from pkd.student.data import CacheStream, check_student_compatible, mean_weight

    folder, manifest = _open_cache(cache_uri)
    check_sampled_temperature(manifest, cfg.temperature)
    tokenizer = AutoTokenizer.from_pretrained(student)
    check_student_compatible(manifest, tokenizer, AutoConfig.from_pretrained(student).vocab_size, folder.uri)
    inputs = {"cache": cache_fingerprint(manifest), "student": files_fingerprint(student)}

    gpu = torch.cuda.is_available()
    bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and gpu)
    seed = run.seed if cfg.seed is None else cfg.seed
    args = build_args(TrainingArguments, dict(
        output_dir=str(out / "checkpoints"),
        per_device_train_batch_size=cfg.per_device_batch_size,
        gradient_accumulation_steps=cfg.grad_accum,
        learning_rate=cfg.learning_rate,
        lr_scheduler_type=cfg.lr_scheduler,
        warmup_steps=cfg.warmup_steps,
        weight_decay=cfg.weight_decay,
        max_grad_norm=cfg.max_grad_norm,
        max_steps=1,  # set below, once the world size is known
        logging_steps=cfg.logging_steps,
        save_steps=cfg.save_steps,
        save_total_limit=cfg.save_total_limit,
        seed=seed,
        bf16=bf16,
        use_cpu=not gpu,
        remove_unused_columns=False,
        ignore_data_skip=True,
        dataloader_num_workers=cfg.dataloader_workers,
        gradient_checkpointing=cfg.gradient_checkpointing,
        report_to=report_to(cfg.report_to, "[train_student] report_to"),  # tensorboard: checkpoints/runs/
        disable_tqdm=True,  # pkd draws its own bar; Trainer's log dictionaries go to the step's log
        ddp_find_unused_parameters=False,
    ), cfg.trainer, "train_student")  # fmt: skip
    world, rank = args.world_size, args.process_index
    streams = cfg.data_streams or world * max(1, cfg.dataloader_workers)
    global_batch = cfg.per_device_batch_size * cfg.grad_accum * world
    args.max_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * manifest.rows / global_batch))
    record = _config_record(cfg, seed, world, streams, args.max_steps)

    done = Folder(str(out))
    if done.has_manifest():
        m = done.read_manifest()
        if m.complete and m.inputs == inputs and m.config == record:
            report = json.loads((out / "report.json").read_text())
            return StudentResult(out, "up to date", report["steps"], report["tokens"], report["tokens_per_s"], report["final"])
    to_record = rank == 0 and _check_same_run(out, record)

    stream = CacheStream(
        folder,
        manifest,
        batch_size=cfg.per_device_batch_size,
        max_length=cfg.max_length,
        seed=seed,
        shuffle_buffer=cfg.shuffle_buffer,
        num_streams=streams,
        rank=rank,
        world_size=world,
        uniform_weights=cfg.uniform_weights,
        pad_id=tokenizer.pad_token_id or 0,
        pad_multiple=8 if gpu else 1,
    )
    model = _load_student(student, cfg, bf16 and gpu, seed)
    trainer = ProxyKDTrainer(
        model=model,
        args=args,
        train_dataset=stream,
        processing_class=tokenizer,
        callbacks=callbacks,
        kd=KDSettings(
            alpha=cfg.alpha, tail=cfg.tail, temperature=cfg.temperature, proposal_temperature=float(manifest.codec.get("params", {}).get("proposal_temperature", 1.0)),
            ce_scale=1.0 / mean_weight(folder, manifest) if cfg.weight_ce else None,
        ),  # fmt: skip
    )
    if to_record:
        _record_run(out, record)
    trainer.add_callback(trainer_progress("train-student", epoch_of=trainer.epoch_at, enabled=progress))
    last = get_last_checkpoint(args.output_dir) if Path(args.output_dir).is_dir() else None
    start = json.loads((Path(last) / "trainer_state.json").read_text())["global_step"] if last else 0
    t0 = time.perf_counter()
    try:
        with tracker_project(cfg.trainer.get("project")):
            trainer.train(resume_from_checkpoint=last)
    except PkdError as e:
        raise _unwrapped(e) from None
    elapsed = time.perf_counter() - t0
    state = trainer.state
    tokens = sum(int(h.get("tokens", 0)) for h in state.log_history)
    new_tokens = sum(int(h.get("tokens", 0)) for h in state.log_history if h.get("step", 0) > start)
    final = {k: v for k, v in (next((h for h in reversed(state.log_history) if "loss" in h), {})).items() if k in ("loss", "ce", "kl", "w_mean")}
    result = StudentResult(out, "trained" if state.global_step >= args.max_steps else "stopped", state.global_step, tokens, new_tokens / max(elapsed, 1e-9), final, trainer.loss_path)
    if result.status == "trained":
        trainer.save_model(str(out / "model"))
        if trainer.is_world_process_zero():
            sort_adapter_targets(out / "model")
            _write_outputs(out, result, state.log_history, inputs, record, manifest, {"student": cfg.student, "command": command})
    return result


def _unwrapped(e: PkdError) -> PkdError:
    """A DataLoader worker's error comes back as the same type around the worker's traceback
    text ("Caught IntegrityError in DataLoader worker process 0. Original Traceback ..."): keep
    the one line the user needs."""
    text = str(e)
    if "Original Traceback" not in text:
        return e
    last = text.rstrip().splitlines()[-1]
    return type(e)(last.split(f"{type(e).__name__}: ", 1)[-1])


def _load_student(path: Path, cfg: TrainStudentConfig, bf16_weights: bool, seed: int):
    """The student, wrapped in a LoRA adapter unless full fine-tuning. LoRA on GPU keeps the
    frozen base in bf16; trained weights stay fp32 (Trainer's bf16 autocast does the rest). The
    adapter is initialised under `seed`, so a seed fixes the initialisation as well as the data
    order."""
    import torch
    from transformers import AutoModelForCausalLM

    dtype = torch.bfloat16 if cfg.lora and bf16_weights else torch.float32
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    if not cfg.lora:
        return model
    from peft import LoraConfig

    target = cfg.lora_target if cfg.lora_target == "all-linear" else [t.strip() for t in cfg.lora_target.split(",")]
    lora = LoraConfig(task_type="CAUSAL_LM", r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout, target_modules=target)
    model = new_adapter(model, lora, seed)
    if cfg.gradient_checkpointing:
        model.enable_input_require_grads()
    return model


def _write_outputs(out: Path, result: StudentResult, history: list[dict], inputs: dict[str, str], record: dict[str, Any], cache: LogitCacheManifest, about: dict[str, Any]) -> None:
    """report.json, the model card (README.md) and the manifest listing them with the model."""
    from pkd.student.card import write_card

    report = {
        "steps": result.steps,
        "tokens": result.tokens,
        "tokens_per_s": result.tokens_per_s,
        "final": result.final,
        "loss_path": result.loss_path,
        "cache": {"rows": cache.rows, "tokens": cache.tokens, "k": cache.codec.get("k"), "teacher": cache.teacher_model, "proxy": cache.proxy_fingerprint},
        "config": record,
        "inputs": inputs,
        **about,
        "log_history": history,
    }
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    files = sorted(p for p in (out / "model").rglob("*") if p.is_file()) + [out / "report.json", write_card(out)]
    entries = [FileEntry(path=p.relative_to(out).as_posix(), sha256=sha256_file(p), bytes=p.stat().st_size, rows=0) for p in files]
    manifest = Manifest(kind="student", complete=True, inputs=inputs, config=record, counts={"steps": result.steps, "tokens": result.tokens}, files=entries)
    Folder(str(out)).write_manifest(manifest)
