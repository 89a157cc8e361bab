"""`pkd push-model DIR hf://ORG/NAME`: a trained student to a Hub model repository, in one commit
as `pkd cache push` does (pkd.hub.hub_commit), with its model card.

The repository gets the model (or LoRA adapter) files at its root, where `from_pretrained` and
PEFT look, each checked against the student folder's manifest first (nothing unverified is
published); the card (README.md, pkd.student.card) regenerated with the `pkd eval` reports given;
and pkd's `report.json` as `pkd_report.json`.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from pkd.hub import CARD, HubTarget, Upload, hub_commit
from pkd.errors import ConfigError, InputError, IntegrityError
from pkd.store import Folder

_MODEL = re.compile(r"^hf://(?!datasets/|spaces/)(?:models/)?(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+?)(?:@(?P<rev>[^/]+))?/?$")
MODEL_DIR = "model/"


def parse_model_uri(uri: str) -> HubTarget:
    """`hf://ORG/NAME[@BRANCH]` (or hf://models/ORG/NAME): a model repository."""
    m = _MODEL.match(uri)
    if not m:
        raise ConfigError(f"{uri}: a model is pushed to a model repository: hf://ORG/NAME (optionally @BRANCH)")
    return HubTarget(m["repo"], m["rev"], "")


def model_plan(folder: Path, card: Path) -> list[Upload]:
    """The student's model files (sha256 checked against its manifest), its report and the card."""
    store = Folder(str(folder))
    if not store.has_manifest():
        raise InputError(f"{folder}: no manifest.json: not a `pkd train-student` output folder (or its training has not finished)")
    manifest = store.read_manifest()
    if manifest.kind != "student" or not manifest.complete:
        raise InputError(f"{folder}: holds a {manifest.kind!r} artifact{'' if manifest.complete else ' (incomplete)'}, not a trained student")
    plan = []
    for entry in manifest.files:
        if not store.exists(entry.path) or store.sha256(entry.path) != entry.sha256:
            raise IntegrityError(f"{store.where(entry.path)}: missing or its sha256 does not match the manifest; the student folder was changed after training")
        if entry.path.startswith(MODEL_DIR):
            plan.append(Upload(folder / entry.path, entry.path.removeprefix(MODEL_DIR)))
    plan.append(Upload(folder / "report.json", "pkd_report.json"))
    plan.append(Upload(card, CARD))
    return plan


def push_model(
    folder: Path, uri: str, workdir: Path, *, evals: list[Path] | None = None, license: str | None = None, dry_run: bool = False, api: Any = None,
) -> tuple[HubTarget, list[Upload], str | None]:
    """Write the card (with the eval reports) under `workdir`, plan the commit and, unless
    `dry_run`, upload it. Returns the target, the plan and the commit URL (None for a dry run)."""
    from pkd.student.card import model_card

    target = parse_model_uri(uri)
    reports = []
    for path in evals or []:
        try:
            reports.append(json.loads(Path(path).read_text()))
        except (OSError, ValueError) as e:
            raise InputError(f"--eval {path}: not a readable `pkd eval --out` report ({type(e).__name__})") from None
    if not (folder / "report.json").is_file():
        raise InputError(f"{folder}: no report.json: not a `pkd train-student` output folder")
    report = json.loads((folder / "report.json").read_text())
    card = workdir / CARD
    card.write_text(model_card(report, reports, license=license), encoding="utf-8")
    plan = model_plan(folder, card)
    if dry_run:
        return target, plan, None
    message = f"pkd push-model: student after {report.get('steps', 0):,} steps on {report.get('cache', {}).get('rows', 0):,} cached samples"
    return target, plan, hub_commit(uri, target, plan, "model", message, api)
