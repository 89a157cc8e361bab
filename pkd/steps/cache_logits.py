"""`pkd cache-logits`: the aligned proxy scores the teacher's responses of D_s, teacher-forced,
into the logit cache (DESIGN §1 stage 2, §3), the shareable artifact that train-student reads.

Per sample: the chat's ids (pkd.models.chat), at every response position the proxy's top-k
ids/logprobs and the teacher token's logprob, and ℓ, their mean; μ and γ of ℓ over the whole
cache go into the manifest when the pass ends (LogitCacheWriter.close).

Order, shards and resumption: the split's samples are taken in the order of a hash of their ids
(ORDER) and cut into chunks of `shard_rows` samples; chunk c is scored in one engine call (which
batches it by `batch_tokens`) and written as shard c (samples the max-length policy skips leave it
shorter). Not in teacher-folder order: that
is the order the teacher's replies happened to arrive in, so two runs over the same samples wrote
differently ordered caches, and a student's data order (a function of its seed and the cache's
row order) was not reproducible; the hash order also starts a streaming shuffle from mixed rows
when the prompt file is grouped by source. A rerun skips the committed chunks and scores the
others exactly as an uninterrupted run would, so after `kill -9` the cache ends up byte for byte
the same; `shard_rows` is therefore one of a cache's settings.

The vLLM engine scores a merged proxy: the adapter is merged into the base once, into
`<out>-work/merged-<fingerprint>` beside a local output (reused by reruns), because vLLM's LoRA
path is several times slower than the plain model and the logits are the same.

Parts (`--part I/N`): chunk c belongs to part c mod N, so N workers split D_s without talking to
each other (each reads the same teacher folder, whose fingerprint every part records); each
writes its own folder (chunk c as data/part-I-c), and `pkd cache merge` puts the chunks back in
their places: the shards a single run writes, byte for byte, as long as the engine scores a
chunk the same in every process (transformers does, at the same `batch_tokens`; vLLM schedules
its own batches).
`launch_cache_logits` runs the N parts itself on a launcher (pkd.launch: local processes, a
SLURM job array, Ray tasks), each part being this same command with `--part I/N`, and merges
them into the requested output.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pkd.models.resolve import local_dir, resolve_model
from pkd.teacher.samples import SHARDS_PREFIX, TeacherSample, read_teacher_samples, teacher_fingerprint
from pkd.cache.coded import SampledCodec
from pkd.cache.topk3 import TopkCopyCodec
from pkd.config import CacheLogitsConfig, RunConfig
from pkd.engines import check_score_args
from pkd.errors import CompatibilityError, ConfigError, InputError
from pkd.fingerprint import files_fingerprint, sha256_text, tokenizer_fingerprint
from pkd.cache.shards import SHARD_DIR, LogitCacheWriter, LogitSample
from pkd.progress import StepProgress
from pkd.records import LogitCacheManifest, Manifest
from pkd.store import TMP_MARK, Folder
from pkd.models.chat import encode_chat

# Settings that may change between a run and its resumption: where things are, how fast they go.
# What the proxy and the teacher samples are is fixed by the manifest's fingerprints instead.
FREE_KEYS = frozenset({"teacher", "proxy", "model", "adapter", "student", "out", "engine", "max_logprobs", "batch_tokens", "gpu_memory_utilization", "tensor_parallel_size", "launch"})
TOKENIZATION = "chat-v1"  # pkd.models.chat's rules: bump when they change what ids a chat gets
HEADER_FIELDS = ("codec", "vocab_size", "tokenizer_fingerprint", "proxy_fingerprint", "teacher_model", "inputs", "config")
ORDER = "sha256(pkd-order-v1, sample id)"  # the row order, recorded in the manifest: a resume must use the same
_ORDER_SALT = b"pkd-order-v1\0"


@dataclass(frozen=True)
class Proxy:
    """What scores: a base or merged model, and an optional LoRA adapter on it."""

    model_dir: Path
    adapter_dir: Path | None
    inputs: dict[str, str]  # lineage: proxy_model (and proxy_adapter) content fingerprints
    stage: dict[str, Any] | None = None  # from a proxy-align folder: the selected stage's held-out figures and why

    @property
    def fingerprint(self) -> str:
        return "proxy-" + sha256_text(self.inputs["proxy_model"], self.inputs.get("proxy_adapter", ""))


@dataclass(frozen=True)
class Item:
    """A sample ready to score."""

    sample_id: str
    ids: np.ndarray  # (L,) int32, at most max_length
    response_start: int


@dataclass
class Summary:
    out: str
    manifest: LogitCacheManifest
    counts: dict[str, int]  # selection: samples of the split and part, truncated, skipped_*
    engine: str = ""  # the engine that ran; "" when there was nothing to score
    proxy_stage: dict[str, Any] | None = None  # the proxy-align stage scored with (Proxy.stage)
    scored: int = 0  # samples scored by this invocation
    tokens: int = 0  # response tokens scored by this invocation
    score_s: float = 0.0  # seconds inside the engine
    elapsed_s: float = 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.score_s if self.score_s else 0.0


def default_out(run: RunConfig, index: int, parts: int) -> str:
    logits = run.artifact_dir("logits")
    return logits if parts == 1 else f"{logits}-parts/{index}-of-{parts}"


# the proxy ------------------------------------------------------------------------------------


def resolve_proxy(cfg: CacheLogitsConfig, run: RunConfig) -> Proxy:
    """Base + adapter from a proxy-align folder's manifest, or from --model / --adapter."""
    model = Path(cfg.model) if cfg.model else None
    adapter = Path(cfg.adapter) if cfg.adapter else None
    recorded_base, stage = None, None
    if cfg.proxy or not (model or adapter):
        root = Path((cfg.proxy or run.artifact_dir("proxy")).removeprefix("file://"))
        m = Folder(str(root)).read_manifest()
        if m.kind != "proxy":
            raise InputError(f"{root} holds a {m.kind!r} artifact, not a proxy (the output of `pkd proxy-align`); or pass --model/--adapter")
        if not m.complete:
            raise InputError(f"{root}: proxy alignment has not finished (manifest says complete=false); rerun `pkd proxy-align` to finish it first")
        if not cfg.adapter and not cfg.no_adapter:
            stage = selected_stage(root)
        if m.config.get("lora", True):
            adapter = adapter or root / "adapter"
            model = model or Path(str(m.config.get("model")))  # as given to proxy-align: a folder or a hub id
            recorded_base = m.inputs.get("proxy_base")
        else:
            model = model or root / "model"
    elif adapter and not model:
        base = json.loads((local_dir(adapter, "adapter_config.json", "LoRA adapter") / "adapter_config.json").read_text()).get("base_model_name_or_path")
        if not base:
            raise InputError(f"the LoRA adapter {adapter} names no base model: pass --model BASE_DIR")
        model = Path(base)
    assert model is not None
    model = resolve_model(model, "proxy model")
    if cfg.no_adapter:
        adapter = None
    inputs = {"proxy_model": files_fingerprint(model)}
    if adapter is not None:
        adapter = local_dir(adapter, "adapter_config.json", "LoRA adapter")
        inputs["proxy_adapter"] = files_fingerprint(adapter)
        if recorded_base and recorded_base != inputs["proxy_model"]:
            raise CompatibilityError(
                f"the proxy model at {model} is not the base the adapter {adapter} was trained on (fingerprint "
                f"{inputs['proxy_model']} now, {recorded_base} in the proxy manifest): pass the right base with --model"
            )
    return Proxy(model, adapter, inputs, stage)


def selected_stage(root: Path) -> dict[str, Any] | None:
    """The stage proxy-align selected as its output, with its held-out figures (None for a folder
    written before proxy-align selected stages)."""
    report = root / "report.json"
    if not report.is_file():
        return None
    data = json.loads(report.read_text())
    if "selection" not in data:
        return None
    figures = next(s for s in data["stages"] if s["stage"] == data["selection"]["stage"])
    keys = ("nll_per_token", "top1_agreement", "exact_match")
    return data["selection"] | {k: figures.get(k) for k in keys} | {"base_" + k: data["stages"][0].get(k) for k in keys}


def _load_tokenizer(model_dir: Path) -> Any:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    if not tokenizer.chat_template:
        raise InputError(f"{model_dir}: the proxy tokenizer has no chat template, so teacher chats cannot be rendered; add a `chat_template` to its tokenizer_config.json")
    return tokenizer


def _model_shape(model_dir: Path) -> tuple[int, int | None]:
    """(vocab size = width of the logits, context length or None)."""
    from transformers import AutoConfig

    text = AutoConfig.from_pretrained(str(model_dir)).get_text_config()
    return int(text.vocab_size), getattr(text, "max_position_embeddings", None)


def check_student(header: LogitCacheManifest, student: str, proxy: Proxy) -> None:
    """Refuse to start a cache the student could not train on (train-student's own check)."""
    from transformers import AutoConfig, AutoTokenizer

    from pkd.student.data import check_student_compatible

    path = resolve_model(student, "student model")
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    vocab = AutoConfig.from_pretrained(str(path)).get_text_config().vocab_size
    check_student_compatible(header, tokenizer, vocab, f"a cache from the proxy {proxy.model_dir} (for the student {path})")


# the samples ----------------------------------------------------------------------------------


def teacher_models(folder: Folder, manifest: Manifest) -> str:
    """The teacher model name(s) the samples record, comma-joined."""
    import pyarrow.parquet as pq

    names: set[str] = set()
    for f in manifest.files:
        if f.path.startswith(SHARDS_PREFIX) and f.path.endswith(".parquet"):
            with folder.open(f.path) as fh:
                names.update(pq.read_table(fh, columns=["teacher"]).column(0).to_pylist())
    return ",".join(sorted(names))


def row_order(sample_id: str) -> bytes:
    """Sort key of a sample's row: a hash of its id, so the order is fixed by the ids alone."""
    return hashlib.sha256(_ORDER_SALT + sample_id.encode("utf-8")).digest()


def select(samples: Iterable[TeacherSample], cfg: CacheLogitsConfig, tokenizer: Any, done: set[str]) -> tuple[dict[int, list[Item]], Counter[str]]:
    """This part's chunks of the split (see the module docstring) as chat ids under the
    max-length policy, by chunk index; committed samples are counted but not returned, and a
    chunk left with nothing to score is left out."""
    index, parts = cfg.part_index
    ordered = sorted((s for s in samples if s.split == cfg.split), key=lambda s: row_order(s.sample_id))
    size, counts = cfg.shard_rows, Counter[str]()
    chunks = {c: _items(ordered[c * size : (c + 1) * size], cfg, tokenizer, done, counts) for c in range(index, -(-len(ordered) // size), parts)}
    return {c: items for c, items in chunks.items() if items}, +counts


def _items(samples: list[TeacherSample], cfg: CacheLogitsConfig, tokenizer: Any, done: set[str], counts: Counter[str]) -> list[Item]:
    """`samples` as chat ids under the max-length policy, tallied in `counts`, less the committed."""
    items = []
    for s in samples:
        counts["samples"] += 1
        chat = encode_chat(tokenizer, s.messages, s.response)
        counts["joined_tokenization"] += chat.joined
        ids = chat.ids
        if len(ids) > cfg.max_length:
            if cfg.overflow == "skip" or chat.response_start >= cfg.max_length:
                counts["skipped_too_long"] += 1
                continue
            counts["truncated"] += 1
            ids = ids[: cfg.max_length]
        if chat.response_start >= len(ids):
            counts["skipped_empty"] += 1
            continue
        if s.sample_id not in done:
            items.append(Item(s.sample_id, np.asarray(ids, np.int32), chat.response_start))
    return items


# the output folder ----------------------------------------------------------------------------


def _differences(old: Any, new: Any, name: str) -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        return [d for key in sorted(set(old) | set(new)) for d in _differences(old.get(key), new.get(key), f"{name}.{key}")]
    return [] if old == new else [f"{name}: {old!r} there, {new!r} now"]


def open_existing(folder: Folder, header: LogitCacheManifest) -> LogitCacheManifest | None:
    """The cache already in `folder` if it was made from the same inputs and settings (None if
    the folder holds none); anything else there is an error naming what differs."""
    folder.check_folder("--out", write=False)
    if not folder.has_manifest():
        foreign = [p for p in folder.listdir() if not p.startswith(SHARD_DIR + "/") and TMP_MARK not in p]
        if foreign:
            raise InputError(f"{folder.uri} is not empty ({foreign[0]}, ...) and holds no logit cache: choose another --out")
        return None
    m = folder.read_manifest()
    if not isinstance(m, LogitCacheManifest):
        raise InputError(f"{folder.uri} holds a {m.kind!r} artifact, not a logit cache: choose another --out")
    diffs = [d for f in HEADER_FIELDS for d in _differences(getattr(m, f), getattr(header, f), f)]
    if diffs:
        raise CompatibilityError(
            f"{folder.uri} holds a logit cache made from other inputs or settings ({'; '.join(diffs)}): "
            "choose another --out, or delete that folder to rebuild it"
        )
    return m


# the step -------------------------------------------------------------------------------------


def scoring_model(proxy: Proxy, engine: str, out: str) -> tuple[str, Path, Path | None]:
    """(engine kind, model folder, adapter folder or None) to score with: for vLLM, the base with
    the adapter merged in (see the module doc); for transformers, base + adapter as given."""
    from pkd.engines import scoring_engine

    kind = engine if engine != "auto" else scoring_engine()
    if kind != "vllm" or proxy.adapter_dir is None:
        return kind, proxy.model_dir, proxy.adapter_dir
    from pkd.engines.merge import merged_model

    work = Path(out.removeprefix("file://") + "-work") if "://" not in out.removeprefix("file://") else Path.home() / ".cache" / "pkd"
    return kind, merged_model(proxy.model_dir, proxy.adapter_dir, work / f"merged-{proxy.fingerprint[:22]}", proxy.inputs), None


def cache_config(cfg: CacheLogitsConfig, run: RunConfig) -> dict[str, Any]:
    """The settings that fix what a cache holds (its manifest's `config`)."""
    config = {k: v for k, v in cfg.model_dump(mode="json").items() if k not in FREE_KEYS} | {"tokenization": TOKENIZATION, "order": ORDER}
    if cfg.mode == "sampled":
        config["draw_seed"] = run.seed  # the draws depend on it: a resume must use the same
    return config


def run_cache_logits(cfg: CacheLogitsConfig, run: RunConfig, *, progress: bool = True) -> Summary:
    """Score every sample of the split (this part's share) not yet in the output folder."""
    from pkd.engines import load_engine
    from pkd.engines.draws import sample_seed

    start = time.monotonic()
    index, parts = cfg.part_index
    teacher = Folder(cfg.teacher or run.artifact_dir("teacher"))
    t_manifest, samples = read_teacher_samples(teacher)
    splits = Counter(s.split for s in samples)
    if not splits[cfg.split]:
        have = ", ".join(f"{k} {v}" for k, v in sorted(splits.items())) or "no rows at all"
        raise InputError(
            f"{teacher.uri}: no teacher samples in split {cfg.split!r} ({have}); cache-logits scores D_s: resample with "
            "[teacher_sample] split_ratios giving it a share (e.g. [0.1, 0.45, 0.45]), or pick another split with --split"
        )
    proxy = resolve_proxy(cfg, run)
    tokenizer = _load_tokenizer(proxy.model_dir)
    vocab, context = _model_shape(proxy.model_dir)
    if cfg.mode == "sampled":
        codec: SampledCodec | TopkCopyCodec = SampledCodec(k=cfg.samples, vocab_size=vocab, proposal_temperature=cfg.proposal_temperature)
        if cfg.engine == "vllm":
            raise ConfigError(
                "[cache_logits] mode = 'sampled' draws from the proxy's exact full distribution, which only the transformers "
                "engine exposes (vLLM returns at most max_logprobs entries per position): use --engine hf (or auto)"
            )
    else:
        codec = TopkCopyCodec(k=cfg.k, vocab_size=vocab)  # refuses k > vocab
        check_score_args([], [], cfg.k, cfg.max_logprobs, vocab)  # refuses k > max_logprobs, saying how to raise it
    if context is not None and cfg.max_length > context:
        raise ConfigError(f"[cache_logits] max_length {cfg.max_length} exceeds the proxy's context of {context} tokens: lower --max-length")
    config = cache_config(cfg, run)
    header = LogitCacheManifest(
        codec=codec.spec(),
        vocab_size=vocab,
        tokenizer_fingerprint=tokenizer_fingerprint(tokenizer),
        proxy_fingerprint=proxy.fingerprint,
        teacher_model=teacher_models(teacher, t_manifest),
        inputs={"teacher": teacher_fingerprint(t_manifest), **proxy.inputs},
        config=config,
    )
    if cfg.student:
        check_student(header, cfg.student, proxy)
    out = cfg.out or default_out(run, index, parts)
    folder = Folder(out)
    existing = open_existing(folder, header)
    if existing is not None and existing.complete:
        counts = {k: v for k, v in existing.counts.items() if k not in ("rows", "tokens")}
        return Summary(folder.uri, existing, counts, elapsed_s=time.monotonic() - start, proxy_stage=proxy.stage)

    folder.check_folder("--out", write=True)  # before the proxy loads, not at the first shard
    with folder.locked("`pkd cache-logits`"):  # one writer per --out (flock: a killed run releases it)
        writer = LogitCacheWriter(folder, header, shard_rows=cfg.shard_rows, part=index)
        done = writer.committed_ids()
        todo, counts = select(samples, cfg, tokenizer, done)
        del samples
        summary = Summary(folder.uri, writer.manifest, dict(counts), proxy_stage=proxy.stage)
        if todo:
            # sampled caches draw from exact logits: transformers only (vLLM is refused at validation)
            kind, model_dir, adapter_dir = scoring_model(proxy, "hf" if cfg.mode == "sampled" else cfg.engine, out)
            with (
                load_engine(
                    kind, model_dir, adapter_dir=adapter_dir, dtype=cfg.dtype, max_logprobs=cfg.max_logprobs,
                    max_model_len=min(cfg.max_length + 1, context or cfg.max_length + 1), seed=run.seed,
                    gpu_memory_utilization=cfg.gpu_memory_utilization, tensor_parallel_size=cfg.tensor_parallel_size,
                    batch_tokens=cfg.batch_tokens,
                ) as engine,
                StepProgress(sum(map(len, todo.values())) + len(done), done=len(done), description="cache-logits", enabled=progress) as bar,
            ):  # fmt: skip
                summary.engine = engine.kind
                for shard, chunk in todo.items():  # one batch and one shard each: see the module docstring
                    tick = time.perf_counter()
                    seqs, starts = [c.ids.tolist() for c in chunk], [c.response_start for c in chunk]
                    if cfg.mode == "sampled":  # seeded per sample: resume and --part draw the same ids
                        seeds = [sample_seed(run.seed, c.sample_id) for c in chunk]
                        results = list(engine.score_sampled(seqs, starts, cfg.samples, seeds=seeds, temperature=cfg.proposal_temperature))
                    else:
                        results = list(engine.score_topk(seqs, starts, cfg.k))
                    summary.score_s += time.perf_counter() - tick
                    writer.write_chunk(shard, [LogitSample(i.sample_id, i.ids, i.response_start, r.topk_ids, r.topk_logprobs, r.token_logprobs, r.counts) for i, r in zip(chunk, results)])
                    tokens = sum(len(r.token_logprobs) for r in results)
                    summary.scored += len(chunk)
                    summary.tokens += tokens
                    bar.update(done=len(chunk), tokens=tokens)
        manifest = writer.close(counts)
    summary.manifest = manifest
    summary.elapsed_s = time.monotonic() - start
    return summary


# launched parts ---------------------------------------------------------------------------------


@dataclass
class LaunchSummary:
    out: str
    parts: int
    launcher: str
    timeline: list[dict[str, Any]]  # per part: start_s, end_s, retries, jobs (pkd.launch.parts.timeline)
    manifest: LogitCacheManifest | None  # the merged cache; None while parts still run (--no-wait)
    merged: bool = False  # merged by this invocation
    idle: list[int] = field(default_factory=list)  # parts that had no shard to score (fewer shards than parts)
    record: str = ""  # launch.json
    elapsed_s: float = 0.0

    @property
    def even_shard_rows(self) -> int:
        """The largest --shard-rows that gives every part a shard of the merged cache's rows."""
        return max(1, -(-self.manifest.rows // self.parts)) if self.manifest else 1


def _set_args(section: str, values: dict[str, Any]) -> list[str]:
    """`--set SECTION.KEY=VALUE` for every given value (JSON scalars and lists are TOML values)."""
    return [a for k, v in values.items() if v is not None for a in ("--set", f"{section}.{k}={json.dumps(v)}")]


def part_command(cfg: CacheLogitsConfig, run: RunConfig, index: int, out: str) -> list[str]:
    """The command of one part: this cache-logits, resolved, as `--part I/N` into `out`."""
    import sys

    values = cfg.model_dump(mode="json", exclude={"out", "part", "launch"})
    return [sys.executable, "-m", "pkd.cli", "cache-logits", *_set_args("run", run.model_dump(mode="json")), *_set_args("cache_logits", values), "--part", f"{index}/{cfg.launch.parts}", "--out", out]


def _finished_already(folder: Folder, expected: dict[str, Any]) -> LogitCacheManifest | None:
    """The cache in `folder` if it is complete and has these settings (`expected`: a single run's,
    which the merge of its parts has too); None if the folder holds nothing but a merge's
    leftovers (removed); anything else is an error."""
    if not folder.has_manifest():
        foreign = [p for p in folder.listdir() if not p.startswith(SHARD_DIR + "/") and TMP_MARK not in p]
        if foreign:
            raise InputError(f"{folder.uri} is not empty ({foreign[0]}, ...) and holds no logit cache: choose another --out")
        for rel in folder.listdir():  # shards of a merge that was interrupted before its manifest
            folder.remove(rel)
        return None
    m = folder.read_manifest()
    if not (isinstance(m, LogitCacheManifest) and m.complete and m.config == expected):
        raise CompatibilityError(f"{folder.uri} holds another cache (not one of these settings, complete): choose another --out, or delete it to rebuild it")
    return m


def launch_cache_logits(cfg: CacheLogitsConfig, run: RunConfig, *, wait: bool = True, progress: bool = True) -> LaunchSummary:
    """Score the split in `cfg.launch.parts` parts on `cfg.launch.launcher`, retry failed parts,
    then merge them into `cfg.out`; a rerun watches the recorded jobs instead of submitting again."""
    from pkd.cache.ops import merge
    from pkd.launch import make_launcher
    from pkd.launch.parts import PartJob, part_complete, run_parts, timeline
    from pkd.progress import PartsProgress

    start = time.monotonic()
    launch, n = cfg.launch, cfg.launch.parts
    out = (cfg.out or run.artifact_dir("logits")).rstrip("/")
    local = "://" not in out.removeprefix("file://")
    work = Path(out.removeprefix("file://") + "-parts") if local else Path("pkd-launch") / sha256_text(out)[:16]
    record = work / "launch.json"
    outs = [f"{out}-parts/{i}-of-{n}" for i in range(n)]
    done = _finished_already(Folder(out), cache_config(cfg.model_copy(update={"part": "0/1"}), run))
    if done is not None:
        return LaunchSummary(out, n, launch.launcher, [], done, record=str(record), elapsed_s=time.monotonic() - start)
    cwd = str(Path.cwd())
    jobs = [PartJob(i, part_command(cfg, run, i, outs[i]), outs[i], work / "logs" / f"part-{i}.log", cwd) for i in range(n)]
    gpus = cfg.tensor_parallel_size if launch.gpus_per_part is None else launch.gpus_per_part
    launcher = make_launcher(launch, gpus, work, n)
    try:
        with PartsProgress(n, description=f"cache-logits {n} parts ({launch.launcher})", enabled=progress) as bar:
            rec = run_parts(launcher, jobs, record, max_retries=launch.max_retries, wait=wait, poll_s=launch.poll_s, show=bar.show)
    finally:
        launcher.close()
    summary = LaunchSummary(out, n, launch.launcher, timeline(rec), None, record=str(record))
    if all(part_complete(o) for o in outs):  # always after a wait; after --no-wait once the parts have finished
        summary.manifest, summary.merged = merge([Folder(o) for o in outs], Folder(out)), True
        summary.idle = [i for i, o in enumerate(outs) if not Folder(o).read_manifest().files]
    summary.elapsed_s = time.monotonic() - start
    return summary
