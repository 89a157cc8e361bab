"""Bad input to every command, as a new user or a hostile tester would give it: each case must end
with a non-zero exit and one clear line naming what and where, never a traceback, and a refused
command must leave nothing that blocks the corrected one. One table, one row per case."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from fake_api import FakeAPI
from pkd.cli import app

# (name, command line with {placeholders}, text the error must contain)
CASES: list[tuple[str, str, str]] = [
    # recipes and --set, through `pkd recipe show`
    ("recipe missing", "recipe show {tmp}/nope.toml", "recipe file not found"),
    ("recipe is a folder", "recipe show {tmp}", "is a directory, not a recipe file"),
    ("recipe not UTF-8", "recipe show {latin1_toml}", "not UTF-8"),
    ("recipe not TOML", "recipe show {bad_toml}", "not valid TOML"),
    ("recipe unknown table", "recipe show {unknown_table_toml}", "unknown table [nope]"),
    ("recipe unknown key", "recipe show {unknown_key_toml}", "unknown key 'nope'"),
    ("recipe wrong type", "recipe show {wrong_type_toml}", "[teacher_sample] 'n'"),
    ("--set without =", "recipe show --set run.seed", "expected SECTION.KEY=VALUE"),
    ("--set without section", "recipe show --set seed=3", "expected SECTION.KEY=VALUE"),
    ("--set unknown table", "recipe show --set nope.x=1", "unknown table [nope]"),
    ("--set bad run name", "recipe show --set run.name=a/b", "[run] 'name'"),
    ("--set split ratios", "recipe show --set teacher_sample.split_ratios=[1,1,1]", "split_ratios"),
    ("--set unservable LoRA rank", "recipe show --set proxy_align.lora_r=3", "lora_r"),
    ("--set bad part", "recipe show --set cache_logits.part=5/2", "0 <= I < N"),
    ("--set bad regex", "recipe show --set eval.answer_pattern=(", "not a regular expression"),
    ("--set bad precision", "recipe show --set train_student.precision=fp16", "precision"),
    # teacher-sample: prompts
    ("prompts missing", "teacher-sample --prompts {tmp}/nope.jsonl --out {tmp}/o1 --base-url {api}", "prompts file not found"),
    ("prompts unknown protocol", "teacher-sample --prompts foo://x/p.jsonl --out {tmp}/o2 --base-url {api}", "unknown storage protocol 'foo'"),
    ("prompts invalid JSON", "teacher-sample --prompts {invalid_json} --out {tmp}/o3 --base-url {api}", "invalid JSON"),
    ("prompts control character", "teacher-sample --prompts {control_char} --out {tmp}/o4 --base-url {api}", "Invalid control character at column"),
    ("prompts not UTF-8", "teacher-sample --prompts {latin1_jsonl} --out {tmp}/o5 --base-url {api}", "not valid UTF-8"),
    ("prompts empty", "teacher-sample --prompts {empty_jsonl} --out {tmp}/o6 --base-url {api}", "no prompts"),
    ("prompts duplicate ids", "teacher-sample --prompts {dup_jsonl} --out {tmp}/o7 --base-url {api}", "duplicate id 'a'"),
    ("prompt without text", "teacher-sample --prompts {no_prompt_jsonl} --out {tmp}/o8 --base-url {api}", "has"),
    ("prompt not an object", "teacher-sample --prompts {list_jsonl} --out {tmp}/o9 --base-url {api}", "expected a JSON object"),
    ("prompt last role", "teacher-sample --prompts {assistant_last_jsonl} --out {tmp}/o10 --base-url {api}", "must be from the user"),
    ("prompts parquet junk", "teacher-sample --prompts {junk_parquet} --out {tmp}/o11 --base-url {api}", "not a readable Parquet file"),
    ("prompts folder not a dataset", "teacher-sample --prompts {tmp}/emptydir --out {tmp}/o12 --base-url {api}", "not a saved HF dataset"),
    ("prompts garbage dataset_dict.json", "teacher-sample --prompts {garbage_dataset} --out {tmp}/o14 --base-url {api}", "a saved HF dataset directory that cannot be read"),
    ("prompts field mapped twice", "teacher-sample --prompts {prompts} --out {tmp}/o15 --base-url {api} --prompts-field prompt=reference --prompts-field prompt=id", "'prompt' is already mapped to column 'reference'"),
    ("prompts field without =", "teacher-sample --prompts {prompts} --out {tmp}/o16 --base-url {api} --prompts-field prompt", "expected FIELD=COLUMN"),
    # teacher-sample: options and output
    ("--n 0", "teacher-sample --prompts {prompts} --n 0 --base-url {api}", "'n'"),
    ("--temperature 3", "teacher-sample --prompts {prompts} --temperature 3 --base-url {api}", "'temperature'"),
    ("--concurrency 0", "teacher-sample --prompts {prompts} --concurrency 0 --base-url {api}", "'concurrency'"),
    ("--top-logprobs 50", "teacher-sample --prompts {prompts} --top-logprobs 50 --base-url {api}", "'top_logprobs'"),
    ("--api-key-env bad name", "teacher-sample --prompts {prompts} --api-key-env 1BAD --base-url {api}", "'api_key_env'"),
    ("--limit 0", "teacher-sample --prompts {prompts} --limit 0 --base-url {api}", "'limit'"),
    ("--retry-after-max -1", "teacher-sample --prompts {prompts} --retry-after-max -1 --base-url {api}", "'retry_after_max_s'"),
    ("--commit-interval 0", "teacher-sample --prompts {prompts} --commit-interval 0 --base-url {api}", "'commit_interval_s'"),
    ("teacher --out is a file", "teacher-sample --prompts {prompts} --out {file} --base-url {api}", "is a file, not a folder"),
    ("teacher --out under a file", "teacher-sample --prompts {prompts} --out {file}/sub --base-url {api}", "cannot write there"),
    ("teacher --out foreign", "teacher-sample --prompts {prompts} --out {foreign} --base-url {api}", "is not empty"),
    ("teacher --out is a cache", "teacher-sample --prompts {prompts} --out {cache} --base-url {api}", "holds a 'logits' artifact"),
    ("teacher unreachable", "teacher-sample --prompts {prompts} --out {tmp}/o13 --base-url {dead}", "ConnectionRefusedError"),
    ("teacher --dry-run bad --out", "teacher-sample --prompts {prompts} --out {file} --dry-run --base-url {api}", "is a file, not a folder"),
    # proxy-align
    ("proxy-align no model", "proxy-align --teacher {teacher} --set proxy_align.model=''", "no proxy base model"),
    ("proxy-align --out URI", "proxy-align --teacher {teacher} --model {student} --out s3://b/p", "needs a local folder"),
    ("proxy-align model not a model", "proxy-align --teacher {teacher} --model {tmp}/emptydir --out {tmp}/p1", "config.json"),
    ("proxy-align --out is a file", "proxy-align --teacher {teacher} --model {student} --out {file}", "is a file, not a folder"),
    ("proxy-align --out under a file", "proxy-align --teacher {teacher} --model {student} --out {file}/sub", "cannot write there"),
    ("proxy-align --beta 0", "proxy-align --beta 0", "'beta'"),
    ("proxy-align --engine foo", "proxy-align --engine foo", "'engine'"),
    # cache-logits
    ("cache-logits teacher missing", "cache-logits --teacher {tmp}/none --model {proxy} --out {tmp}/c1", "no manifest here"),
    ("cache-logits teacher is a cache", "cache-logits --teacher {cache} --model {proxy} --out {tmp}/c2", "not teacher samples"),
    ("cache-logits --k 0", "cache-logits --k 0", "'k'"),
    ("cache-logits --part 2/2", "cache-logits --part 2/2", "0 <= I < N"),
    ("cache-logits --split foo", "cache-logits --split foo", "'split'"),
    ("cache-logits --overflow foo", "cache-logits --overflow foo", "'overflow'"),
    ("cache-logits --out is a file", "cache-logits --teacher {teacher} --model {proxy} --no-adapter --split warmup --out {file}", "is a file, not a folder"),
    ("cache-logits --out under a file", "cache-logits --teacher {teacher} --model {proxy} --no-adapter --split warmup --out {file}/sub --engine hf", "cannot write there"),
    ("cache-logits proposal temperature without --sampled", "cache-logits --k 8 --proposal-temperature 2", "applies to sampled caches only"),
    ("cache-logits sampled from a NaN proxy", "cache-logits --teacher {teacher} --model {nan_proxy} --no-adapter --split warmup --sampled 8 --engine hf --out {tmp}/c3", "is not a finite number"),
    ("cache-logits top-k from a NaN proxy", "cache-logits --teacher {teacher} --model {nan_proxy} --no-adapter --split warmup --k 8 --engine hf --out {tmp}/c4", "is not a finite number"),
    ("cache-logits --out teacher folder", "cache-logits --teacher {teacher} --model {proxy} --no-adapter --split warmup --out {teacher}", "holds a 'teacher' artifact"),
    # train-student
    ("train cache missing", "train-student --cache {tmp}/none --student {student} --out {tmp}/s1", "no manifest here"),
    ("train cache is teacher samples", "train-student --cache {teacher} --student {student} --out {tmp}/s2", "holds a 'teacher' artifact, not a logit cache"),
    ("train cache unknown protocol", "train-student --cache foo://x --student {student} --out {tmp}/s3", "unknown storage protocol 'foo'"),
    ("train --out s3 URI", "train-student --cache {cache} --student {student} --out s3://b/x", "must be a local folder"),
    ("train --out is a file", "train-student --cache {cache} --student {student} --out {file}", "is a file, not a folder"),
    ("train --out under a file", "train-student --cache {cache} --student {student} --out {file}/sub", "cannot write there"),
    ("train student not a model", "train-student --cache {cache} --student {tmp}/emptydir --out {tmp}/s4", "config.json"),
    ("train --tail foo", "train-student --tail foo", "'tail'"),
    ("train --alpha -1", "train-student --alpha -1", "'alpha'"),
    ("train --max-length 1", "train-student --max-length 1", "'max_length'"),
    ("train too many streams", "train-student --cache {cache} --student {student} --out {tmp}/s5 --data-streams 64", "fewer than data_streams"),
    ("train cache incomplete", "train-student --cache {incomplete} --student {student} --out {tmp}/s6", "incomplete"),
    # eval
    ("eval no model", "eval --samples {teacher} --set eval.model=''", "no model given"),
    ("eval model not a model", "eval --model {tmp}/emptydir --samples {teacher}", "neither a model"),
    ("eval samples missing", "eval --model {student} --samples {tmp}/none", "no manifest here"),
    ("eval samples is a cache", "eval --model {student} --samples {cache}", "not teacher samples"),
    ("eval bad regex", "eval --answer-pattern (", "not a regular expression"),
    ("eval --out is a folder", "eval --model {student} --samples {teacher} --out {tmp}/emptydir", "is a folder, not a report file"),
    ("eval nothing to score", "eval --model {student}", "nothing to score"),
    ("eval --tasks names none", "eval --model {student} --tasks ,", "names no task"),
    ("eval --out under a file", "eval --model {student} --samples {teacher} --out {file}/r.json", "cannot write there"),
    # pkd cache ...
    ("inspect missing", "cache inspect {tmp}/none", "no manifest here"),
    ("inspect teacher folder", "cache inspect {teacher}", "holds a 'teacher' artifact, not a logit cache"),
    ("inspect manifest not JSON", "cache inspect {broken_manifest}", "not valid JSON"),
    ("verify unknown protocol", "cache verify foo://x", "unknown storage protocol 'foo'"),
    ("verify teacher folder", "cache verify {teacher}", "holds a 'teacher' artifact, not a logit cache"),
    ("merge into a file", "cache merge {file} {cache}", "is a file, not a folder"),
    ("merge into non-empty", "cache merge {foreign} {cache}", "destination is not empty"),
    ("merge a teacher folder", "cache merge {tmp}/m1 {teacher}", "holds a 'teacher' artifact, not a logit cache"),
    ("merge an incomplete cache", "cache merge {tmp}/m2 {incomplete}", "incomplete"),
    ("pull into a file", "cache pull {cache} {file}", "is a file, not a folder"),
    ("pull under a file", "cache pull {cache} {file}/sub", "cannot write there"),
    ("pull a teacher folder", "cache pull {teacher} {tmp}/d1", "holds a 'teacher' artifact, not a logit cache"),
    ("pull over another cache", "cache pull {cache} {other_cache}", "holds a different cache"),
    ("push to unknown protocol", "cache push {cache} foo://x", "unknown storage protocol 'foo'"),
    ("push to S3 without credentials", "cache push {cache} s3://pkd-no-credentials/x", "no usable AWS credentials"),
    ("pull from S3 without credentials", "cache pull s3://pkd-no-credentials/x {tmp}/d2", "AWS_ACCESS_KEY_ID"),
    # usage errors from the command line parser
    ("unknown command", "nope", "No such command"),
    ("demo seed not a number", "demo --seed abc", "Invalid value"),
    ("train --max-steps text", "train-student --max-steps many", "Invalid value"),
]


def _nan_model(model_dir: Path, out: Path) -> str:
    """The tiny proxy with one output row NaN: every position's logits hold a NaN."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    with torch.no_grad():
        model.get_output_embeddings().weight[3] = float("nan")
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(out)
    return str(out)


@pytest.fixture(scope="module")
def places(tmp_path_factory: pytest.TempPathFactory, tiny_family: Any, scored_cache: str) -> dict[str, str]:
    from pkd.engines.serve import free_port

    tmp = tmp_path_factory.mktemp("bad-inputs")

    def w(name: str, data: str | bytes) -> str:
        (tmp / name).write_bytes(data if isinstance(data, bytes) else data.encode())
        return str(tmp / name)

    (tmp / "emptydir").mkdir()
    (tmp / "foreign").mkdir()
    (tmp / "foreign" / "notes.txt").write_text("mine")
    p: dict[str, str] = {"tmp": str(tmp), "student": str(tiny_family.student), "proxy": str(tiny_family.proxy), "cache": scored_cache}
    p["prompts"] = w("p.jsonl", "".join(json.dumps({"id": f"q{i}", "prompt": f"q{i}"}) + "\n" for i in range(24)))
    p["invalid_json"] = w("bad.jsonl", '{"id": "a", "prompt": "x"}\n{"id": "b", "prompt": \n')
    p["control_char"] = w("ctl.jsonl", '{"id": "a", "prompt": "x\ty"}\n')
    p["latin1_jsonl"] = w("latin1.jsonl", '{"id": "a", "prompt": "caf\xe9"}\n'.encode("latin-1"))
    p["empty_jsonl"] = w("empty.jsonl", "\n\n")
    p["dup_jsonl"] = w("dup.jsonl", '{"id": "a", "prompt": "x"}\n{"id": "a", "prompt": "y"}\n')
    p["no_prompt_jsonl"] = w("noprompt.jsonl", '{"id": "a"}\n')
    p["list_jsonl"] = w("list.jsonl", "[1, 2]\n")
    p["assistant_last_jsonl"] = w("asst.jsonl", json.dumps({"id": "a", "messages": [{"role": "assistant", "content": "hi"}]}) + "\n")
    p["junk_parquet"] = w("junk.parquet", b"PAR1 not really")
    (tmp / "garbage-dataset").mkdir()
    p["garbage_dataset"] = str(tmp / "garbage-dataset")
    w("garbage-dataset/dataset_dict.json", "{not json")
    p["nan_proxy"] = _nan_model(tiny_family.proxy, tmp / "nan-proxy")
    p["file"] = w("a-file", "x")
    p["foreign"] = str(tmp / "foreign")
    p["latin1_toml"] = w("latin1.toml", "[run]\nname = 'caf\xe9'\n".encode("latin-1"))
    p["bad_toml"] = w("bad.toml", "[run\n")
    p["unknown_table_toml"] = w("ut.toml", "[nope]\nx = 1\n")
    p["unknown_key_toml"] = w("uk.toml", "[run]\nnope = 1\n")
    p["wrong_type_toml"] = w("wt.toml", "[teacher_sample]\nn = 'many'\n")
    p["dead"] = f"http://127.0.0.1:{free_port()}/v1"
    broken = tmp / "broken"
    broken.mkdir()
    (broken / "manifest.json").write_text("{not json")
    p["broken_manifest"] = str(broken)
    incomplete = tmp / "incomplete"
    shutil.copytree(scored_cache, incomplete)
    m = json.loads((incomplete / "manifest.json").read_text())
    (incomplete / "manifest.json").write_text(json.dumps(m | {"complete": False}))
    p["incomplete"] = str(incomplete)
    other = tmp / "other-cache"
    shutil.copytree(scored_cache, other)
    (other / "manifest.json").write_text(json.dumps(m | {"files": m["files"][:1]}))
    p["other_cache"] = str(other)
    api = FakeAPI()
    try:
        p["api"] = api.url
        teacher = str(tmp / "teacher")
        r = CliRunner().invoke(app, ["teacher-sample", "--prompts", p["prompts"], "--out", teacher, "--base-url", api.url, "--model", "m"])
        assert r.exit_code == 0, r.output
        p["teacher"] = teacher
        yield p
    finally:
        api.close()


def test_the_table_is_big_and_distinct() -> None:
    assert len(CASES) >= 60 and len({c[0] for c in CASES}) == len(CASES) and len({c[1] for c in CASES}) == len(CASES)


@pytest.mark.parametrize(("name", "line", "expected"), CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_clear_line(places: dict[str, str], name: str, line: str, expected: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(places["tmp"])  # recipe defaults (cache/<run>/...) land in the test's folder
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_ENDPOINT_URL"):
        monkeypatch.delenv(key, raising=False)  # S3 cases: no credentials from anywhere (nor a wait on the metadata service)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", f"{places['tmp']}/no-aws-credentials")
    monkeypatch.setenv("AWS_CONFIG_FILE", f"{places['tmp']}/no-aws-config")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    if "s3://" in line:
        import s3fs

        s3fs.S3FileSystem.clear_instance_cache()  # one made with credentials by another test would be reused
    args = [a.format(**places) for a in line.split()]
    args = ["" if a == "''" else a.replace("=''", "=") for a in args]
    fresh = [Path(a) for a in args if a.startswith(places["tmp"] + "/") and not Path(a).exists()]  # e.g. --out folders
    result = CliRunner().invoke(app, args)
    assert result.exit_code != 0, f"{name}: accepted\n{result.output}"
    assert result.exception is None or isinstance(result.exception, SystemExit), f"{name}: {result.exception!r}"
    assert "Traceback" not in result.output
    ours = [x for x in result.output.splitlines() if x.startswith("error:")]
    usage = "─ Error ─" in result.output and result.exit_code == 2  # the parser's own boxed message
    assert len(ours) == 1 or usage, f"{name}: not one error line\n{result.output}"
    assert expected in result.output, f"{name}: expected {expected!r}\n{result.output}"
    assert " at at " not in result.output and "recipe file not found" not in result.output or expected == "recipe file not found"
    written = [f for p in fresh if p.is_dir() for f in p.rglob("*") if f.is_file()]
    assert not written, f"{name}: a refused command wrote {written}"
    if line.startswith("train-student") and "--out {tmp}" in line:
        out = Path(args[args.index("--out") + 1])
        assert not (out / "run_config.json").exists(), f"{name}: left a run record that would block the corrected command"
