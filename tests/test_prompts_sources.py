"""Prompt sets with other column names (field mapping) and Hub dataset ids (`--prompts ORG/NAME`).
Loading a real Hub dataset needs the network; offline, an id must give one clear error."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from pkd.cli import app
from pkd.errors import InputError
from pkd.teacher.prompts import load_prompts


def test_field_mapping_renames_columns(tmp_path):
    path = tmp_path / "gsm.parquet"
    pq.write_table(pa.table({"question": ["What is 2 + 2?", "What is 3 + 5?"], "answer": ["4", "8"], "idx": [7, 8]}), path)
    prompts = load_prompts(str(path), fields={"prompt": "question", "reference": "answer", "id": "idx"})
    assert [(p.id, p.messages[0]["content"], p.reference) for p in prompts] == [("7", "What is 2 + 2?", "4"), ("8", "What is 3 + 5?", "8")]


def test_a_missing_mapped_column_names_the_row_and_the_columns(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"question": "hi?"}) + "\n")
    with pytest.raises(InputError, match=r"p.jsonl:1: no column 'query' .* columns: question"):
        load_prompts(str(path), fields={"prompt": "query"})
    with pytest.raises(InputError, match="pkd's prompt fields are"):
        load_prompts(str(path), fields={"text": "question"})


def test_a_hub_id_that_cannot_be_loaded_is_one_clear_error(tmp_path, monkeypatch):
    import datasets.config
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)  # what HF_HUB_OFFLINE=1 sets at import
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(InputError, match=r"pkd-test/no-such-prompts: not a local file, and the Hub dataset could not be loaded \(split 'test'"):
        load_prompts("pkd-test/no-such-prompts", split="test")
    with pytest.raises(InputError, match="prompts file not found"):
        load_prompts("data/prompts.jsonl")  # a missing local file is not taken for a Hub id


def test_cli_field_syntax(tmp_path):
    r = CliRunner().invoke(app, ["teacher-sample", "--prompts", "x.jsonl", "--prompts-field", "prompt", "--dry-run"])
    assert r.exit_code == 2 and "expected FIELD=COLUMN" in r.output
