"""Prompt sets load from JSONL, Parquet and HF dataset dirs alike; bad input names file, line and
field; splits depend on the prompt id only."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
from typer.testing import CliRunner

from pkd.cli import app
from pkd.errors import InputError
from pkd.teacher.prompts import load_prompts, prompts_fingerprint
from pkd.teacher.splits import SPLITS, check_ratios, split_of

RECORDS = [
    {"id": "a", "prompt": "What is 2 + 2?", "reference": "4"},
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]},
    {"id": 7, "messages": [{"role": "user", "content": "1"}, {"role": "assistant", "content": "2"}, {"role": "user", "content": "3?"}]},
]


def _jsonl(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


def test_jsonl_parquet_and_dataset_dir_agree(tmp_path: Path) -> None:
    import datasets

    src = _jsonl(tmp_path / "p.jsonl", [json.dumps(r) for r in RECORDS] + [""])  # a blank line is fine
    prompts = load_prompts(str(src))
    assert [p.id for p in prompts[:1] + prompts[2:]] == ["a", "7"]
    assert prompts[1].id.startswith("p-") and prompts[0].messages == [{"role": "user", "content": "What is 2 + 2?"}]
    assert prompts[0].reference == "4" and prompts[1].reference is None and prompts[0].where == f"{src}:1"
    assert load_prompts(str(src))[1].id == prompts[1].id  # content ids are stable

    rows = [{"id": p.id, "messages": p.messages, "reference": p.reference} for p in prompts]
    ds = datasets.Dataset.from_list(rows)
    ds.to_parquet(str(tmp_path / "p.parquet"))
    ds.save_to_disk(str(tmp_path / "ds"))
    for other in (tmp_path / "p.parquet", tmp_path / "ds"):
        assert prompts_fingerprint(load_prompts(str(other))) == prompts_fingerprint(prompts)


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        ([], r"p\.jsonl: no prompts \(the file is empty\)"),
        (['{"prompt": "ok"}', '{"prompt": "x"'], r"p\.jsonl:2: invalid JSON"),
        (['{"id": "x", "text": "hi"}'], r"p\.jsonl:1: has neither 'messages' nor 'prompt'"),
        (['{"prompt": "a", "messages": [{"role": "user", "content": "b"}]}'], r":1: has both"),
        (['{"messages": [{"role": "human", "content": "hi"}]}'], r"p\.jsonl:1: field 'messages\[0\]\.role' is 'human'; allowed roles are system, user, assistant"),
        (['{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}'], r":1: field 'messages\[1\]\.role' is 'assistant'; the last message must be from the user"),
        (['{"messages": [{"role": "user", "content": 3}]}'], r"field 'messages\[0\]\.content' must be a string"),
        (['{"prompt": ""}'], r"field 'prompt' must be a non-empty string"),
        (['{"prompt": "q", "reference": 5}'], r"field 'reference' must be a string"),
        (['{"id": "x", "prompt": "a"}', '{"prompt": "b"}', '{"id": "x", "prompt": "c"}'], r"p\.jsonl:3: duplicate id 'x', first used at .*p\.jsonl:1"),
        (['{"prompt": "same"}', '{"prompt": "same"}'], r"p\.jsonl:2: duplicate id 'p-\w+', first used at .*p\.jsonl:1 \(identical content"),
        (["[1, 2]"], r"p\.jsonl:1: expected a JSON object, got list"),
    ],
)
def test_bad_jsonl_names_file_line_and_field(tmp_path: Path, lines: list[str], message: str) -> None:
    path = tmp_path / "p.jsonl"
    path.write_text("\n".join(lines))
    with pytest.raises(InputError, match=message):
        load_prompts(str(path))


def test_bad_parquet_row_and_missing_file(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"prompt": ["ok", None], "id": ["a", "b"]}), tmp_path / "p.parquet")
    with pytest.raises(InputError, match=r"p\.parquet: row 1: has neither 'messages' nor 'prompt'"):
        load_prompts(str(tmp_path / "p.parquet"))
    with pytest.raises(InputError, match="prompts file not found"):
        load_prompts(str(tmp_path / "nope.jsonl"))


def test_cli_bad_input_is_one_red_line_and_exit_2(tmp_path: Path) -> None:
    path = _jsonl(tmp_path / "p.jsonl", ['{"prompt": "ok"}', "{oops"])
    result = CliRunner().invoke(app, ["teacher-sample", "--prompts", str(path), "--out", str(tmp_path / "out"), "--dry-run"])
    assert result.exit_code == 2
    assert "p.jsonl:2: invalid JSON" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "out").exists()


def test_splits_are_deterministic_and_follow_the_ratios() -> None:
    ids = [f"prompt-{i}" for i in range(20_000)]
    counts = Counter(split_of(i) for i in ids)
    assert set(counts) == set(SPLITS)
    for name, ratio in zip(SPLITS, (0.1, 0.45, 0.45)):
        assert abs(counts[name] / len(ids) - ratio) < 0.015
    assert [split_of(i) for i in ids[:50]] == [split_of(i) for i in ids[:50]]
    assert {split_of(i, (0.0, 0.0, 1.0)) for i in ids[:200]} == {"distill"}
    with pytest.raises(ValueError, match="sum to 1"):
        check_ratios((0.5, 0.5, 0.5))
