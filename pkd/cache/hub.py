"""Sharing a logit cache on the Hugging Face Hub: `pkd cache push CACHE hf://datasets/ORG/NAME`.

The whole cache goes up in one commit through huggingface_hub's `HfApi.create_commit` (per-file
fsspec writes cost several commits per shard, and a reader could see a half-pushed cache between
them), with a dataset card (README.md) describing it: schema, codec, vocabulary, fingerprints,
μ/γ, lineage and how to load it. The card's `configs` make the shards loadable with
`datasets.load_dataset("ORG/NAME")`; `pkd cache pull hf://datasets/ORG/NAME DIR` reads them back
through fsspec and verifies them (pkd.cache.ops.copy_cache).

`upload_plan` is the commit as data (what goes where), so it can be checked, printed
(`--dry-run`) or applied to a local folder without a network.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from pkd.cache.coded import codec_from_spec
from pkd.cache.ops import read_cache_manifest
from pkd.errors import ConfigError, IntegrityError, StorageError
from pkd.hub import CARD, HubTarget, Upload, hub_commit, license_lines, size_category
from pkd.records import MANIFEST_NAME, LogitCacheManifest, logit_cache_schema
from pkd.store import Folder

_HUB = re.compile(r"^hf://datasets/(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+?)(?:@(?P<rev>[^/]+))?(?:/(?P<path>.+?))?/?$")


def is_hub_dataset(uri: str) -> bool:
    return uri.startswith("hf://")


def parse_hub_uri(uri: str) -> HubTarget:
    """`hf://datasets/ORG/NAME[@REVISION][/PATH]`; anything else on hf:// is a one-line error."""
    m = _HUB.match(uri)
    if not m:
        raise ConfigError(f"{uri}: a cache is pushed to a dataset repository: hf://datasets/ORG/NAME (optionally @BRANCH and /FOLDER)")
    return HubTarget(m["repo"], m["rev"], (m["path"] or "").strip("/"))


def _join(prefix: str, rel: str) -> str:
    return f"{prefix}/{rel}" if prefix else rel


def upload_plan(src: Folder, manifest: LogitCacheManifest, card: Path, target: HubTarget) -> list[Upload]:
    """Every shard (sha256 checked against the manifest first: nothing unverified is published),
    the manifest and the dataset card, as they will sit in the repository."""
    if "://" in src.uri and not src.uri.startswith("file://"):
        raise StorageError(f"{src.uri}: push to the Hub from a local copy (pkd cache pull {src.uri} DIR first)")
    root = Path(src.root)
    plan = []
    for entry in manifest.files:
        if not src.exists(entry.path) or src.sha256(entry.path) != entry.sha256:
            raise IntegrityError(f"{src.where(entry.path)}: missing or its sha256 does not match the manifest; run `pkd cache verify {src.uri}`")
        plan.append(Upload(root / entry.path, _join(target.path_in_repo, entry.path)))
    plan.append(Upload(root / MANIFEST_NAME, _join(target.path_in_repo, MANIFEST_NAME)))
    plan.append(Upload(card, _join(target.path_in_repo, CARD)))
    return plan


def dataset_card(manifest: LogitCacheManifest, target: HubTarget, *, license: str | None = None, proxy: str | None = None, student: str | None = None) -> str:
    """README.md for the dataset repository: YAML header (loadable config, license, size, task,
    tags) and a body that describes the cache, the models behind it and how to use it."""
    codec = codec_from_spec(manifest.codec)
    schema = logit_cache_schema(codec.columns())
    data = _join(target.path_in_repo, "data/*.parquet")
    uri = f"hf://datasets/{target.repo_id}" + (f"@{target.revision}" if target.revision else "") + (f"/{target.path_in_repo}" if target.path_in_repo else "")
    seq = manifest.seq_logprob
    facts = [
        ("rows / response tokens", f"{manifest.rows:,} / {manifest.tokens:,}"),
        ("files / bytes", f"{len(manifest.files)} / {manifest.total_bytes:,} ({manifest.total_bytes / max(manifest.tokens, 1):.1f} B/token)"),
        ("kind", f"{codec.kind}: " + (f"top-{codec.k} ids and logprobs" if codec.kind == "topk" else f"up to {codec.k} distinct draws (ids, counts, logprobs)") + " per response position"),
        ("codec", f"`{manifest.codec.get('name')}` v{manifest.codec.get('version')}, parameters `{json.dumps(manifest.codec.get('params', {}))}`"),
        ("vocabulary size", f"{manifest.vocab_size:,}"),
        ("tokenizer fingerprint", f"`{manifest.tokenizer_fingerprint}`"),
        ("proxy fingerprint", f"`{manifest.proxy_fingerprint}`"),
        ("teacher model", manifest.teacher_model or "-"),
        ("proxy model", proxy or "- (name not given: see the fingerprint)"),
        ("student it was made for", student or "- (any model with the tokenizer above)"),
        ("license / terms", license or "- (not stated: data made from an API carries its provider's terms)"),
        ("ℓ (mean response logprob) μ / γ", f"{seq.mu:.6g} / {seq.gamma:.6g} over {seq.count:,} samples" if seq else "-"),
        ("format", f"logit cache v{manifest.format_version}, written by pkd {manifest.pkd_version} on {manifest.created_at}"),
    ]
    lines = [
        "---",
        *license_lines(license),
        "size_categories:",
        f"- {size_category(manifest.rows)}",
        "task_categories:",
        "- text-generation",
        "tags:",
        "- pkd",
        "- knowledge-distillation",
        "- logit-cache",
        "configs:",
        "- config_name: default",
        "  data_files:",
        "  - split: train",
        f'    path: "{data}"',
        "---",
        "",
        f"# Logit cache: {manifest.teacher_model or 'teacher'} responses scored by an aligned proxy",
        "",
        "Next-token distributions (top-k, or sampled draws) of a proxy model over a black-box teacher's responses, made by",
        "[pkd](https://arxiv.org/abs/2401.07013) (`pkd cache-logits`) for Proxy-KD student training. A",
        "student can use it only if it shares the proxy's tokenizer (the fingerprint below).",
        "",
        "| | |",
        "| --- | --- |",
        *[f"| {k} | {v} |" for k, v in facts],
        "",
        "## Schema",
        "",
        "One row per (prompt, teacher response) sample; Parquet, zstd. The codec streams hold the",
        "proxy's ids and logprobs (and draw counts) per response position, encoded (decode with pkd).",
        "",
        "| column | type |",
        "| --- | --- |",
        *[f"| `{f.name}` | `{f.type}` |" for f in schema],
        "",
        "## Lineage",
        "",
        *[f"- {k}: `{v}`" for k, v in sorted(manifest.inputs.items())],
        "",
        "Configuration it was scored with:",
        "",
        "```json",
        json.dumps(manifest.config, indent=2, sort_keys=True),
        "```",
        "",
        "## How to load it",
        "",
        "```bash",
        f"pkd cache pull {uri} ./cache   # verified: sha256 of every file, schema, counts",
        "pkd train-student --cache ./cache --student STUDENT_DIR",
        "```",
        "",
        "```python",
        "import datasets  # plain Parquet rows (codec streams still encoded)",
        f'rows = datasets.load_dataset("{target.repo_id}", split="train")',
        "",
        "from pkd.cache.ops import read_cache_manifest  # decoded distributions per position",
        "from pkd.cache.shards import iter_samples",
        "from pkd.store import Folder",
        'folder = Folder("./cache")',
        "for sample in iter_samples(folder, read_cache_manifest(folder)):",
        "    ...",
        "```",
        "",
        f"`{MANIFEST_NAME}` lists every file with its sha256; the card is generated from it.",
        "",
    ]
    return "\n".join(lines)


def push_to_hub(
    src: Folder, uri: str, workdir: Path, *, dry_run: bool = False, api: Any = None, license: str | None = None, proxy: str | None = None, student: str | None = None,
) -> tuple[HubTarget, list[Upload], str | None]:
    """Write the card under `workdir`, plan the upload, and (unless `dry_run`) create the dataset
    repository if needed and upload everything in one commit. Returns the target, the plan and
    the commit URL (None for a dry run)."""
    target = parse_hub_uri(uri)
    manifest = read_cache_manifest(src)
    if not manifest.complete:
        raise IntegrityError(f"{src.uri}: cache is incomplete; only complete caches are shared")
    card = workdir / CARD
    card.write_text(dataset_card(manifest, target, license=license, proxy=proxy, student=student), encoding="utf-8")
    plan = upload_plan(src, manifest, card, target)
    if dry_run:
        return target, plan, None
    message = f"pkd cache push: {manifest.rows:,} rows, {len(manifest.files)} shards (k={manifest.codec.get('k')})"
    return target, plan, hub_commit(uri, target, plan, "dataset", message, api)
