"""The `pkd` command line: one short command per step; it parses, delegates and prints.

Known errors (`PkdError`) become one red line and a non-zero exit; `PKD_DEBUG=1` shows the
traceback. Heavy imports happen inside commands so that `--help` is instant.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated, Any

import click
import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from pkd import __version__
from pkd.errors import PkdError

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
app.add_typer(cache_app, name="cache")
app.add_typer(recipe_app, name="recipe")

CacheURI = Annotated[str, typer.Argument(help="Cache folder: a local path or an fsspec URI (s3://, hf://, memory://, ...).")]


@app.callback()
def _root(version: Annotated[bool, typer.Option("--version", help="Print the version and exit.")] = False) -> None:
    if version:
        console.print(f"pkd {__version__}")
        raise typer.Exit()


# pkd cache ---------------------------------------------------------------------------------------


@cache_app.command("inspect")
def cache_inspect(uri: CacheURI, as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")] = False) -> None:
    """Summarise a cache: rows, tokens, k, codec, bytes/token, fingerprints, μ/γ, ℓ histogram."""
    from pkd.cache_ops import summarize
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
    from pkd.cache_ops import verify
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
    """Join caches built in parts; refuses mismatched tokenizer/proxy, k, codec or overlapping samples."""
    from pkd.cache_ops import merge
    from pkd.store import Folder

    m = merge([Folder(p) for p in parts], Folder(out))
    console.print(f"[green]merged[/] {len(parts)} caches into {out}: {m.rows:,} rows, {m.tokens:,} tokens, ℓ μ={m.seq_logprob.mu:.4f} γ={m.seq_logprob.gamma:.4f}")


def _copy(src: str, dst: str, verb: str) -> None:
    from pkd.cache_ops import copy_cache
    from pkd.store import Folder

    m, n = copy_cache(Folder(src), Folder(dst))
    console.print(f"[green]{verb}[/] {src} -> {dst}: {n} of {len(m.files)} files transferred and verified ({m.total_bytes:,} bytes in the cache)")


@cache_app.command("push")
def cache_push(src: CacheURI, dst: Annotated[str, typer.Argument(help="Destination folder or URI (e.g. s3://bucket/caches/run).")]) -> None:
    """Upload a complete cache, checking each file's sha256 while it streams; manifest last."""
    _copy(src, dst, "pushed")


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
    from pkd.config import load_recipe, override, parse_assignments

    recipe = load_recipe(path)
    for section, values in parse_assignments(assign or []).items():
        recipe = override(recipe, section, values, source="--set")
    console.print_json(recipe.model_dump_json())


# pkd teacher-sample -----------------------------------------------------------------------------

RecipeOption = Annotated[Path | None, typer.Option("--recipe", help="Recipe TOML (default: the embedded toy recipe).")]
SetOption = Annotated[list[str] | None, typer.Option("--set", help="Override any recipe value: SECTION.KEY=VALUE (repeatable).")]


@app.command("teacher-sample")
def teacher_sample(
    prompts: Annotated[str | None, typer.Option(help="Prompt set: JSONL, Parquet or a saved HF dataset dir (path or fsspec URI).")] = None,
    recipe: RecipeOption = None,
    out: Annotated[str | None, typer.Option(help="Output folder or URI (default: <run.root>/<run.name>/teacher).")] = None,
    base_url: Annotated[str | None, typer.Option(help="OpenAI-compatible API root, e.g. https://api.openai.com/v1.")] = None,
    model: Annotated[str | None, typer.Option(help="Teacher model name at that endpoint.")] = None,
    api_key_env: Annotated[str | None, typer.Option(help="Environment variable holding the API key (unset: no auth, for local servers).")] = None,
    system_prompt: Annotated[str | None, typer.Option(help="System message for prompts that have none.")] = None,
    n: Annotated[int | None, typer.Option("--n", help="Samples per prompt.")] = None,
    temperature: Annotated[float | None, typer.Option(help="Sampling temperature.")] = None,
    top_p: Annotated[float | None, typer.Option(help="Nucleus sampling mass.")] = None,
    max_tokens: Annotated[int | None, typer.Option(help="Response length cap in tokens.")] = None,
    seed: Annotated[int | None, typer.Option(help="Sampling seed sent with every request.")] = None,
    top_logprobs: Annotated[int | None, typer.Option(help="Also store the teacher's top-K logprobs per token (K <= 20), where the API offers them.")] = None,
    concurrency: Annotated[int | None, typer.Option(help="Requests in flight.")] = None,
    request_timeout: Annotated[float | None, typer.Option(help="Seconds before one request is abandoned (then retried).")] = None,
    max_retries: Annotated[int | None, typer.Option(help="Retries per request for transient errors (429, 5xx, timeouts, ...).")] = None,
    max_failures: Annotated[int | None, typer.Option(help="Prompts allowed to fail for good before the run stops.")] = None,
    shard_size: Annotated[int | None, typer.Option(help="Rows per committed Parquet shard.")] = None,
    keep_truncated: Annotated[bool | None, typer.Option("--keep-truncated/--drop-truncated", help="Keep responses cut at --max-tokens.")] = None,
    limit: Annotated[int | None, typer.Option(help="Only the first N prompts.")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Validate, count prompts and requests, print the plan; send nothing.")] = False,
    assign: SetOption = None,
) -> None:
    """Sample the teacher API for every prompt into Parquet shards; resumable, exactly once per sample."""
    from pkd.config import load_recipe, override, parse_assignments
    from pkd.steps.teacher_sample import plan_teacher_sample, run_teacher_sample

    r = load_recipe(recipe)
    for section, values in parse_assignments(assign or []).items():
        r = override(r, section, values, source="--set")
    flags = dict(
        prompts=prompts, out=out, base_url=base_url, model=model, api_key_env=api_key_env, system_prompt=system_prompt, n=n,
        temperature=temperature, top_p=top_p, max_tokens=max_tokens, seed=seed, top_logprobs=top_logprobs, concurrency=concurrency,
        request_timeout_s=request_timeout, max_retries=max_retries, max_failures=max_failures, shard_size=shard_size,
        keep_truncated=keep_truncated, limit=limit,
    )  # fmt: skip
    r = override(r, "teacher_sample", flags)
    if dry_run:
        p = plan_teacher_sample(r.teacher_sample, r.run)
        splits = ", ".join(f"{k} {v:,}" for k, v in sorted(p.splits.items()))
        console.print(f"[bold]plan[/] {p.model} at {p.base_url} -> {p.out}")
        console.print(f"  prompts {p.prompts:,} ({p.done:,} already done); {p.todo:,} requests for {p.samples:,} samples, at most {p.max_completion_tokens:,} completion tokens; splits: {splits or '-'}")
        console.print("  dry run: nothing sent")
        return
    s = run_teacher_sample(r.teacher_sample, r.run)
    c, now = s.counts, s.session
    if not now:
        console.print(f"[green]nothing to do[/] {s.plan.out}: all {s.plan.prompts:,} prompts already sampled ({c.get('samples', 0):,} samples)")
        return
    t = Table(title=f"teacher-sample -> {s.plan.out}", title_justify="left")
    for col in ("", "this run", "whole folder"):
        t.add_column(col, justify="right" if col else "left")
    keys = ["prompts_done", "samples", "requests", "retries", "prompt_tokens", "completion_tokens"]
    keys += sorted(k for k in {**c, **now} if k.startswith(("dropped_", "failed")))
    for k in keys:
        t.add_row(k.replace("_", " "), f"{now.get(k, 0):,}", f"{c.get(k, 0):,}")
    rate = now.get("samples", 0) / max(s.elapsed_s, 1e-9)
    t.caption = f"{c.get('prompts_done', 0):,}/{s.plan.prompts:,} prompts done in this folder; {s.elapsed_s:.1f} s, {rate:.1f} samples/s"
    console.print(t)


def main() -> None:
    app()
