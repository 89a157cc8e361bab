"""The `pkd` command line: one short command per step; it parses, delegates and prints.

Known errors (`PkdError`) become one red line and a non-zero exit; `PKD_DEBUG=1` shows the
traceback. Heavy imports happen inside commands so that `--help` is instant.
"""

from __future__ import annotations

import json
import os
import shlex
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import click
import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from pkd import __version__
from pkd.console import step_console, terminal
from pkd.errors import ConfigError, PkdError

if TYPE_CHECKING:
    from pkd.config import CacheLogitsConfig, RunConfig

console = Console(soft_wrap=True)
err_console = Console(stderr=True, soft_wrap=True)


class _Group(typer.core.TyperGroup):
    """Turns library errors into one message + exit code, wherever in the command tree."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except PkdError as e:
            if os.environ.get("PKD_DEBUG"):
                raise
            err_console.print(f"[bold red]error:[/] {escape(str(e))}", highlight=False, soft_wrap=True)
            err_console.print("[dim](set PKD_DEBUG=1 for the traceback)[/]")
            raise typer.Exit(e.exit_code) from None


app = typer.Typer(
    cls=_Group,
    help="Proxy-KD: distill a black-box LLM into a small open student through an aligned open proxy.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
cache_app = typer.Typer(cls=_Group, help="Inspect, verify, merge and share logit caches (local paths or fsspec URIs).", no_args_is_help=True)
recipe_app = typer.Typer(cls=_Group, help="Show and check recipes (TOML configs, one table per step).", no_args_is_help=True)
app.add_typer(cache_app, name="cache", rich_help_panel="Share")
app.add_typer(recipe_app, name="recipe", rich_help_panel="Recipes and demo")

RecipeOption = Annotated[Path | None, typer.Option("--recipe", help="Recipe TOML (default: the embedded toy recipe).")]
SetOption = Annotated[list[str] | None, typer.Option("--set", help="Override any recipe value: SECTION.KEY=VALUE (repeatable).", rich_help_panel="Recipe and console")]
CacheURI = Annotated[str, typer.Argument(help="Cache folder: a local path or an fsspec URI (s3://, hf://, memory://, ...).")]
TrainerArgOption = Annotated[list[str] | None, typer.Option("--trainer-arg", help=(
    "Any other Trainer setting, KEY=VALUE (repeatable): a TrainingArguments field (train-student) or SFTConfig/DPOConfig "
    "field (proxy-align), e.g. optim=adamw_torch_fused, torch_compile=true, deepspeed=ds.json."
), rich_help_panel="Trainer and tracking")]
RunNameOption = Annotated[str | None, typer.Option(help="Run name in the trackers (wandb, trackio, mlflow, tensorboard).", rich_help_panel="Trainer and tracking")]
ProjectOption = Annotated[str | None, typer.Option(help="Tracker project: wandb project, trackio project, mlflow experiment.", rich_help_panel="Trainer and tracking")]
LicenseOption = Annotated[str | None, typer.Option(help=(
    "Hub card: the license or terms of what is shared: a Hub license id (apache-2.0, cc-by-4.0, ...) or the text of an API "
    "provider's terms (data made from a paid API carries them)."
))]
VerboseOption = Annotated[bool, typer.Option("-v", "--verbose", help="Show the libraries' output (transformers, TRL, vLLM, warnings) too, not only in the step's log file.", rich_help_panel="Recipe and console")]


def _trainer_table(trainer_arg: list[str] | None, run_name: str | None, project: str | None) -> dict[str, Any] | None:
    """`--trainer-arg`, `--run-name` and `--project` as keys of the step's `trainer` table."""
    from pkd.config import key_values

    table = (key_values(trainer_arg, "--trainer-arg") or {}) | {k: v for k, v in (("run_name", run_name), ("project", project)) if v is not None}
    return table or None


def _print_version(value: bool) -> None:
    """Eager: runs while the options are parsed, before click asks for a command."""
    if value:
        console.print(f"pkd {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: Annotated[bool, typer.Option("--version", callback=_print_version, is_eager=True, help="Print the version and exit.")] = False) -> None:
    """Root options (the app's help text says what pkd does)."""


# pkd teacher-sample -----------------------------------------------------------------------------


@app.command("teacher-sample", rich_help_panel="Pipeline")
def teacher_sample(
    prompts: Annotated[str | None, typer.Option(help="Prompt set: JSONL, Parquet, a saved HF dataset dir (path or fsspec URI), or a Hub dataset ORG/NAME.")] = None,
    prompts_split: Annotated[str | None, typer.Option(help="Split of a Hub dataset (default: train).", rich_help_panel="Prompts")] = None,
    prompts_field: Annotated[list[str] | None, typer.Option(help="Map a pkd field to a column: prompt=question, reference=answer, id=..., messages=... (repeatable).", rich_help_panel="Prompts")] = None,
    recipe: RecipeOption = None,
    out: Annotated[str | None, typer.Option(help="Output folder or URI (default: <run.root>/<run.name>/teacher).")] = None,
    base_url: Annotated[str | None, typer.Option(help="OpenAI-compatible API root, e.g. https://api.openai.com/v1.")] = None,
    model: Annotated[str | None, typer.Option(help="Teacher model name at that endpoint.")] = None,
    api_key_env: Annotated[str | None, typer.Option(help="Environment variable holding the API key (unset: no auth, for local servers).")] = None,
    system_prompt: Annotated[str | None, typer.Option(help="System message for prompts that have none.", rich_help_panel="Prompts")] = None,
    n: Annotated[int | None, typer.Option("--n", help="Samples per prompt.")] = None,
    temperature: Annotated[float | None, typer.Option(help="Sampling temperature.")] = None,
    top_p: Annotated[float | None, typer.Option(help="Nucleus sampling mass.", rich_help_panel="Sampling")] = None,
    max_tokens: Annotated[int | None, typer.Option(help="Response length cap in tokens.")] = None,
    seed: Annotated[int | None, typer.Option(help="Sampling seed: each request carries one derived from it and the prompt id (independent draws across prompts, the same ones on a rerun).", rich_help_panel="Sampling")] = None,
    top_logprobs: Annotated[int | None, typer.Option(help="Also store the teacher's top-K logprobs per token (K <= 20), where the API offers them.", rich_help_panel="Sampling")] = None,
    concurrency: Annotated[int | None, typer.Option(help="Requests in flight.", rich_help_panel="Requests and resuming")] = None,
    request_timeout: Annotated[float | None, typer.Option(help="Seconds before one request is abandoned (then retried).", rich_help_panel="Requests and resuming")] = None,
    max_retries: Annotated[int | None, typer.Option(help="Retries per request for transient errors (429, 5xx, timeouts, ...).", rich_help_panel="Requests and resuming")] = None,
    max_failures: Annotated[int | None, typer.Option(help="Prompts allowed to fail for good before the run stops.", rich_help_panel="Requests and resuming")] = None,
    retry_failed: Annotated[bool | None, typer.Option("--retry-failed", help="Request again the prompts that failed for a transient reason (5xx, timeout, malformed reply, ...).", rich_help_panel="Requests and resuming")] = None,
    retry_after_max: Annotated[float | None, typer.Option(help="Longest wait, in seconds, a Retry-After header may ask for.", rich_help_panel="Requests and resuming")] = None,
    shard_size: Annotated[int | None, typer.Option(help="Rows per committed Parquet shard.", rich_help_panel="Requests and resuming")] = None,
    commit_interval: Annotated[float | None, typer.Option(help="Commit answers at least every N seconds (a crash loses at most that much).", rich_help_panel="Requests and resuming")] = None,
    keep_truncated: Annotated[bool | None, typer.Option("--keep-truncated/--drop-truncated", help="Keep responses cut at --max-tokens.", rich_help_panel="Sampling")] = None,
    limit: Annotated[int | None, typer.Option(help="Only the first N prompts.")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Validate, count prompts and requests, estimate the cost, print the plan; send nothing.")] = False,
    batch: Annotated[bool | None, typer.Option("--batch", help="Send the requests through the Batch API (about half price, answers within --completion-window); rerun to collect.")] = None,
    no_wait: Annotated[bool | None, typer.Option("--no-wait", help="With --batch: submit, record, exit; rerun the same command later to collect.")] = None,
    retry_online: Annotated[bool | None, typer.Option("--retry-online", help="With --batch --retry-failed: request the failed prompts online instead of in a new batch.")] = None,
    completion_window: Annotated[str | None, typer.Option(help="Batch API completion window (e.g. 24h).")] = None,
    batch_max_requests: Annotated[int | None, typer.Option(help="Requests per batch file (the provider's limit).")] = None,
    batch_max_bytes: Annotated[int | None, typer.Option(help="Bytes per batch file (the provider's limit).")] = None,
    poll_interval: Annotated[float | None, typer.Option(help="Seconds between two looks at the submitted batches.")] = None,
    write_requests_only: Annotated[bool, typer.Option("--write-requests-only", help="Write the Batch API request files into <out>/requests/ (for `vllm run-batch` or a provider's console) and exit.")] = False,
    from_batch_output: Annotated[list[str] | None, typer.Option(help="Import Batch API output files (OpenAI's or `vllm run-batch`'s) made from pkd's request files (repeatable).")] = None,
    max_cost: Annotated[float | None, typer.Option(help="USD this folder may cost in all: online stops before exceeding it, a batch over it is not submitted.")] = None,
    price_input: Annotated[float | None, typer.Option(help="USD per 1M prompt tokens (your provider's price for this mode).")] = None,
    price_output: Annotated[float | None, typer.Option(help="USD per 1M completion tokens (your provider's price for this mode).")] = None,
    tokenizer: Annotated[str | None, typer.Option(help="Tokenizer (HF id or folder) counting prompt tokens for the estimate (default: characters / 4).")] = None,
    assign: SetOption = None,
    verbose: VerboseOption = False,
) -> None:
    """Sample the teacher API for every prompt into Parquet shards; resumable, exactly once per sample."""
    from pkd.config import resolve_recipe
    from pkd.steps.teacher_sample import plan_teacher_sample, retryable_failures, run_teacher_sample
    from pkd.teacher.prompts import parse_fields
    from pkd.teacher.samples import FAILURES

    fields = parse_fields(prompts_field or []) or None
    flags = dict(
        prompts=prompts, prompts_split=prompts_split, prompts_fields=fields, out=out, base_url=base_url, model=model, api_key_env=api_key_env, system_prompt=system_prompt, n=n,
        temperature=temperature, top_p=top_p, max_tokens=max_tokens, seed=seed, top_logprobs=top_logprobs, concurrency=concurrency,
        request_timeout_s=request_timeout, max_retries=max_retries, max_failures=max_failures, retry_failed=retry_failed,
        retry_after_max_s=retry_after_max, shard_size=shard_size, commit_interval_s=commit_interval, keep_truncated=keep_truncated, limit=limit,
        mode="batch" if batch else None, wait=False if no_wait else None, retry_online=retry_online, completion_window=completion_window,
        batch_max_requests=batch_max_requests, batch_max_bytes=batch_max_bytes, poll_interval_s=poll_interval, max_cost=max_cost,
        price_input=price_input, price_output=price_output, tokenizer=tokenizer,
    )  # fmt: skip
    r = resolve_recipe(recipe, assign, "teacher_sample", flags)
    if dry_run:
        p = plan_teacher_sample(r.teacher_sample, r.run)
        splits = ", ".join(f"{k} {v:,}" for k, v in sorted(p.splits.items()))
        console.print(f"[bold]plan[/] {p.model} at {p.base_url} -> {p.out}")
        console.print(f"  prompts {p.prompts:,} ({p.done:,} already done); {p.todo:,} requests for {p.samples:,} samples, at most {p.max_completion_tokens:,} completion tokens; splits: {splits or '-'}")
        if p.estimate is not None:
            rule = f"tokenizer {r.teacher_sample.tokenizer}" if r.teacher_sample.tokenizer else "characters / 4"
            console.print(f"  estimate ({p.mode}, prompt tokens by {rule}): {p.estimate.line()}" + (f" in {p.request_files:,} batch files" if p.mode == "batch" else ""))
        if p.spent_usd is not None:
            console.print(f"  spent on this folder so far: ${p.spent_usd:,.4f}" + (f" of --max-cost ${r.teacher_sample.max_cost:,.4f}" if r.teacher_sample.max_cost else ""))
        console.print("  dry run: nothing sent")
        return
    with step_console("teacher-sample", r.teacher_sample.out or r.run.artifact_dir("teacher"), verbose=verbose):
        s = run_teacher_sample(r.teacher_sample, r.run, requests_only=write_requests_only, imports=from_batch_output)
    if s.written:
        console.print(f"[green]wrote {len(s.written):,} request files[/] for {s.plan.todo:,} prompts: " + ", ".join(s.written))
        console.print(f"  run them elsewhere (e.g. `vllm run-batch -i FILE -o OUT --model ...`), then import: pkd teacher-sample ... --from-batch-output OUT")
        return
    c, now = s.counts, s.session
    retry = retryable_failures(c)
    hint = f"; {c.get('failed', 0):,} failed (see {s.plan.out}/{FAILURES}), {retry:,} of them for a transient reason: rerun with --retry-failed to request those again" if retry else ""
    if not now and s.pending:
        console.print(f"[yellow]{len(s.pending):,} batches submitted or running[/] ({', '.join(s.pending)}): rerun the same command to collect them (without --no-wait it waits)")
        return
    if not now:
        console.print(f"[green]nothing to do[/] {s.plan.out}: all {s.plan.prompts:,} prompts already handled ({c.get('samples', 0):,} samples){hint}")
        return
    t = Table(title=f"teacher-sample -> {s.plan.out}", title_justify="left")
    for col in ("", "this run", "whole folder"):
        t.add_column(col, justify="right" if col else "left")
    keys = ["prompts_done", "samples", "requests", "retries", "prompt_tokens", "completion_tokens"]
    keys += sorted(k for k in {**c, **now} if k.startswith(("dropped_", "failed", "retry_after", "batch_")))
    for k in keys:
        t.add_row(k.replace("_", " "), f"{now.get(k, 0):,}", f"{c.get(k, 0):,}")
    rate = now.get("samples", 0) / max(s.elapsed_s, 1e-9)
    t.caption = f"{c.get('prompts_done', 0):,}/{s.plan.prompts:,} prompts done in this folder; {s.elapsed_s:.1f} s, {rate:.1f} samples/s"
    console.print(t)
    if c.get("failed"):
        console.print(f"{c['failed']:,} prompts failed for good (see {s.plan.out}/{FAILURES})" + (f"; {retry:,} for a transient reason: rerun with --retry-failed to request them again" if retry else ""))
    if s.pending:
        console.print(f"[yellow]{len(s.pending):,} batches still running[/] ({', '.join(s.pending)}): rerun the same command to collect them (without --no-wait it waits)")


# pkd proxy-align -------------------------------------------------------------------------------


@app.command("proxy-align", rich_help_panel="Pipeline")
def proxy_align(
    model: Annotated[str | None, typer.Option(help="Proxy base model: local HF directory or hub id.")] = None,
    teacher: Annotated[str | None, typer.Option(help="`pkd teacher-sample` output (default: <run.root>/<run.name>/teacher).")] = None,
    recipe: RecipeOption = None,
    out: Annotated[str | None, typer.Option(help="Local output folder (default: <run.root>/<run.name>/proxy).")] = None,
    student: Annotated[str | None, typer.Option(help="Student model, only to check the vocabularies match (default: [train_student] student).", rich_help_panel="Output and tracking")] = None,
    lora: Annotated[bool | None, typer.Option("--lora/--full", help="Train a LoRA adapter or all weights.", rich_help_panel="LoRA")] = None,
    lora_r: Annotated[int | None, typer.Option(help="LoRA rank (one vLLM serves: 1, 8, 16, 32, 64, 128, 256, 320, 512).", rich_help_panel="LoRA")] = None,
    lora_alpha: Annotated[int | None, typer.Option(help="LoRA alpha.", rich_help_panel="LoRA")] = None,
    lora_dropout: Annotated[float | None, typer.Option(help="LoRA dropout.", rich_help_panel="LoRA")] = None,
    lora_target: Annotated[str | None, typer.Option(help="LoRA target modules: 'all-linear' or comma-separated names.", rich_help_panel="LoRA")] = None,
    learning_rate: Annotated[float | None, typer.Option("--lr", help="Learning rate (warm-up and rounds).", rich_help_panel="Training")] = None,
    lr_scheduler: Annotated[str | None, typer.Option(help="transformers scheduler name, e.g. constant, cosine.", rich_help_panel="Training")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Samples (pairs) per device per micro-batch.", rich_help_panel="Training")] = None,
    grad_accum: Annotated[int | None, typer.Option(help="Micro-batches per optimizer step.", rich_help_panel="Training")] = None,
    warmup_epochs: Annotated[float | None, typer.Option(help="Epochs of warm-up SFT on D_w (0: skip).", rich_help_panel="Training")] = None,
    epochs: Annotated[float | None, typer.Option(help="Epochs over each round's pairs.", rich_help_panel="Training")] = None,
    max_length: Annotated[int | None, typer.Option(help="Prompt + response tokens kept per sample.", rich_help_panel="Training")] = None,
    rounds: Annotated[int | None, typer.Option(help="Alignment rounds K (0: warm-up only).")] = None,
    chunk_size: Annotated[int | None, typer.Option(help="D_p prompts per round (default: D_p / rounds).")] = None,
    beta: Annotated[float | None, typer.Option(help="DPO β.", rich_help_panel="Training")] = None,
    engine: Annotated[str | None, typer.Option(help="Proxy sampling engine: vllm, hf or auto (vLLM on a GPU, transformers on a CPU, where a round generates faster).", rich_help_panel="Sampling")] = None,
    sample_merged: Annotated[str | None, typer.Option(help=(
        "vLLM + LoRA: sample each round from base + adapter merged into one model in the round's work folder (auto, always, never). "
        "auto merges where vLLM runs on the CPU, where its LoRA path is the slow part; on a GPU it keeps the adapter, since a "
        "big proxy's merge costs minutes and its size in disk every round."
    ), rich_help_panel="Sampling")] = None,
    temperature: Annotated[float | None, typer.Option(help="Proxy sampling temperature.", rich_help_panel="Sampling")] = None,
    top_p: Annotated[float | None, typer.Option(help="Proxy nucleus sampling mass.", rich_help_panel="Sampling")] = None,
    max_new_tokens: Annotated[int | None, typer.Option(help="Proxy response length cap in tokens.", rich_help_panel="Sampling")] = None,
    gpu_memory_utilization: Annotated[float | None, typer.Option(help="Share of the GPU vLLM may take while it samples.", rich_help_panel="Sampling")] = None,
    eval_samples: Annotated[int | None, typer.Option(help="Held-out teacher samples (from D_s) every stage is measured on.", rich_help_panel="Held-out measures and selection")] = None,
    answer_pattern: Annotated[str | None, typer.Option(help=(
        "Skill = greedy exact match against the prompts' `reference`: compare the last match of this regex (group 1 if any) "
        "instead of the whole answer, e.g. '#### (\\S+)' for GSM8K."
    ), rich_help_panel="Held-out measures and selection")] = None,
    eval_tasks: Annotated[str | None, typer.Option(help="lm-eval tasks measured after every stage too, comma-separated (pip install 'pkd[eval]').", rich_help_panel="Held-out measures and selection")] = None,
    eval_limit: Annotated[int | None, typer.Option(help="--eval-tasks: first N documents per task.", rich_help_panel="Held-out measures and selection")] = None,
    select: Annotated[str | None, typer.Option(help=(
        "Which stage is the output proxy: best (lowest held-out teacher NLL among the stages whose skill stays within "
        "--max-skill-drop of the base proxy's) or last (the last round, as in the paper)."
    ), rich_help_panel="Held-out measures and selection")] = None,
    max_skill_drop: Annotated[float | None, typer.Option(help="--select best: skill points (exact match %, or mean lm-eval score %) a stage may lose against the base proxy.", rich_help_panel="Held-out measures and selection")] = None,
    nll_weight: Annotated[float | None, typer.Option(help="Weight of NLL(teacher response) beside the DPO term in each round (1: the paper's sum).", rich_help_panel="Training")] = None,
    precision: Annotated[str | None, typer.Option(help="auto (bf16 on GPU, fp32 on CPU), bf16 or fp32.", rich_help_panel="Training")] = None,
    gradient_checkpointing: Annotated[bool | None, typer.Option("--gradient-checkpointing/--no-gradient-checkpointing", help="Trade compute for memory.", rich_help_panel="Training")] = None,
    logging_steps: Annotated[int | None, typer.Option(help="Log every N steps.", rich_help_panel="Output and tracking")] = None,
    merge: Annotated[bool | None, typer.Option("--merge/--no-merge", help="Also write base + adapter merged into one model.", rich_help_panel="Output and tracking")] = None,
    seed: Annotated[int | None, typer.Option(help="Order, sampling and training seed (default: run.seed).", rich_help_panel="Training")] = None,
    report_to: Annotated[str | None, typer.Option(help="Trackers, comma-separated: none, tensorboard, wandb, mlflow, trackio, ... (default: tensorboard if installed).", rich_help_panel="Trainer and tracking")] = None,
    run_name: RunNameOption = None,
    project: ProjectOption = None,
    trainer_arg: TrainerArgOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.", rich_help_panel="Output and tracking")] = False,
    assign: SetOption = None,
    verbose: VerboseOption = False,
) -> None:
    """Align the proxy to the teacher: warm-up SFT on D_w, then K rounds of DPO + NLL; resumable."""
    from pkd.align.report import table
    from pkd.config import resolve_recipe
    from pkd.steps.proxy_align import run_proxy_align

    flags = dict(
        model=model, teacher=teacher, out=out, student=student, lora=lora, lora_r=lora_r, lora_alpha=lora_alpha,
        lora_dropout=lora_dropout, lora_target=lora_target, learning_rate=learning_rate, lr_scheduler=lr_scheduler,
        per_device_batch_size=batch_size, grad_accum=grad_accum, warmup_epochs=warmup_epochs, epochs=epochs, max_length=max_length,
        rounds=rounds, chunk_size=chunk_size, beta=beta, engine=engine, sample_merged=sample_merged, temperature=temperature, top_p=top_p,
        max_new_tokens=max_new_tokens, gpu_memory_utilization=gpu_memory_utilization, eval_samples=eval_samples,
        answer_pattern=answer_pattern, eval_tasks=eval_tasks, eval_limit=eval_limit, select=select, max_skill_drop=max_skill_drop,
        nll_weight=nll_weight, precision=precision, gradient_checkpointing=gradient_checkpointing, logging_steps=logging_steps, merge=merge, seed=seed,
        report_to=report_to, trainer=_trainer_table(trainer_arg, run_name, project),
    )  # fmt: skip
    r = resolve_recipe(recipe, assign, "proxy_align", flags)
    with step_console("proxy-align", r.proxy_align.out or r.run.artifact_dir("proxy"), verbose=verbose):
        s = run_proxy_align(r, say=lambda msg: terminal().print(escape(msg), highlight=False), progress=True)
    if as_json:
        console.print_json(json.dumps(s.report))
        return
    console.print(table(s.report))
    chosen = s.report["selection"]
    console.print(f"selected {chosen['stage']}: {escape(chosen['reason'])}", highlight=False)
    if s.skill_warning:
        console.print(f"[yellow]warning: the aligned proxy lost task skill: {escape(s.skill_warning)}[/]", highlight=False)
    ran = ", ".join(s.ran) or "nothing (all stages were done)"
    console.print(f"[green]aligned[/] {s.report['final']} (report.json beside it); ran {ran} in {s.elapsed_s:.1f} s")


# pkd cache-logits -------------------------------------------------------------------------------


@app.command("cache-logits", rich_help_panel="Pipeline")
def cache_logits(
    proxy: Annotated[str | None, typer.Option(help="`pkd proxy-align` output: base + adapter from its manifest (default: <run.root>/<run.name>/proxy).")] = None,
    teacher: Annotated[str | None, typer.Option(help="`pkd teacher-sample` output (default: <run.root>/<run.name>/teacher).")] = None,
    recipe: RecipeOption = None,
    model: Annotated[str | None, typer.Option(help="Proxy base or merged model directory (instead of, or overriding the base of, --proxy).", rich_help_panel="Which proxy")] = None,
    adapter: Annotated[str | None, typer.Option(help="LoRA adapter directory to score with (its base: --model or the adapter's record).", rich_help_panel="Which proxy")] = None,
    no_adapter: Annotated[bool | None, typer.Option("--no-adapter", help="Score with the base model alone (the unaligned-proxy ablation).", rich_help_panel="Which proxy")] = None,
    student: Annotated[str | None, typer.Option(help="Student model directory: refuse to start if the cache would not fit its tokenizer/vocab.", rich_help_panel="Which proxy")] = None,
    out: Annotated[str | None, typer.Option(help="Cache folder or URI (default: <run.root>/<run.name>/logits, or logits-parts/I-of-N with --part).")] = None,
    split: Annotated[str | None, typer.Option(help="Split to score: distill (D_s, the default), align or warmup.", rich_help_panel="What is kept")] = None,
    k: Annotated[int | None, typer.Option("--k", help="Top-k ids/logprobs kept per response position.", rich_help_panel="What is kept")] = None,
    sampled: Annotated[int | None, typer.Option("--sampled", help="Instead of the top-k: N draws per position from the proxy's full distribution (RS-KD; transformers engine).", rich_help_panel="What is kept")] = None,
    proposal_temperature: Annotated[float | None, typer.Option(help="--sampled: temperature of the distribution drawn from (≠ 1: the loss importance-weights the draws).", rich_help_panel="What is kept")] = None,
    max_logprobs: Annotated[int | None, typer.Option(help="Largest k the engine accepts (vLLM's max_logprobs, default 20).", rich_help_panel="What is kept")] = None,
    engine: Annotated[str | None, typer.Option(help="Scoring engine: vllm, hf or auto (vLLM on a GPU, transformers on a CPU, where it scores faster).", rich_help_panel="Engine and parts")] = None,
    dtype: Annotated[str | None, typer.Option(help="Model dtype: auto (the checkpoint's), bfloat16, float16, float32.", rich_help_panel="Engine and parts")] = None,
    max_length: Annotated[int | None, typer.Option(help="Prompt + response tokens per sample.", rich_help_panel="What is kept")] = None,
    overflow: Annotated[str | None, typer.Option(help="Longer samples: 'truncate' the response end or 'skip' them.", rich_help_panel="What is kept")] = None,
    part: Annotated[str | None, typer.Option(help="I/N: score only part I of N (chunk c of shard-rows samples of the row order goes to part c mod N); `pkd cache merge` puts the parts back together as one run's cache. auto: from SLURM_ARRAY_TASK_ID/COUNT or torchrun's RANK/WORLD_SIZE.", rich_help_panel="Engine and parts")] = None,
    parts: Annotated[int | None, typer.Option(help="Launch N parts (--launcher), retry the failed ones, and merge them into --out.", rich_help_panel="On a cluster")] = None,
    launcher: Annotated[str | None, typer.Option(help="Where --parts run: local (processes here, one per GPU), slurm (a job array through submitit) or ray (Ray tasks).", rich_help_panel="On a cluster")] = None,
    max_retries: Annotated[int | None, typer.Option(help="--parts: resubmissions of a failed part before the launch fails.", rich_help_panel="On a cluster")] = None,
    no_wait: Annotated[bool, typer.Option("--no-wait", help="--parts on slurm: submit and exit; the same command later watches the recorded jobs and merges.", rich_help_panel="On a cluster")] = False,
    partition: Annotated[str | None, typer.Option(help="slurm: partition.", rich_help_panel="On a cluster")] = None,
    time_limit: Annotated[str | None, typer.Option("--time", help="slurm: time limit per part (MIN, HH:MM:SS or D-HH:MM:SS).", rich_help_panel="On a cluster")] = None,
    account: Annotated[str | None, typer.Option(help="slurm: account.", rich_help_panel="On a cluster")] = None,
    constraint: Annotated[str | None, typer.Option(help="slurm: node constraint, e.g. 'a100|h100'.", rich_help_panel="On a cluster")] = None,
    sbatch: Annotated[list[str] | None, typer.Option(help="slurm: extra sbatch setting KEY=VALUE, e.g. qos=high (repeatable).", rich_help_panel="On a cluster")] = None,
    ray_address: Annotated[str | None, typer.Option(help="ray: cluster address (auto: the running cluster; local: start one here).", rich_help_panel="On a cluster")] = None,
    shard_rows: Annotated[int | None, typer.Option(help="Samples per shard: the unit of scoring, resumption and parts (a setting of the cache: a rerun must keep it).", rich_help_panel="Engine and parts")] = None,
    batch_tokens: Annotated[int | None, typer.Option(help="Transformers engine: padded tokens per forward.", rich_help_panel="Engine and parts")] = None,
    gpu_memory_utilization: Annotated[float | None, typer.Option(help="Share of the GPU vLLM takes.", rich_help_panel="Engine and parts")] = None,
    tensor_parallel_size: Annotated[int | None, typer.Option(help="vLLM: GPUs one proxy is split over.", rich_help_panel="Engine and parts")] = None,
    assign: SetOption = None,
    verbose: VerboseOption = False,
) -> None:
    """Score the teacher's responses with the proxy into the logit cache (top-k per position, ℓ, μ/γ); resumable."""
    from pkd.config import override, resolve_recipe
    from pkd.steps.cache_logits import default_out, run_cache_logits

    flags = dict(
        proxy=proxy, teacher=teacher, model=model, adapter=adapter, no_adapter=no_adapter, student=student, out=out, split=split, k=k,
        mode="sampled" if sampled is not None else None, samples=sampled, proposal_temperature=proposal_temperature, max_logprobs=max_logprobs, engine=engine, dtype=dtype, max_length=max_length, overflow=overflow, part=part,
        shard_rows=shard_rows, batch_tokens=batch_tokens, gpu_memory_utilization=gpu_memory_utilization,
        tensor_parallel_size=tensor_parallel_size,
    )  # fmt: skip
    r = resolve_recipe(recipe, assign, "cache_logits", flags)
    extra = dict(x.split("=", 1) for x in sbatch or [] if "=" in x)
    if sbatch and len(extra) != len(sbatch):
        raise ConfigError(f"--sbatch {next(x for x in sbatch if '=' not in x)!r}: expected KEY=VALUE, e.g. qos=high")
    launch = dict(parts=parts, launcher=launcher, max_retries=max_retries, partition=partition, time=time_limit, account=account, constraint=constraint, ray_address=ray_address)
    launch = {k: v for k, v in launch.items() if v is not None} | ({"sbatch": r.cache_logits.launch.sbatch | extra} if extra else {})
    if launch:
        r = override(r, "cache_logits", {"launch": r.cache_logits.launch.model_dump() | launch})
    cfg = r.cache_logits
    if parts is not None or launcher is not None or (cfg.launch.parts > 1 and cfg.part == "0/1"):  # a recipe's parts yield to --part
        if cfg.part != "0/1":
            raise ConfigError(f"--part {cfg.part} scores one part; --parts {cfg.launch.parts} launches them all: pass one of the two")
        _launch(cfg, r.run, wait=not no_wait, verbose=verbose)
        return
    if no_wait:
        raise ConfigError("--no-wait goes with --parts N (launched parts); a single cache-logits run has nothing to wait for")
    if cfg.part == "auto":
        from pkd.launch.env import part_from_env

        cfg.part, source = part_from_env(os.environ)
        console.print(f"part {cfg.part} (from {source})", highlight=False)
    with step_console("cache-logits", cfg.out or default_out(r.run, *cfg.part_index), verbose=verbose):
        s = run_cache_logits(cfg, r.run)
    if s.proxy_stage:
        _print_proxy_stage(s.proxy_stage)
    m = s.manifest
    if not s.scored:
        console.print(f"[green]nothing to do[/] {s.out}: the cache is complete ({m.rows:,} samples, {m.tokens:,} tokens)")
        return
    t = Table(title=f"cache-logits -> {s.out}", show_header=False, title_justify="left")
    t.add_column(style="bold")
    t.add_column(justify="right")
    rows = [
        ("samples in split/part", f"{s.counts.get('samples', 0):,}"),
        ("scored now / in cache", f"{s.scored:,} / {m.rows:,}"),
        ("truncated / skipped (too long, empty)", f"{s.counts.get('truncated', 0):,} / {s.counts.get('skipped_too_long', 0):,}, {s.counts.get('skipped_empty', 0):,}"),
        ("response tokens now / in cache", f"{s.tokens:,} / {m.tokens:,}"),
        ("engine tokens/s", f"{s.tokens_per_s:,.0f} ({s.engine})"),
        ("bytes per token", f"{m.total_bytes / max(m.tokens, 1):.2f}"),
        ("ℓ μ / γ", f"{m.seq_logprob.mu:.4f} / {m.seq_logprob.gamma:.4f}" if m.seq_logprob else "-"),
    ]
    for key, value in rows:
        t.add_row(key, value)
    t.caption = f"{m.codec['name']} k={m.codec['k']}, vocab {m.vocab_size:,}; {s.elapsed_s:.1f} s in all"
    console.print(t)


def _launch(cfg: CacheLogitsConfig, run: RunConfig, *, wait: bool, verbose: bool) -> None:
    """`cache-logits --parts N`: launch, watch and merge; then the parts' timeline."""
    from pkd.steps.cache_logits import launch_cache_logits

    out = cfg.out or run.artifact_dir("logits")
    with step_console("cache-logits", out, verbose=verbose):
        s = launch_cache_logits(cfg, run, wait=wait)
    if s.timeline:
        t = Table(title=f"{s.parts} parts on {s.launcher} ({s.record})", title_justify="left")
        for col in ("part", "start s", "end s", "retries", "jobs", "state"):
            t.add_column(col, justify="left" if col in ("jobs", "state") else "right")
        for row in s.timeline:
            state = row["result"] or "running"
            t.add_row(str(row["part"]), "-" if row["start_s"] is None else f"{row['start_s']:.1f}", "-" if row["end_s"] is None else f"{row['end_s']:.1f}", str(row["retries"]), ", ".join(row["jobs"]), state)
        console.print(t)
    m = s.manifest
    if m is None:
        console.print(f"submitted; rerun the same command to watch the parts and merge them into {s.out}")
    elif not s.merged:
        console.print(f"[green]nothing to do[/] {s.out}: the merged cache is complete ({m.rows:,} samples, {m.tokens:,} tokens)")
    else:
        console.print(f"[green]merged[/] {s.parts} parts into {s.out}: {m.rows:,} samples, {m.tokens:,} tokens, ℓ μ={m.seq_logprob.mu:.4f} γ={m.seq_logprob.gamma:.4f}; {s.elapsed_s:.1f} s")
        if s.idle:
            console.print(f"[yellow]warning: {len(s.idle)} of {s.parts} parts had nothing to score ({', '.join(map(str, s.idle))}): a part scores whole shards, and D_s made {len(m.files)}; "
                          f"--shard-rows {s.even_shard_rows} or less gives every part work[/]", highlight=False)  # fmt: skip


def _print_proxy_stage(stage: dict[str, Any]) -> None:
    """Which proxy-align stage the cache is scored with, its held-out figures against the base
    proxy's, and a yellow line when it lost more skill than proxy-align allowed."""

    def figures(prefix: str) -> str:
        em = stage.get(prefix + "exact_match")
        return f"NLL/token {stage[prefix + 'nll_per_token']:.4f}, top-1 {stage[prefix + 'top1_agreement']:.3f}" + ("" if em is None else f", exact match {em:.1%}")

    console.print(f"proxy: {stage['stage']} ({figures('')}; base proxy: {figures('base_')})", highlight=False)
    if stage.get("skill_kept") is False:
        console.print(f"[yellow]warning: this proxy lost task skill in alignment: {escape(stage['reason'])}[/]", highlight=False)


# pkd train-student ------------------------------------------------------------------------------


@app.command("train-student", rich_help_panel="Pipeline")
def train_student(
    cache: Annotated[str | None, typer.Option(help="Logit cache folder or URI (default: <run.root>/<run.name>/logits).")] = None,
    student: Annotated[str | None, typer.Option(help="Student base model directory.")] = None,
    recipe: RecipeOption = None,
    out: Annotated[str | None, typer.Option(help="Local output folder (default: <run.root>/<run.name>/student).")] = None,
    alpha: Annotated[float | None, typer.Option(help="KD strength α; 0 = plain SFT on the teacher's tokens.")] = None,
    tail: Annotated[str | None, typer.Option(help="Mass outside the cached top-k: 'tail' (a rest bucket on both sides) or 'renorm' (the proxy's top-k renormalised, against the student's full-vocabulary log-probs).", rich_help_panel="Loss")] = None,
    temperature: Annotated[float | None, typer.Option(help="KD temperature τ (loss scaled by τ²).", rich_help_panel="Loss")] = None,
    uniform_weights: Annotated[bool | None, typer.Option("--uniform-weights/--proxy-weights", help="Every w = the cache's mean σ((ℓ − μ)/γ) instead of its own: same α·E(w), no spread.", rich_help_panel="Loss")] = None,
    weight_ce: Annotated[bool | None, typer.Option("--weight-ce/--no-weight-ce", help=(
        "Weight the CE term by the sample weight too, as w / w̄ (w̄: the cache's token-weighted mean w, so CE keeps its scale "
        "on average): a wrong teacher response is then learnt less through CE as well as KD. Beyond the paper (off: its loss)."
    ), rich_help_panel="Loss")] = None,
    lora: Annotated[bool | None, typer.Option("--lora/--full", help="Train a LoRA adapter or all weights.", rich_help_panel="Training")] = None,
    lora_r: Annotated[int | None, typer.Option(help="LoRA rank.", rich_help_panel="Training")] = None,
    learning_rate: Annotated[float | None, typer.Option("--lr", help="Peak learning rate.", rich_help_panel="Training")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Samples per device per micro-batch.", rich_help_panel="Training")] = None,
    grad_accum: Annotated[int | None, typer.Option(help="Micro-batches per optimizer step.", rich_help_panel="Training")] = None,
    epochs: Annotated[float | None, typer.Option(help="Passes over the cache (sets max_steps unless given).", rich_help_panel="Training")] = None,
    max_steps: Annotated[int | None, typer.Option(help="Optimizer steps.")] = None,
    max_length: Annotated[int | None, typer.Option(help="Truncate samples to this many tokens.", rich_help_panel="Training")] = None,
    precision: Annotated[str | None, typer.Option(help="auto (bf16 on GPU, fp32 on CPU), bf16 or fp32.", rich_help_panel="Training")] = None,
    data_streams: Annotated[int | None, typer.Option(help="Fixed number of data streams (a multiple of the process count); keep it to resume on another world size.", rich_help_panel="Training")] = None,
    workers: Annotated[int | None, typer.Option(help="Dataloader worker processes per rank.", rich_help_panel="Training")] = None,
    save_steps: Annotated[int | None, typer.Option(help="Checkpoint every N steps.", rich_help_panel="Checkpoints")] = None,
    logging_steps: Annotated[int | None, typer.Option(help="Log every N steps.", rich_help_panel="Checkpoints")] = None,
    seed: Annotated[int | None, typer.Option(help="Data order and initialisation seed (default: run.seed).", rich_help_panel="Training")] = None,
    report_to: Annotated[str | None, typer.Option(help="Trackers, comma-separated: none, tensorboard, wandb, mlflow, trackio, ... (default: tensorboard if installed).", rich_help_panel="Trainer and tracking")] = None,
    run_name: RunNameOption = None,
    project: ProjectOption = None,
    trainer_arg: TrainerArgOption = None,
    assign: SetOption = None,
    verbose: VerboseOption = False,
) -> None:
    """Distil the logit cache into the student (Proxy-KD); resumes from the last checkpoint in --out."""
    from pkd.config import resolve_recipe
    from pkd.steps.train_student import train_student as run_train_student

    flags = dict(
        cache=cache, student=student, out=out, alpha=alpha, tail=tail, temperature=temperature, uniform_weights=uniform_weights, weight_ce=weight_ce,
        lora=lora, lora_r=lora_r, learning_rate=learning_rate, per_device_batch_size=batch_size, grad_accum=grad_accum,
        epochs=epochs, max_steps=max_steps, max_length=max_length, precision=precision, data_streams=data_streams,
        dataloader_workers=workers, save_steps=save_steps, logging_steps=logging_steps, seed=seed, report_to=report_to,
        trainer=_trainer_table(trainer_arg, run_name, project),
    )  # fmt: skip
    r = resolve_recipe(recipe, assign, "train_student", flags)
    with step_console("train-student", r.train_student.out or r.run.artifact_dir("student"), verbose=verbose):
        res = run_train_student(r.train_student, r.run, progress=True, command=shlex.join(["pkd", *sys.argv[1:]]))
    if os.environ.get("RANK", "0") != "0":
        return
    final = ", ".join(f"{k} {v:.4f}" for k, v in res.final.items())
    if res.loss_path:
        console.print(f"[dim]Proxy-KD loss: {res.loss_path}[/]", highlight=False)
    console.print(f"[green]{res.status}[/] {res.out}: {res.steps:,} steps, {res.tokens:,} tokens, {res.tokens_per_s:,.0f} tokens/s; {final or '-'}")


# pkd eval ---------------------------------------------------------------------------------------


@app.command("eval", rich_help_panel="Pipeline")
def evaluate(
    model: Annotated[str | None, typer.Option(help="Model directory: base, merged, or a LoRA adapter.")] = None,
    samples: Annotated[str | None, typer.Option(help="Held-out `pkd teacher-sample` output to score (no default: without it, or [eval] samples in a --recipe, only --tasks run).")] = None,
    recipe: RecipeOption = None,
    base: Annotated[str | None, typer.Option(help="Base model for an adapter (default: the one the adapter names).", rich_help_panel="Teacher samples")] = None,
    split: Annotated[str | None, typer.Option(help="Split to score: warmup, align, distill, or 'all'.", rich_help_panel="Teacher samples")] = None,
    tasks: Annotated[str | None, typer.Option(help="Standard benchmarks, comma-separated lm-eval task names (gsm8k,arc_easy,...): needs pkd[eval].")] = None,
    num_fewshot: Annotated[int | None, typer.Option(help="Benchmarks: few-shot examples (default: each task's own).", rich_help_panel="Benchmarks (lm-eval)")] = None,
    include_path: Annotated[str | None, typer.Option(help="Benchmarks: a folder of local lm-eval task YAML files.", rich_help_panel="Benchmarks (lm-eval)")] = None,
    apply_chat_template: Annotated[bool | None, typer.Option("--apply-chat-template/--no-chat-template", help="Benchmarks: prompts in the model's chat format (a student trained on chat-formatted data).", rich_help_panel="Benchmarks (lm-eval)")] = None,
    gen_kwargs: Annotated[str | None, typer.Option(help="Benchmarks: generation settings for generative tasks, lm-eval's 'temperature=0,max_gen_toks=256'.", rich_help_panel="Benchmarks (lm-eval)")] = None,
    log_samples: Annotated[bool | None, typer.Option("--log-samples", help="Benchmarks: every scored document (prompt, answer, score) to <--out>.samples.jsonl.", rich_help_panel="Benchmarks (lm-eval)")] = None,
    limit: Annotated[int | None, typer.Option(help="Only the first N samples (and N documents per benchmark task).")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Samples per forward.", rich_help_panel="Teacher samples")] = None,
    max_length: Annotated[int | None, typer.Option(help="Truncate samples to this many tokens.", rich_help_panel="Teacher samples")] = None,
    max_new_tokens: Annotated[int | None, typer.Option(help="Greedy answer length for exact match.", rich_help_panel="Teacher samples")] = None,
    answer_pattern: Annotated[str | None, typer.Option(help="Regex for the stated answer exact match compares (group 1 if any; the last match wins).", rich_help_panel="Teacher samples")] = None,
    out: Annotated[str | None, typer.Option(help="Write the report JSON here.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
    assign: SetOption = None,
    verbose: VerboseOption = False,
) -> None:
    """Score a model on held-out teacher samples (NLL per token, top-1 agreement, exact match) and standard benchmarks."""
    from pkd.config import resolve_recipe
    from pkd.steps.evaluate import evaluate as run_evaluate

    flags = dict(
        model=model, samples=samples, base=base, split=split, tasks=tasks, num_fewshot=num_fewshot, include_path=include_path, limit=limit,
        apply_chat_template=apply_chat_template, gen_kwargs=gen_kwargs, log_samples=log_samples,
        batch_size=batch_size, max_length=max_length, max_new_tokens=max_new_tokens, answer_pattern=answer_pattern, out=out,
    )  # fmt: skip
    r = resolve_recipe(recipe, assign, "eval", flags)
    with step_console("eval", _eval_log_base(r.eval.out, r.eval.model), verbose=verbose):
        report = run_evaluate(r.eval, r.run, progress=True)
    if as_json:
        console.print_json(json.dumps(report))
        return
    if "rows" in report:
        t = Table(title=f"eval {report['model']} on {report['samples']} ({report['split']})", show_header=False, title_justify="left")
        t.add_column(style="bold")
        t.add_column(justify="right")
        for key, label in (("rows", "samples"), ("tokens", "response tokens"), ("nll_per_token", "NLL / token"), ("perplexity", "perplexity"), ("top1_agreement", "top-1 agreement"), ("exact_match", "exact match")):
            value = report.get(key)
            t.add_row(label, "-" if value is None else f"{value:,}" if isinstance(value, int) else f"{value:.4f}")
        if report.get("exact_match") is not None:
            t.caption = f"exact match over {report['exact_match_rows']:,} samples with a reference"
        console.print(t)
    if report.get("skipped"):
        console.print(f"[dim]skipped {escape(report['skipped'])}[/]")
    if bench := report.get("benchmarks"):
        t = Table(title=f"benchmarks (lm-eval {bench['lm_eval_version']})", title_justify="left")
        for col in ("task", "metric", "value", "± stderr", "docs"):
            t.add_column(col, justify="left" if col in ("task", "metric") else "right")
        for task, metrics in bench["tasks"].items():
            for key, value in metrics.items():
                if "," not in key or "_stderr," in key:  # metric,filter pairs only (sample_len is the docs count)
                    continue
                stderr = metrics.get(key.replace(",", "_stderr,", 1))
                t.add_row(task, key.split(",")[0], f"{value:.4f}", "-" if stderr is None else f"{stderr:.4f}", f"{bench['samples'].get(task, '-')}")
        console.print(t)


def _eval_log_base(out: str | None, model: str | None) -> str | None:
    """Where eval's log goes: beside its report (`x/eval.json` -> `x/eval.log`), else beside the
    model (`run/student` -> `run/student.eval.log`), else nowhere."""
    if out:
        return str(Path(out).with_suffix(""))
    return f"{model.rstrip('/')}.eval" if model else None


# pkd push-model, pkd teacher-export ----------------------------------------------------------------


def _print_plan(kind: str, target: Any, plan: list[Any], card: Path) -> None:
    """A dry run's plan (one commit, its files) and the card it would publish."""
    console.print(f"[bold]plan[/] one commit to {kind} {target.repo_id}{'@' + target.revision if target.revision else ''}: {len(plan)} files")
    for u in plan:
        console.print(f"  {escape(u.path_in_repo)}  <- {escape(str(u.source))}", highlight=False)
    console.print(card.read_text(), markup=False, highlight=False)


@app.command("push-model", rich_help_panel="Share")
def push_model(
    folder: Annotated[Path, typer.Argument(help="`pkd train-student` output folder (model/, report.json, manifest.json).")],
    dst: Annotated[str, typer.Argument(help="Model repository: hf://ORG/NAME (optionally @BRANCH).")],
    eval_reports: Annotated[list[Path] | None, typer.Option("--eval", help="`pkd eval --out` report(s) to show in the model card (repeatable).")] = None,
    license: LicenseOption = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the model card and the commit's files; upload nothing.")] = False,
) -> None:
    """Upload a trained student (model or LoRA adapter) with its model card, in one commit."""
    import tempfile

    from pkd.student.hub import push_model as run_push

    with tempfile.TemporaryDirectory(prefix="pkd-card-") as tmp:
        target, plan, url = run_push(folder, dst, Path(tmp), evals=eval_reports, license=license, dry_run=dry_run)
        if dry_run:
            _print_plan("model", target, plan, Path(tmp, "README.md"))
            return
    console.print(f"[green]pushed[/] {folder} -> {dst}: {len(plan)} files in one commit {url}")


@app.command("teacher-export", rich_help_panel="Share")
def teacher_export(
    teacher: Annotated[str, typer.Argument(help="`pkd teacher-sample` output folder or URI.")],
    dst: Annotated[str, typer.Argument(help="New local folder, or hf://datasets/ORG/NAME to push it in one commit.")],
    split: Annotated[str | None, typer.Option(help="Only one of pkd's splits: warmup, align or distill (default: every sample).")] = None,
    license: LicenseOption = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Hub: print the dataset card and the commit's files; upload nothing.")] = False,
) -> None:
    """Export the teacher's samples as a conversational dataset (`messages` with the assistant turn, as TRL reads it), with a card."""
    import tempfile

    from pkd.cache.hub import is_hub_dataset, parse_hub_uri
    from pkd.hub import hub_commit
    from pkd.store import Folder
    from pkd.teacher.export import export_plan, export_samples

    if not is_hub_dataset(dst):
        if dry_run:
            raise ConfigError("--dry-run plans a Hub push (hf://datasets/ORG/NAME); a local export just writes the folder")
        out = Path(dst)
        if out.exists() and any(out.iterdir()):
            raise ConfigError(f"{out}: not empty; teacher-export writes a new folder")
        rows, shards, model = export_samples(Folder(teacher), out, split=split, license=license)
        console.print(f"[green]exported[/] {rows:,} samples of {model} -> {out} ({len(shards)} shards, {sum(p.stat().st_size for p in shards):,} bytes)")
        return
    target = parse_hub_uri(dst)
    with tempfile.TemporaryDirectory(prefix="pkd-export-") as tmp:
        rows, shards, model = export_samples(Folder(teacher), Path(tmp), split=split, license=license)
        plan = export_plan(Path(tmp), shards, target)
        if dry_run:
            _print_plan("dataset", target, plan, Path(tmp, "README.md"))
            return
        url = hub_commit(dst, target, plan, "dataset", f"pkd teacher-export: {rows:,} responses of {model}")
    console.print(f"[green]pushed[/] {rows:,} samples of {model} -> {dst}: {len(plan)} files in one commit {url}")


# pkd demo ----------------------------------------------------------------------------------------


@app.command("demo", rich_help_panel="Recipes and demo")
def demo(
    quick: Annotated[bool, typer.Option("--quick", help="A smaller world and one seed: a ~3-minute smoke test.")] = False,
    real: Annotated[bool, typer.Option("--real", help="A real model instead of the toy world: SmolLM2-135M-Instruct as the teacher (recipes/smollm2.toml).")] = False,
    root: Annotated[Path | None, typer.Option(help="Where the world, the run and the results live (default: cache/demo/full, cache/demo/quick or cache/demo/real).")] = None,
    seeds: Annotated[list[int] | None, typer.Option("--seed", help="Seeds (repeatable; default 0 1 2 3 4, quick: 0). Toy demo: each one is an alignment of the proxy, its caches and a student per variant; --real: student seeds.")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Keep the last run's artifacts: every step resumes or skips what it finished.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the results as JSON.")] = False,
) -> None:
    """The whole pipeline on the embedded toy world (or, with --real, a real model), then Proxy-KD against black-box KD."""
    if real:
        from pkd.toy.real import results_table, run_real_demo as run
    else:
        from pkd.toy.demo import run_demo as run
        from pkd.toy.results import results_table

    results = run(root, quick=quick, seeds=seeds, resume=resume, say=lambda line: console.print(escape(line)))
    if as_json:
        console.print_json(json.dumps(results))
        return
    console.print()
    console.print(results_table(results))
    files = results["files"]
    chart = f", chart: {files['chart']}" if "chart" in files else ""  # the real demo draws none
    console.print(f"results: {files['results']}{chart} (demo took {results['timings_s']['total']:.0f} s)")


# pkd cache ---------------------------------------------------------------------------------------


@cache_app.command("inspect")
def cache_inspect(uri: CacheURI, as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")] = False) -> None:
    """Summarise a cache: rows, tokens, k, codec, bytes/token, fingerprints, μ/γ, ℓ histogram."""
    from pkd.cache.ops import summarize
    from pkd.store import Folder

    s = summarize(Folder(uri))
    m = s.manifest
    counts, edges = s.seq_logprob_hist
    if as_json:
        out = m.model_dump(exclude={"files", "config"}) | {
            "uri": s.uri,
            "rows": m.rows,
            "tokens": m.tokens,
            "bytes": m.total_bytes,
            "bytes_per_token": s.bytes_per_token,
            "files": len(m.files),
            "seq_logprob_histogram": {"counts": counts.tolist(), "edges": edges.tolist()},
        }
        console.print_json(json.dumps(out))
        return
    t = Table(title=f"logit cache {s.uri}", show_header=False, title_justify="left")
    t.add_column(style="bold")
    t.add_column()
    codec = m.codec
    rows = [
        ("complete", "yes" if m.complete else "[red]no (interrupted writer)[/]"),
        ("rows / tokens", f"{m.rows:,} / {m.tokens:,}"),
        ("files / bytes", f"{len(m.files)} / {m.total_bytes:,}"),
        ("bytes per token", f"{s.bytes_per_token:.2f}"),
        ("k / vocab", f"{codec.get('k')} / {m.vocab_size:,}"),
        ("codec", f"{codec.get('name')} v{codec.get('version')} {json.dumps(codec.get('params', {}))}"),
        ("format", f"v{m.format_version} (pkd {m.pkd_version}, {m.created_at})"),
        ("teacher", m.teacher_model or "-"),
        ("tokenizer fingerprint", m.tokenizer_fingerprint),
        ("proxy fingerprint", m.proxy_fingerprint),
        ("ℓ μ / γ", f"{m.seq_logprob.mu:.4f} / {m.seq_logprob.gamma:.4f}" if m.seq_logprob else "-"),
    ]
    for k, v in rows:
        t.add_row(k, v)
    console.print(t)
    if len(counts):
        console.print("[bold]ℓ = mean response logprob per sample[/]")
        top = max(int(counts.max()), 1)
        for c, lo, hi in zip(counts, edges[:-1], edges[1:]):
            console.print(f"  [{lo:8.3f}, {hi:8.3f})  {'█' * round(30 * c / top):<30} {c}")


@cache_app.command("verify")
def cache_verify(
    uri: CacheURI,
    decode: Annotated[bool, typer.Option("--decode/--no-decode", help="Also decode every row (slower, checks the codec streams).")] = True,
) -> None:
    """Check sha256, schema, counts and decodability of every shard; exit 1 naming each bad file."""
    from pkd.cache.ops import verify
    from pkd.store import Folder

    report = verify(Folder(uri), decode=decode)
    if report.ok:
        console.print(f"[green]ok[/] {report.uri}: {report.files_checked} files verified")
        return
    for p in report.problems:
        err_console.print(f"[red]bad[/] {escape(p)}", highlight=False, soft_wrap=True)
    err_console.print(f"[bold red]{len(report.problems)} problem(s)[/] in {report.uri}")
    raise typer.Exit(1)


@cache_app.command("merge")
def cache_merge(
    out: Annotated[str, typer.Argument(help="New, empty folder or URI for the merged cache.")],
    parts: Annotated[list[str], typer.Argument(help="Caches to join (e.g. the outputs of `--part i/N` runs).")],
) -> None:
    """Join caches: the parts of one `--part I/N` run become that run's cache, byte for byte; refuses mismatched tokenizer/proxy, k, codec or overlapping samples."""
    from pkd.cache.ops import merge
    from pkd.store import Folder

    m = merge([Folder(p) for p in parts], Folder(out))
    how = f"the {len(parts)} parts of one run into {out}, the cache one process writes" if "merged_from" not in m.config else f"{len(parts)} caches into {out}"
    console.print(f"[green]merged[/] {how}: {m.rows:,} rows, {m.tokens:,} tokens, ℓ μ={m.seq_logprob.mu:.4f} γ={m.seq_logprob.gamma:.4f}")


def _copy(src: str, dst: str, verb: str) -> None:
    from pkd.cache.ops import copy_cache
    from pkd.store import Folder

    r = copy_cache(Folder(src), Folder(dst))
    replaced = "; the destination's manifest differed from the source's and was replaced" if r.manifest_replaced else ""
    console.print(f"[green]{verb}[/] {src} -> {dst}: {r.transferred} of {len(r.manifest.files)} files transferred and verified ({r.manifest.total_bytes:,} bytes in the cache){replaced}")


@cache_app.command("push")
def cache_push(
    src: CacheURI,
    dst: Annotated[str, typer.Argument(help="Destination folder or URI: s3://bucket/caches/run, or hf://datasets/ORG/NAME for the Hub.")],
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Hub: write the dataset card and print the commit's files; upload nothing.")] = False,
    license: LicenseOption = None,
    proxy_name: Annotated[str | None, typer.Option(help="Hub: the proxy model's name for the card (the cache holds only its fingerprint).")] = None,
    student_name: Annotated[str | None, typer.Option(help="Hub: the student model the cache was made for, for the card.")] = None,
) -> None:
    """Upload a complete cache, checking each file's sha256; manifest last (the Hub: one commit with a dataset card)."""
    from pkd.cache.hub import is_hub_dataset

    if not is_hub_dataset(dst):
        if dry_run:
            raise ConfigError("--dry-run plans a Hub push (hf://datasets/ORG/NAME); other destinations copy file by file")
        _copy(src, dst, "pushed")
        return
    import tempfile

    from pkd.cache.hub import push_to_hub
    from pkd.store import Folder

    with tempfile.TemporaryDirectory(prefix="pkd-card-") as tmp:
        target, plan, url = push_to_hub(Folder(src), dst, Path(tmp), dry_run=dry_run, license=license, proxy=proxy_name, student=student_name)
        if dry_run:
            _print_plan("dataset", target, plan, Path(tmp, "README.md"))
            return
    console.print(f"[green]pushed[/] {src} -> {dst}: {len(plan)} files in one commit {url}")


@cache_app.command("export")
def cache_export(
    src: CacheURI,
    out: Annotated[str, typer.Argument(help="New folder or URI for the export (or an interrupted export of the same cache, to resume).")],
    fmt: Annotated[str, typer.Option("--format", help="plain: per-position top-k ids/logprobs as pkd reads them; axolotl: the columns axolotl's KD plugin trains on.")] = "plain",
) -> None:
    """Decode a cache into plain Parquet any tool reads with `datasets` alone (no pkd), shard by shard, with a card."""
    from pkd.cache.export import export_cache
    from pkd.cache.ops import read_cache_manifest
    from pkd.progress import StepProgress
    from pkd.store import Folder

    cache = Folder(src)
    shards = len(read_cache_manifest(cache).files)
    with StepProgress(shards, description="cache export", unit="shards") as bar:
        s = export_cache(cache, Folder(out), fmt, on_shard=lambda done, rows: bar.update(done=done))  # type: ignore[arg-type]
    resumed = f" ({s.shards - s.written} were already there)" if s.written < s.shards else ""
    console.print(f"[green]exported[/] {src} -> {out} ({fmt}): {s.rows:,} rows in {s.shards} shards{resumed}")
    console.print(f"  {s.export_bytes:,} bytes against the cache's {s.cache_bytes:,}: {s.export_bytes / max(s.cache_bytes, 1):.1f}x")


@cache_app.command("pull")
def cache_pull(src: CacheURI, dst: Annotated[str, typer.Argument(help="Local destination folder.")]) -> None:
    """Download a cache, verified before use: safe paths, sha256, schema, fingerprints."""
    _copy(src, dst, "pulled")


# pkd recipe --------------------------------------------------------------------------------------


@recipe_app.command("show")
def recipe_show(
    path: Annotated[Path | None, typer.Argument(help="Recipe TOML (default: the embedded toy recipe).")] = None,
    assign: Annotated[list[str] | None, typer.Option("--set", help="Override a value: SECTION.KEY=VALUE (repeatable).")] = None,
) -> None:
    """Validate a recipe and print it fully resolved (defaults < recipe < overrides)."""
    from pkd.config import resolve_recipe

    recipe = resolve_recipe(path, assign, "run", {})
    console.print_json(recipe.model_dump_json())


# pkd batch ---------------------------------------------------------------------------------------


@app.command("batch", rich_help_panel="Recipes and demo")
def batch() -> None:
    """Run pkd commands one after another in this process: each pays no start-up (importing
    torch/transformers/TRL, ~7 s on a CPU), which dominates many small runs (a sweep, the demo's
    students). Reads one JSON object a line on stdin, {"argv": ["train-student", ...], "log":
    PATH}; each command's output (terminal and libraries) goes to its log; writes one JSON line a
    command on stdout, {"argv", "exit_code", "seconds"}. Each command gives the same result as
    `pkd ARGV...` on its own (every step seeds what it draws)."""
    import sys
    import time

    sys.stdout.flush()
    replies = os.fdopen(os.dup(1), "w", buffering=1, encoding="utf-8")
    for n, line in enumerate(sys.stdin, 1):
        if not line.strip():
            continue
        try:
            job = json.loads(line)
            argv, log_path = [str(a) for a in job["argv"]], Path(job["log"])
        except (ValueError, KeyError, TypeError) as e:
            raise ConfigError(f"pkd batch: stdin line {n} is not {{\"argv\": [...], \"log\": PATH}} ({type(e).__name__}: {e})") from None
        log_path.parent.mkdir(parents=True, exist_ok=True)
        start = time.monotonic()
        with open(log_path, "w", buffering=1, encoding="utf-8") as log:
            code = _in_process(argv, log.fileno())
        replies.write(json.dumps({"argv": argv, "exit_code": code, "seconds": round(time.monotonic() - start, 2)}) + "\n")
    replies.close()


def _in_process(argv: list[str], fd: int) -> int:
    """One pkd command in this process with fds 1 and 2 on `fd`; its exit code."""
    import sys

    from pkd.console import fds_to

    saved_argv, sys.argv = sys.argv, ["pkd", *argv]
    with fds_to(fd):
        try:
            app(args=argv, prog_name="pkd")
            return 0
        except SystemExit as e:
            return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        except Exception as e:  # noqa: BLE001 - a bug in one command must not lose the others' results
            import traceback

            traceback.print_exc()
            return 1 if not isinstance(e, PkdError) else e.exit_code
        finally:
            sys.argv = saved_argv


def main() -> None:
    app()


if __name__ == "__main__":
    main()
