"""`pkd cache push CACHE hf://datasets/ORG/NAME`, offline: URI handling, the dataset card, and the
one-commit upload plan applied to a local folder (which must then be a cache `pkd cache verify`
accepts and `datasets` loads through the card's config). The upload itself needs the Hub."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from pkd.cache.hub import dataset_card, parse_hub_uri, push_to_hub
from pkd.cache.ops import read_cache_manifest, verify
from pkd.cli import app
from pkd.errors import ConfigError, IntegrityError, StorageError
from pkd.store import Folder
from synthetic import make_samples, write_cache


@pytest.fixture
def cache(tmp_path) -> str:
    uri = str(tmp_path / "cache")
    write_cache(uri, make_samples(24, k=8), shard_rows=8)
    return uri


def test_hub_uris():
    t = parse_hub_uri("hf://datasets/acme/toy-logits")
    assert (t.repo_id, t.revision, t.path_in_repo) == ("acme/toy-logits", None, "")
    t = parse_hub_uri("hf://datasets/acme/toy-logits@v2/caches/k20/")
    assert (t.repo_id, t.revision, t.path_in_repo) == ("acme/toy-logits", "v2", "caches/k20")
    for bad in ("hf://models/acme/m", "hf://datasets/acme", "hf://acme/x"):
        with pytest.raises(ConfigError, match="hf://datasets/ORG/NAME"):
            parse_hub_uri(bad)


def test_card_describes_the_cache(cache):
    m = read_cache_manifest(Folder(cache))
    card = dataset_card(m, parse_hub_uri("hf://datasets/acme/toy-logits"))
    header = yaml.safe_load(card.split("---")[1])
    assert header["configs"][0]["data_files"][0]["path"] == "data/*.parquet"
    for fact in (m.tokenizer_fingerprint, m.proxy_fingerprint, f"{m.vocab_size:,}", f"{m.seq_logprob.mu:.6g}", m.codec["name"], "`input_ids`", "`sample_id`"):
        assert fact in card, fact
    for key, value in m.inputs.items():
        assert f"{key}: `{value}`" in card
    assert "pkd cache pull hf://datasets/acme/toy-logits ./cache" in card and 'load_dataset("acme/toy-logits"' in card


def test_the_upload_plan_is_the_whole_cache_in_one_commit(cache, tmp_path):
    """Applied to a local folder, the plan must reproduce a cache that verifies, with the card."""
    target, plan, url = push_to_hub(Folder(cache), "hf://datasets/acme/toy-logits/k8", tmp_path, dry_run=True)
    assert url is None and target.path_in_repo == "k8"
    m = read_cache_manifest(Folder(cache))
    assert sorted(u.path_in_repo for u in plan) == sorted([f"k8/{f.path}" for f in m.files] + ["k8/manifest.json", "k8/README.md"])
    repo = tmp_path / "repo"
    for u in plan:
        (repo / u.path_in_repo).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(u.source, repo / u.path_in_repo)
    report = verify(Folder(str(repo / "k8")))
    assert report.ok, report.problems
    import datasets

    header = yaml.safe_load((repo / "k8" / "README.md").read_text().split("---")[1])
    files = sorted(str(p) for p in repo.glob(header["configs"][0]["data_files"][0]["path"]))
    rows = datasets.load_dataset("parquet", data_files=files, split="train")
    assert len(rows) == 24 and "input_ids" in rows.column_names


def test_a_damaged_shard_is_never_planned(cache, tmp_path):
    m = read_cache_manifest(Folder(cache))
    victim = Path(cache) / m.files[1].path
    victim.write_bytes(victim.read_bytes()[:-10] + b"0123456789")
    with pytest.raises(IntegrityError, match=m.files[1].path):
        push_to_hub(Folder(cache), "hf://datasets/acme/toy-logits", tmp_path, dry_run=True)


def test_remote_sources_are_pulled_first(tmp_path):
    uri = "memory://pkd-hub-test/cache"
    write_cache(uri, make_samples(8, k=8), shard_rows=8)
    with pytest.raises(StorageError, match="from a local copy"):
        push_to_hub(Folder(uri), "hf://datasets/acme/x", tmp_path, dry_run=True)


def test_cli_dry_run_and_offline_push(cache, tmp_path, monkeypatch):
    r = CliRunner().invoke(app, ["cache", "push", cache, "hf://datasets/acme/toy-logits", "--dry-run"])
    assert r.exit_code == 0, r.output
    assert "one commit to dataset acme/toy-logits: 5 files" in r.output and "README.md" in r.output and "# Logit cache" in r.output
    r = CliRunner().invoke(app, ["cache", "push", cache, str(tmp_path / "x"), "--dry-run"])
    assert r.exit_code == 2 and "--dry-run plans a Hub push" in r.output
    # A Hub that cannot be reached (a closed local port): one line, nothing committed.
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setenv("HF_TOKEN", "hf_not_a_real_token")
    r = CliRunner().invoke(app, ["cache", "push", cache, "hf://datasets/acme/toy-logits"])
    assert r.exit_code == 1 and "nothing was committed" in r.output, r.output


@pytest.mark.parametrize("how", ["offline", "unreachable"])
def test_a_hub_cache_that_cannot_be_reached_says_so(tmp_path, monkeypatch, tiny_family, how):
    """`cache pull hf://...` and `train-student --cache hf://...` with no Hub: the cause, not "no
    manifest here" (the Hub's filesystem answers "does not exist" in offline mode)."""
    import huggingface_hub.constants
    from huggingface_hub import HfFileSystem

    if how == "offline":
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    else:
        monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")  # a closed port
    HfFileSystem.clear_instance_cache()
    try:
        for args in (["cache", "pull", "hf://datasets/acme/toy-logits", str(tmp_path / "d")],
                     ["train-student", "--cache", "hf://datasets/acme/toy-logits", "--student", str(tiny_family.student), "--out", str(tmp_path / "s")]):  # fmt: skip
            r = CliRunner().invoke(app, args)
            lines = [x for x in r.output.splitlines() if x.startswith("error:")]
            assert r.exit_code == 1 and len(lines) == 1 and "Traceback" not in r.output, r.output
            assert "cannot be reached" in lines[0] and "no manifest here" not in lines[0] and "hf://datasets/acme/toy-logits" in lines[0]
    finally:
        HfFileSystem.clear_instance_cache()
