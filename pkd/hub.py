"""What every Hub upload shares (a logit cache, a student, the teacher's samples): the target
repository, the files of one commit, the commit itself, and the card's license and size lines.
huggingface_hub is imported only when a commit is made."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pkd.errors import StorageError

CARD = "README.md"


@dataclass(frozen=True)
class HubTarget:
    repo_id: str  # ORG/NAME
    revision: str | None  # branch; None: the default branch
    path_in_repo: str  # "" for the repository root


@dataclass(frozen=True)
class Upload:
    """One file of the commit: its local source and its path in the repository."""

    source: Path
    path_in_repo: str


def size_category(rows: int) -> str:
    """The Hub's `size_categories` bucket for a row count."""
    bounds = [(1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M"), (10_000_000, "1M<n<10M"), (100_000_000, "10M<n<100M")]
    return next((name for limit, name in bounds if rows < limit), "100M<n<1B")


def license_lines(license: str | None) -> list[str]:
    """YAML header lines for a license: a Hub license id as is (apache-2.0, cc-by-4.0, ...), any
    other text (an API's terms) as `other` with that name. Data made from a paid API carries the
    provider's terms: the user states them, pkd cannot know them."""
    if not license:
        return []
    if re.fullmatch(r"[a-z0-9][a-z0-9.+-]*", license):
        return [f"license: {license}"]
    return ["license: other", f"license_name: {json.dumps(license)}"]


def hub_commit(uri: str, target: HubTarget, plan: list[Upload], repo_type: str, message: str, api: Any = None) -> str:
    """Create the repository (and branch) if needed and upload `plan` in one commit: a reader
    never sees half of it. Returns the commit URL."""
    from huggingface_hub import CommitOperationAdd, HfApi
    from huggingface_hub.errors import HfHubHTTPError

    api = api or HfApi()
    operations = [CommitOperationAdd(path_in_repo=u.path_in_repo, path_or_fileobj=str(u.source)) for u in plan]
    try:
        api.create_repo(target.repo_id, repo_type=repo_type, exist_ok=True)
        if target.revision:
            api.create_branch(target.repo_id, repo_type=repo_type, branch=target.revision, exist_ok=True)
        info = api.create_commit(target.repo_id, operations, repo_type=repo_type, revision=target.revision, commit_message=message)
    except HfHubHTTPError as e:
        raise StorageError(f"{uri}: the Hub refused the upload ({str(e).splitlines()[0]}); check HF_TOKEN and your rights on {target.repo_id}") from None
    except Exception as e:  # noqa: BLE001 - offline, DNS, proxy (the hub's HTTP client's own types): a commit is all or nothing
        raise StorageError(f"{uri}: the upload failed ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); nothing was committed, rerun when the Hub is reachable") from None
    return info.commit_url
