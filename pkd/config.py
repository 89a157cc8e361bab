"""Typed, validated recipes. Precedence, coded once here: defaults < recipe TOML < CLI flags.

A recipe is a TOML file with one table per pipeline step (plus `[run]`). Unknown keys and wrong
types are errors that name the file, the table and the key. Steps add their section model to
`Recipe` as they land.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from pkd.errors import ConfigError
from pkd.splits import DEFAULT_RATIOS, check_ratios
from pydantic import field_validator

RECIPES_DIR = Path(__file__).resolve().parent.parent / "recipes"
DEFAULT_RECIPE = RECIPES_DIR / "toy.toml"


class Section(BaseModel):
    """A recipe table: unknown keys are errors, values are validated on assignment too."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class RunConfig(Section):
    """Where a run's artifacts live: `<root>/<name>/{teacher,proxy,logits,student}/`."""

    name: str = Field(default="toy", pattern=r"^[A-Za-z0-9_.-]+$")
    root: str = "cache"
    seed: int = 0

    def artifact_dir(self, step: str) -> str:
        return f"{self.root.rstrip('/')}/{self.name}/{step}"


class TeacherSampleConfig(Section):
    """`pkd teacher-sample`: the endpoint, how to sample, how hard to push it, where output goes.

    Only the sampling fields (`SAMPLING_KEYS` in pkd.steps.teacher_sample) fix what an output
    folder holds; the others (endpoint URL, concurrency, retries, limit, ...) may change between a
    run and its resumption. The API key is never configured here, only the variable holding it."""

    prompts: str | None = None  # JSONL, Parquet or saved HF dataset dir (local path or fsspec URI)
    out: str | None = None  # default: [run] artifact_dir("teacher")
    base_url: str = "http://127.0.0.1:8000/v1"
    model: str = "teacher"
    api_key_env: str = Field(default="OPENAI_API_KEY", pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    system_prompt: str | None = None  # prepended to prompts that have no system message
    n: int = Field(default=1, ge=1, le=128)  # samples per prompt, one request each prompt
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    max_tokens: int = Field(default=256, ge=1)
    seed: int | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=20)  # store the teacher's own logprobs
    concurrency: int = Field(default=16, ge=1, le=4096)  # requests in flight
    request_timeout_s: float = Field(default=120.0, gt=0)
    max_retries: int = Field(default=6, ge=0)  # per request, for transient errors only
    backoff_s: float = Field(default=0.5, ge=0)  # first retry waits ~this, doubling up to backoff_max_s
    backoff_max_s: float = Field(default=30.0, ge=0)
    max_failures: int = Field(default=100, ge=0)  # permanent per-prompt failures before stopping
    shard_size: int = Field(default=1000, ge=1)  # rows per committed Parquet shard
    keep_truncated: bool = False  # keep responses cut at max_tokens (finish_reason = length)
    split_ratios: tuple[float, float, float] = DEFAULT_RATIOS  # warmup / align / distill
    limit: int | None = Field(default=None, ge=1)  # only the first N prompts

    @field_validator("split_ratios")
    @classmethod
    def _ratios(cls, v: tuple[float, float, float]) -> tuple[float, float, float]:
        return check_ratios(v)


class Recipe(Section):
    run: RunConfig = RunConfig()
    teacher_sample: TeacherSampleConfig = TeacherSampleConfig()


def _describe(err: dict[str, Any]) -> str:
    loc = [str(x) for x in err["loc"]]
    table = f"[{loc[0]}]" if loc else "<top level>"
    key = ".".join(loc[1:])
    if err["type"] == "extra_forbidden":
        return f"{table} unknown key {key!r}" if key else f"unknown table {table}"
    where = f"{table} {key!r}" if key else table
    return f"{where}: {err['msg']} (got {err.get('input')!r})"


def _validation_problem(e: ValidationError, source: str) -> ConfigError:
    problems = "; ".join(_describe(err) for err in e.errors())
    return ConfigError(f"{source}: {problems}")


def load_recipe(path: str | Path | None = None) -> Recipe:
    """Read and validate a recipe file (the embedded toy recipe when `path` is None)."""
    path = Path(path) if path is not None else DEFAULT_RECIPE
    if not path.is_file():
        raise ConfigError(f"{path}: recipe file not found")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None
    try:
        return Recipe.model_validate(data)
    except ValidationError as e:
        raise _validation_problem(e, str(path)) from None


def override(recipe: Recipe, section: str, values: dict[str, Any], source: str = "command line") -> Recipe:
    """Apply flag values (None = not given) over a recipe section; errors name the option."""
    given = {k: v for k, v in values.items() if v is not None}
    if not given:
        return recipe
    merged = recipe.model_dump()
    merged.setdefault(section, {}).update(given)
    try:
        return Recipe.model_validate(merged)
    except ValidationError as e:
        raise _validation_problem(e, source) from None


def parse_assignments(items: list[str]) -> dict[str, dict[str, Any]]:
    """`section.key=value` strings (values parsed as TOML, else kept as strings) by section."""
    out: dict[str, dict[str, Any]] = {}
    for item in items:
        name, sep, raw = item.partition("=")
        section, dot, key = name.strip().partition(".")
        if not sep or not dot or not key:
            raise ConfigError(f"--set {item!r}: expected SECTION.KEY=VALUE, e.g. run.seed=3")
        try:
            value = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            value = raw
        out.setdefault(section, {})[key] = value
    return out
