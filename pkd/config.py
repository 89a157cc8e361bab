"""Typed, validated recipes. Precedence, coded once here: defaults < recipe TOML < CLI flags.

A recipe is a TOML file with one table per pipeline step (plus `[run]`). Unknown keys and wrong
types are errors that name the file, the table and the key. Steps add their section model to
`Recipe` as they land.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from pkd.errors import ConfigError
from pkd.models.lora import check_rank, check_targets
from pkd.teacher.splits import DEFAULT_RATIOS, check_ratios

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

    Only the sampling fields (`SAMPLING_KEYS` in pkd.teacher.samples) fix what an output
    folder holds; the others (endpoint URL, concurrency, retries, limit, ...) may change between a
    run and its resumption. The API key is never configured here, only the variable holding it."""

    prompts: str | None = None  # JSONL, Parquet, saved HF dataset dir (path or fsspec URI), or a Hub dataset ORG/NAME
    prompts_split: str = "train"  # the split of a Hub dataset
    prompts_fields: dict[str, str] = Field(default_factory=dict)  # pkd field -> column, e.g. {prompt = "question"}
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
    retry_after_max_s: float = Field(default=300.0, ge=0)  # a longer Retry-After is cut to this
    retry_failed: bool = False  # request again the prompts that failed for a transient reason
    max_failures: int = Field(default=100, ge=0)  # permanent per-prompt failures before stopping
    shard_size: int = Field(default=1000, ge=1)  # rows per committed Parquet shard
    commit_interval_s: float = Field(default=60.0, gt=0)  # commit pending answers at least this often
    keep_truncated: bool = False  # keep responses cut at max_tokens (finish_reason = length)
    split_ratios: tuple[float, float, float] = DEFAULT_RATIOS  # warmup / align / distill
    limit: int | None = Field(default=None, ge=1)  # only the first N prompts
    mode: Literal["online", "batch"] = "online"  # batch: the Batch API (pkd.teacher.batch), same requests, same output
    batch_max_requests: int = Field(default=50_000, ge=1)  # requests per batch file (the provider's limit)
    batch_max_bytes: int = Field(default=200_000_000, ge=1024)  # bytes per batch file (the provider's limit)
    completion_window: str = "24h"  # batches.create(completion_window=...)
    poll_interval_s: float = Field(default=30.0, gt=0)  # between two looks at the submitted batches
    wait: bool = True  # batch: wait for the batches and collect them (False: submit, record, exit)
    retry_online: bool = False  # batch + retry_failed: request the failed prompts online instead of in a new batch
    max_cost: float | None = Field(default=None, gt=0)  # USD for the whole folder, at price_input/price_output
    price_input: float | None = Field(default=None, ge=0)  # USD per 1M prompt tokens (the user's figure: batch prices differ)
    price_output: float | None = Field(default=None, ge=0)  # USD per 1M completion tokens
    tokenizer: str | None = None  # counts prompt tokens for the cost estimate (default: characters / 4)

    @model_validator(mode="after")
    def _prices(self) -> TeacherSampleConfig:
        if self.max_cost is not None and (self.price_input is None or self.price_output is None):
            raise ValueError("max_cost needs price_input and price_output (USD per 1M tokens) to turn tokens into dollars")
        return self

    @field_validator("split_ratios")
    @classmethod
    def _ratios(cls, v: tuple[float, float, float]) -> tuple[float, float, float]:
        return check_ratios(v)


def _names_list(v: str | list[str] | None) -> list[str] | None:
    """A list option (`report_to`, `tasks`): "a,b" and ["a", "b"] both work."""
    if isinstance(v, str):
        v = [x.strip() for x in v.split(",") if x.strip()]
    return v


def _task_names(v: str | list[str] | None) -> list[str] | None:
    """`tasks`: a list option that, once given, must name at least one task."""
    names = _names_list(v)
    if names is not None and not names:
        raise ValueError(f"{v!r} names no task: give lm-eval task names, e.g. gsm8k,arc_easy")
    return names


def _compiles(v: str | None) -> str | None:
    """An `answer_pattern` must be a regular expression."""
    if v is not None:
        try:
            re.compile(v)
        except re.error as e:
            raise ValueError(f"not a regular expression: {e}") from None
    return v


def report_to(names: list[str] | None, key: str) -> list[str]:
    """Trackers for Trainer's `report_to`: any integration transformers supports (none, tensorboard,
    wandb, mlflow, trackio, ...), checked here so that a typo or a missing package is one line
    naming `key`; by default tensorboard when it is installed, else none."""
    from transformers.integrations.integration_utils import INTEGRATION_TO_CALLBACK, get_available_reporting_integrations

    available = get_available_reporting_integrations()
    if names is None:
        return ["tensorboard"] if "tensorboard" in available else ["none"]
    if names in (["none"], ["all"]):
        return names
    for name in names:
        if name not in INTEGRATION_TO_CALLBACK:
            raise ConfigError(f"{key} = {name!r}: not a tracker transformers knows; choose from none, all, {', '.join(sorted(INTEGRATION_TO_CALLBACK))}")
        if name not in available:
            raise ConfigError(f"{key} = {name!r}: its package is not installed here (e.g. pip install {name.removesuffix('_ml')})")
    return names


class TrainStudentConfig(Section):
    """`pkd train-student`: distil the logit cache into the student (DESIGN §1 stage 2, §5).

    Global batch = per_device_batch_size × grad_accum × processes; max_steps defaults to
    ⌈epochs × cache rows / global batch⌉."""

    cache: str | None = None  # logit cache (path or fsspec URI); default: [run] artifact_dir("logits")
    student: str | None = None  # student base model directory
    out: str | None = None  # local folder; default: [run] artifact_dir("student")
    alpha: float = Field(default=1.0, ge=0.0)  # KD strength; 0 = SFT on teacher outputs
    tail: Literal["tail", "renorm"] = "tail"  # mass outside the cached top-k
    temperature: float = Field(default=1.0, gt=0.0)
    uniform_weights: bool = False  # every w = the cache's mean σ((ℓ − μ)/γ): keeps α·E[w]
    weight_ce: bool = False  # weight CE by w / w̄ too (w̄: the cache's token-weighted mean w, so CE keeps its scale); beyond the paper
    lora: bool = True  # LoRA adapter (peft) or full fine-tuning
    lora_r: int = Field(default=16, ge=1)
    lora_alpha: int = Field(default=32, ge=1)
    lora_dropout: float = Field(default=0.0, ge=0.0, lt=1.0)
    lora_target: str = "all-linear"  # peft target_modules: "all-linear" or comma-separated names
    learning_rate: float = Field(default=1e-5, gt=0.0)
    lr_scheduler: str = "constant"
    warmup_steps: int = Field(default=0, ge=0)
    weight_decay: float = Field(default=0.0, ge=0.0)
    max_grad_norm: float = Field(default=1.0, ge=0.0)
    per_device_batch_size: int = Field(default=4, ge=1)
    grad_accum: int = Field(default=1, ge=1)
    epochs: float = Field(default=1.0, gt=0.0)
    max_steps: int | None = Field(default=None, ge=1)
    max_length: int = Field(default=1024, ge=2)
    shuffle_buffer: int = Field(default=1024, ge=1)
    data_streams: int | None = Field(default=None, ge=1)  # default: processes × max(1, workers)
    dataloader_workers: int = Field(default=0, ge=0)
    precision: Literal["auto", "bf16", "fp32"] = "auto"  # auto: bf16 on GPU, fp32 on CPU
    gradient_checkpointing: bool = False
    logging_steps: int = Field(default=10, ge=1)
    save_steps: int = Field(default=200, ge=1)
    save_total_limit: int | None = Field(default=2, ge=1)
    report_to: list[str] | None = None  # Trainer trackers; default: tensorboard when installed, else none
    seed: int | None = None  # default: [run] seed
    # Any other TrainingArguments field (optim, deepspeed, torch_compile, run_name, project, ...),
    # checked against the real dataclass by pkd.models.trainer_args
    trainer: dict[str, Any] = Field(default_factory=dict)

    split_report_to = field_validator("report_to", mode="before")(_names_list)


class EvalConfig(Section):
    """`pkd eval`: NLL, top-1 agreement and exact match of a model on held-out teacher samples."""

    model: str | None = None  # base model, merged model, or LoRA adapter directory
    base: str | None = None  # base model for an adapter (default: the adapter's own record)
    samples: str | None = None  # `pkd teacher-sample` output; none: no teacher-sample metrics (never a default path: the model may have nothing to do with a run)
    split: str | None = None  # warmup / align / distill; None (or "all"): every row
    limit: int | None = Field(default=None, ge=1)  # first N samples
    batch_size: int = Field(default=8, ge=1)
    max_length: int = Field(default=1024, ge=2)
    max_new_tokens: int = Field(default=64, ge=1)  # greedy answers for exact match
    # Exact match compares what this regex captures (group 1 if it has one, else the whole
    # match; the last match wins) instead of the whole answer, e.g. "#### (\\S+)" for GSM8K.
    answer_pattern: str | None = None
    # Standard benchmarks through lm-evaluation-harness (the `eval` extra): lm-eval task names,
    # e.g. ["gsm8k", "arc_easy"], or local tasks (YAML) found under include_path. `limit` and
    # `batch_size` apply to them too (limit: first N documents per task).
    tasks: list[str] | None = None
    num_fewshot: int | None = Field(default=None, ge=0)  # default: each task's own
    include_path: str | None = None  # folder of lm-eval task YAML files
    apply_chat_template: bool = False  # benchmarks: prompts in the model's chat format (a student trained on chats)
    gen_kwargs: str | None = None  # benchmarks: lm-eval generation settings, "temperature=0,max_gen_toks=256"
    log_samples: bool = False  # benchmarks: every scored document to <out>.samples.jsonl (needs out)
    out: str | None = None  # report JSON path (default: print only)

    split_tasks = field_validator("tasks", mode="before")(_task_names)
    check_answer_pattern = field_validator("answer_pattern")(_compiles)


class ProxyAlignConfig(Section):
    """`pkd proxy-align`: warm-up SFT of the proxy on D_w, then `rounds` of online DPO + NLL on
    chunks of D_p against the previous round's proxy (DESIGN §1 stage 1).

    Steps per round = ⌈epochs × pairs / (per_device_batch_size × grad_accum)⌉. The LoRA settings
    must be ones vLLM can serve (rank in its supported list, no embed/lm_head targets): the
    adapter is what cache-logits loads."""

    teacher: str | None = None  # teacher-sample folder; default: [run] artifact_dir("teacher")
    model: str | None = None  # proxy base: local HF directory or hub id
    student: str | None = None  # for the vocab check; default: [train_student] student
    out: str | None = None  # local folder; default: [run] artifact_dir("proxy")
    lora: bool = True  # LoRA adapter (peft) or full fine-tuning
    lora_r: int = Field(default=16, ge=1)
    lora_alpha: int = Field(default=32, ge=1)
    lora_dropout: float = Field(default=0.05, ge=0.0, lt=1.0)
    lora_target: str = "all-linear"  # peft target_modules: "all-linear" or comma-separated names
    learning_rate: float = Field(default=1e-5, gt=0.0)
    lr_scheduler: str = "constant"
    per_device_batch_size: int = Field(default=4, ge=1)
    grad_accum: int = Field(default=1, ge=1)
    warmup_epochs: float = Field(default=1.0, ge=0.0)  # 0 skips the warm-up SFT
    epochs: float = Field(default=1.0, gt=0.0)  # per alignment round
    max_length: int = Field(default=1024, ge=2)  # prompt + response tokens
    rounds: int = Field(default=3, ge=0)  # K; 0 = warm-up only (the "no preference step" ablation)
    chunk_size: int | None = Field(default=None, ge=1)  # prompts per round; default: D_p / rounds
    beta: float = Field(default=0.1, gt=0.0)
    engine: Literal["vllm", "hf", "auto"] = "auto"  # proxy self-sampling; auto: vLLM on a GPU, transformers on a CPU
    sample_merged: Literal["auto", "always", "never"] = "auto"  # vLLM + LoRA: sample from base + adapter merged; auto: on CPU only
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    max_new_tokens: int = Field(default=256, ge=1)
    gpu_memory_utilization: float = Field(default=0.85, gt=0.0, le=1.0)  # vLLM, in its own process
    eval_samples: int = Field(default=64, ge=0)  # held-out teacher samples (from D_s) every stage is measured on
    # Task skill per stage: greedy exact match against the held-out prompts' `reference` (where
    # they carry one), the answer extracted as `pkd eval` does (answer_pattern: the last match,
    # group 1 if any; None: the whole response); optionally lm-eval tasks too.
    answer_pattern: str | None = None
    eval_tasks: list[str] | None = None  # lm-eval task names measured after every stage (the `eval` extra)
    eval_limit: int | None = Field(default=None, ge=1)  # lm-eval: first N documents per task
    # Which stage becomes the output: "best" = the lowest held-out teacher NLL among the stages
    # (warm-up, rounds) whose skill is within max_skill_drop points of the base proxy's; "last" =
    # the last round, as the paper does.
    select: Literal["best", "last"] = "best"
    max_skill_drop: float = Field(default=5.0, ge=0.0, le=100.0)  # percentage points
    nll_weight: float = Field(default=1.0, ge=0.0)  # weight of NLL(y|x) beside L_pref in each round (1: the paper's sum)
    precision: Literal["auto", "bf16", "fp32"] = "auto"  # auto: bf16 on GPU, fp32 on CPU
    gradient_checkpointing: bool = False
    logging_steps: int = Field(default=10, ge=1)
    merge: bool = False  # also write base + adapter merged into one model
    report_to: list[str] | None = None  # Trainer trackers; default: tensorboard when installed, else none
    seed: int | None = None  # default: [run] seed
    # Any other SFTConfig/DPOConfig field (optim, deepspeed, run_name, project, ...) for the
    # warm-up and every round, checked against the real dataclasses by pkd.models.trainer_args
    trainer: dict[str, Any] = Field(default_factory=dict)

    split_report_to = field_validator("report_to", mode="before")(_names_list)
    split_eval_tasks = field_validator("eval_tasks", mode="before")(_names_list)
    check_answer_pattern = field_validator("answer_pattern")(_compiles)

    @field_validator("lora_r")
    @classmethod
    def _servable_rank(cls, v: int) -> int:
        return check_rank(v)

    @field_validator("lora_target")
    @classmethod
    def _servable_targets(cls, v: str) -> str:
        return check_targets(v)


class LaunchConfig(Section):
    """`[cache_logits.launch]`: run the N parts of a cache-logits pass on a cluster and merge them
    (pkd.launch). `parts` = 1 is a plain single-process run; the SLURM keys are ignored by the other
    launchers, `ray_address` by the others too."""

    parts: int = Field(default=1, ge=1, le=100_000)  # N: parts launched, merged into `out` at the end
    launcher: Literal["local", "slurm", "ray"] = "local"
    max_retries: int = Field(default=2, ge=0)  # resubmissions of one failed part before the launch fails
    gpus_per_part: int | None = Field(default=None, ge=0)  # default: tensor_parallel_size (0: CPU parts)
    cpus_per_part: int = Field(default=1, ge=1)
    max_parallel: int | None = Field(default=None, ge=1)  # parts at once (local default: one per GPU slot, else all)
    poll_s: float = Field(default=5.0, gt=0)  # seconds between two looks at the parts' states
    partition: str | None = None  # SLURM
    time: str = Field(default="24:00:00", pattern=r"^(\d+-)?\d+(:\d+){0,2}$")  # SLURM time limit: MIN, HH:MM:SS or D-HH:MM:SS
    account: str | None = None  # SLURM
    constraint: str | None = None  # SLURM, e.g. "a100|h100"
    sbatch: dict[str, str | int] = Field(default_factory=dict)  # extra sbatch settings, e.g. {qos = "high", mem = "200G"}
    slurm_executor: Literal["slurm", "local"] = "slurm"  # local: submitit runs the job array on this machine (a dry run of the jobs)
    ray_address: str = "auto"  # ray.init(address=...): auto = the running cluster; local = start one here

    @property
    def time_min(self) -> int:
        """`time` in minutes (SLURM's formats: MIN, MIN:SEC, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS)."""
        days, _, rest = self.time.rpartition("-")
        fields = [int(x) for x in rest.split(":")]
        if days:
            h, m, s = (fields + [0, 0])[:3]
        else:
            h, m, s = {1: [0, fields[0], 0], 2: [0, *fields], 3: fields}[len(fields)]
        return max(1, int(days or 0) * 1440 + h * 60 + m + (s + 59) // 60)


class CacheLogitsConfig(Section):
    """`pkd cache-logits`: the proxy scores the teacher's responses of one split (D_s) into the
    logit cache (DESIGN §1 stage 2, §3).

    The proxy is a `pkd proxy-align` folder (base + adapter from its manifest), or `model` (a base
    or merged model) with an optional `adapter`. Only the fields outside `FREE_KEYS` (in
    pkd.steps.cache_logits) fix what a cache holds; paths, engine and batching may change between
    a run and its resumption."""

    teacher: str | None = None  # `pkd teacher-sample` folder; default: [run] artifact_dir("teacher")
    proxy: str | None = None  # `pkd proxy-align` folder; default: [run] artifact_dir("proxy") unless model/adapter are given
    model: str | None = None  # proxy base or merged model directory (overrides the proxy folder's base)
    adapter: str | None = None  # LoRA adapter directory (its base: `model`, else the adapter's record)
    no_adapter: bool = False  # score with the base alone: the unaligned-proxy ablation
    student: str | None = None  # refuse to start unless the cache would fit this student's tokenizer/vocab
    out: str | None = None  # default: [run] artifact_dir("logits"), or logits-parts/I-of-N with --part
    split: Literal["warmup", "align", "distill"] = "distill"
    k: int = Field(default=20, ge=1, le=1024)  # top-k kept per position (paper: 10)
    mode: Literal["topk", "sampled"] = "topk"  # sampled: `samples` draws per position from the full distribution (RS-KD)
    samples: int = Field(default=12, ge=1, le=255)  # sampled mode: draws per position
    proposal_temperature: float = Field(default=1.0, ge=0.05, le=20.0)  # sampled mode: draws from softmax(logits / this)
    max_logprobs: int = Field(default=20, ge=1)  # engine limit on k (vLLM's max_logprobs)
    engine: Literal["vllm", "hf", "auto"] = "auto"
    dtype: str = "auto"  # auto: the checkpoint's dtype; e.g. bfloat16 on GPU
    max_length: int = Field(default=1024, ge=2)  # prompt + response tokens
    overflow: Literal["truncate", "skip"] = "truncate"  # longer chats: cut the response end, or drop them
    part: str = Field(default="0/1", pattern=r"^(\d+/\d+|auto)$")  # I/N: this worker's share of the samples; auto: from SLURM/torchrun (pkd.launch.env)
    shard_rows: int = Field(default=1024, ge=1)  # samples per shard: the unit of scoring, resumption and parts (pkd.steps.cache_logits)
    batch_tokens: int = Field(default=8192, ge=1)  # transformers engine: padded tokens per forward
    gpu_memory_utilization: float = Field(default=0.9, gt=0.0, le=1.0)  # vLLM on GPU
    tensor_parallel_size: int = Field(default=1, ge=1)  # vLLM: GPUs one proxy is split over (a 70B needs several)
    launch: LaunchConfig = LaunchConfig()

    @field_validator("part")
    @classmethod
    def _part(cls, v: str) -> str:
        if v == "auto":
            return v
        index, count = map(int, v.split("/"))
        if not 0 <= index < count:
            raise ValueError(f"part {v!r}: expected I/N with 0 <= I < N, e.g. 0/4")
        return v

    @model_validator(mode="after")
    def _proposal_only_when_sampled(self) -> CacheLogitsConfig:
        if self.mode == "topk" and self.proposal_temperature != 1.0:
            raise ValueError(
                f"proposal_temperature = {self.proposal_temperature} applies to sampled caches only (--sampled N); a top-k cache "
                "keeps the proxy's top-k at temperature 1: drop --proposal-temperature, or add --sampled N"
            )
        return self

    @property
    def part_index(self) -> tuple[int, int]:
        """(I, N) of `part` (`auto` is resolved from the environment before a run: pkd.launch.env)."""
        if self.part == "auto":
            raise ConfigError("[cache_logits] part = 'auto' must be resolved from the environment first (pkd.launch.env.part_from_env)")
        index, count = map(int, self.part.split("/"))
        return index, count


class Recipe(Section):
    run: RunConfig = RunConfig()
    teacher_sample: TeacherSampleConfig = TeacherSampleConfig()
    train_student: TrainStudentConfig = TrainStudentConfig()
    eval: EvalConfig = EvalConfig()
    proxy_align: ProxyAlignConfig = ProxyAlignConfig()
    cache_logits: CacheLogitsConfig = CacheLogitsConfig()


def _describe(err: dict[str, Any]) -> str:
    loc = [str(x) for x in err["loc"]]
    table = f"[{loc[0]}]" if loc else "<top level>"
    key = ".".join(loc[1:])
    if err["type"] == "extra_forbidden":
        return f"{table} unknown key {key!r}" if key else f"unknown table {table}"
    if not key and err["type"] == "value_error":  # a check across a table's keys: the message names them
        return f"{table} {err['msg'].removeprefix('Value error, ')}"
    where = f"{table} {key!r}" if key else table
    return f"{where}: {err['msg']} (got {err.get('input')!r})"


def _validation_problem(e: ValidationError, source: str) -> ConfigError:
    problems = "; ".join(_describe(err) for err in e.errors())
    return ConfigError(f"{source}: {problems}")


def load_recipe(path: str | Path | None = None) -> Recipe:
    """Read and validate a recipe file (the embedded toy recipe when `path` is None)."""
    path = Path(path) if path is not None else DEFAULT_RECIPE
    if path.is_dir():
        raise ConfigError(f"{path}: is a directory, not a recipe file (pass a .toml file, e.g. recipes/toy.toml)")
    if not path.is_file():
        raise ConfigError(f"{path}: recipe file not found")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte {e.start}); a recipe is a TOML file") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot be read ({type(e).__name__}: {e.strerror or e})") from None
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
    target = merged.setdefault(section, {})
    for key, value in given.items():  # a table (e.g. `trainer`) gains keys rather than being replaced
        if isinstance(value, dict) and isinstance(target.get(key), dict):
            target[key] = target[key] | value
        else:
            target[key] = value
    try:
        return Recipe.model_validate(merged)
    except ValidationError as e:
        raise _validation_problem(e, source) from None


def resolve_recipe(path: str | Path | None, assignments: list[str] | None, section: str, flags: dict[str, Any]) -> Recipe:
    """The one precedence chain every command uses: defaults < recipe file < `--set` < flags."""
    recipe = load_recipe(path)
    for name, values in parse_assignments(assignments or []).items():
        recipe = override(recipe, name, values, source="--set")
    return override(recipe, section, flags)


def parse_assignments(items: list[str]) -> dict[str, dict[str, Any]]:
    """`section.key=value` strings (values parsed as TOML, else kept as strings) by section;
    `section.table.key=value` sets a key of a table such as `train_student.trainer`."""
    out: dict[str, dict[str, Any]] = {}
    for item in items:
        name, sep, raw = item.partition("=")
        section, dot, key = name.strip().partition(".")
        if not sep or not dot or not key:
            raise ConfigError(f"--set {item!r}: expected SECTION.KEY=VALUE, e.g. run.seed=3")
        table, dot, field = key.partition(".")
        if dot:
            out.setdefault(section, {}).setdefault(table, {})[field] = toml_value(raw)
        else:
            out.setdefault(section, {})[key] = toml_value(raw)
    return out


def toml_value(raw: str) -> Any:
    """A flag's value parsed as TOML (3, 1e-4, true, [1, 2]), else kept as the string."""
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw


def key_values(items: list[str] | None, flag: str) -> dict[str, Any] | None:
    """`KEY=VALUE` flags (`--trainer-arg optim=adamw_torch_fused`) as a table; None if none."""
    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"{flag} {item!r}: expected KEY=VALUE, e.g. {flag} optim=adamw_torch_fused")
        out[key.strip()] = toml_value(raw)
    return out or None
