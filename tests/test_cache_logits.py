"""`pkd cache-logits` on the tiny family: chat tokenization, the cache's contents, both engines
agreeing, resumption after kill -9, parts + merge, and bad input failing clearly via the CLI.
Teacher samples are written directly in the teacher-sample format; the proxy is a proxy-align
folder holding a seeded random LoRA on the tiny proxy."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from typer.testing import CliRunner

from pkd.cache.ops import verify
from pkd.cli import app
from pkd.config import CacheLogitsConfig, RunConfig
from pkd.engines import vllm_unusable_reason
from pkd.fingerprint import files_fingerprint
from pkd.cache.shards import LogitSample, iter_samples, seq_logprob_stats
from pkd.records import LogitCacheManifest, Manifest
from pkd.teacher.splits import split_of
from pkd.errors import CompatibilityError, InputError
from pkd.steps.cache_logits import resolve_proxy, run_cache_logits, scoring_model
from pkd.teacher.samples import Outcome, Writer
from pkd.store import Folder
from pkd.models.tiny import TinyFamily, build_llama, default_corpus, synthetic_tasks, train_tokenizer
from pkd.models.chat import encode_chat

RATIOS = (0.2, 0.2, 0.6)
K = 8
SETTINGS = dict(k=K, shard_rows=8, engine="hf", dtype="float32", max_length=256)
runner = CliRunner()


def write_teacher_samples(out: Path, *, n_prompts: int = 60, ratios: tuple[float, float, float] = RATIOS, chats: list[tuple[str, str]] | None = None, reverse: bool = False) -> str:
    """A complete teacher-sample folder of `chats` (default: synthetic tasks, every 9th response
    long, for the max-length policy); `reverse`: the same samples, written in the reverse order
    (replies that arrived in another order)."""
    folder = Folder(str(out))
    writer = Writer(folder, Manifest(kind="teacher", inputs={"prompts": f"synthetic-{n_prompts}"}, config={"split_ratios": list(ratios)}), [], shard_size=16)
    tasks = synthetic_tasks(n_prompts, seed=3)
    chats = chats or [(q, " ".join([a] * 12) if i % 9 == 0 else a) for i, (q, a) in enumerate(tasks)]
    numbered = list(enumerate(chats))
    for i, (prompt, response) in reversed(numbered) if reverse else numbered:
        pid = f"task-{i:04d}"
        row = {
            "sample_id": f"{pid}#0", "prompt_id": pid, "sample_index": 0, "split": split_of(pid, ratios),
            "messages": [{"role": "user", "content": prompt}], "response": response, "finish_reason": "stop",
            "usage": None, "latency_s": 0.0, "teacher": "tiny-exact", "reference": None, "logprobs": None,
        }  # fmt: skip
        writer.add(Outcome(rows=[row], ledger={"prompt_id": pid, "status": "ok", "samples": 1, "attempts": 1}))
    writer.flush(complete=True)
    return str(out)


def fingerprint(uri: str) -> tuple[dict[str, Any], dict[str, str]]:
    """A cache's manifest but its creation time, and its shards' sha256 by path: equal
    fingerprints are byte-identical shards under the same manifest."""
    m = json.loads(Folder(uri).read_bytes("manifest.json"))
    m.pop("created_at")
    return m, {f["path"]: f["sha256"] for f in m["files"]}


def samples(uri: str) -> dict[str, LogitSample]:
    folder = Folder(uri)
    return {s.sample_id: s for s in iter_samples(folder, folder.read_manifest())}


def config(root: Path, out: str, **kw: Any) -> CacheLogitsConfig:
    return CacheLogitsConfig(teacher=str(root / "teacher"), proxy=str(root / "proxy"), out=str(root / out), **(SETTINGS | kw))


@pytest.fixture(scope="module")
def tokenizer(tiny_family: TinyFamily):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_family.tokenizer))


@pytest.fixture(scope="module")
def root(tiny_family: TinyFamily, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """teacher/ (60 samples, ~36 in D_s) and proxy/: a proxy-align folder with a seeded random
    LoRA (PEFT zeroes B at init, which would leave the outputs unchanged)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("cache-logits")
    write_teacher_samples(root / "teacher")
    model = AutoModelForCausalLM.from_pretrained(str(tiny_family.proxy))
    peft_model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"]))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
    peft_model.save_pretrained(str(root / "proxy" / "adapter"))
    manifest = Manifest(kind="proxy", complete=True, inputs={"proxy_base": files_fingerprint(tiny_family.proxy)}, config={"model": str(tiny_family.proxy), "lora": True})
    Folder(str(root / "proxy")).write_manifest(manifest)
    return root


@pytest.fixture(scope="module")
def hf_cache(root: Path) -> str:
    run_cache_logits(config(root, "hf"), RunConfig(), progress=False)
    return str(root / "hf")


# tokenization -----------------------------------------------------------------------------------


def test_chat_ids_split_exactly_at_the_response(tokenizer) -> None:
    messages = [{"role": "user", "content": "What is 3 + 4?"}]
    chat = encode_chat(tokenizer, messages, "3 + 4 = 7.")
    assert not chat.joined
    assert chat.ids == tokenizer.apply_chat_template([*messages, {"role": "assistant", "content": "3 + 4 = 7."}], tokenize=True, return_dict=True)["input_ids"]
    assert tokenizer.decode(chat.ids[chat.response_start :]) == "3 + 4 = 7.<|im_end|>\n"
    assert chat.ids[: chat.response_start] == tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]


@pytest.mark.parametrize(
    ("template", "response", "end_of_turn"),
    [
        # The generation prompt ends in a space: in the whole chat BPE merges it with the "3".
        ("{%- for m in messages -%}{{- m['role'] + ': ' + m['content'] + '\\n' -}}{%- endfor -%}{%- if add_generation_prompt -%}{{- 'assistant: ' -}}{%- endif -%}", "3 + 4 = 7.", "\n"),
        # Assistant content is trimmed: the whole chat does not hold the response verbatim.
        ("{%- for m in messages -%}{{- '<|im_start|>' + m['role'] + '\\n' + (m['content'] | trim) + '<|im_end|>\\n' -}}{%- endfor -%}{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}", " 3 + 4 = 7. ", "<|im_end|>\n"),
    ],
    ids=["bpe-merge-across-boundary", "template-trims-content"],
)
def test_chat_ids_when_the_template_does_not_split_cleanly(tokenizer, template: str, response: str, end_of_turn: str) -> None:
    tok = tokenizer.__class__.from_pretrained(tokenizer.name_or_path)
    tok.chat_template = template
    messages = [{"role": "user", "content": "Add up 3 and 4."}]
    prompt = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    full = tok.apply_chat_template([*messages, {"role": "assistant", "content": response}], tokenize=False)
    natural = tok(full, add_special_tokens=False)["input_ids"]
    head = tok(prompt, add_special_tokens=False)["input_ids"]
    assert natural[: len(head)] != head or not full.startswith(prompt + response)  # the case is really triggered
    chat = encode_chat(tok, messages, response)
    assert chat.joined and chat.response_start == len(head) and chat.ids[: len(head)] == head
    assert tok.decode(chat.ids[chat.response_start :]) == response + end_of_turn


# the cache --------------------------------------------------------------------------------------


def test_cache_holds_the_proxy_scores_of_every_distill_sample(root: Path, hf_cache: str, tiny_family: TinyFamily, tokenizer) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    assert verify(Folder(hf_cache)).ok
    m = Folder(hf_cache).read_manifest()
    assert isinstance(m, LogitCacheManifest) and m.complete and m.codec["k"] == K and m.vocab_size == 512
    assert m.teacher_model == "tiny-exact" and set(m.inputs) == {"teacher", "proxy_model", "proxy_adapter"}
    assert m.config["split"] == "distill" and "out" not in m.config and "engine" not in m.config
    rows = {f"task-{i:04d}#0": (q, a) for i, (q, a) in enumerate(synthetic_tasks(60, seed=3)) if split_of(f"task-{i:04d}", RATIOS) == "distill"}
    got = samples(hf_cache)
    assert set(got) == set(rows) and m.counts["samples"] == len(rows) == m.rows
    stats = seq_logprob_stats([np.array([s.seq_logprob for s in got.values()])])
    assert m.seq_logprob.mu == pytest.approx(stats.mu) and m.seq_logprob.gamma == pytest.approx(stats.gamma)
    base = AutoModelForCausalLM.from_pretrained(str(tiny_family.proxy))
    model = PeftModel.from_pretrained(base, str(root / "proxy" / "adapter")).eval()
    for sid in sorted(got)[:4]:
        s = got[sid]
        chat = encode_chat(tokenizer, [{"role": "user", "content": rows[sid][0]}], _response(sid, rows))
        assert s.input_ids.tolist() == chat.ids and s.response_start == chat.response_start
        with torch.no_grad():
            logprobs = model(torch.tensor([chat.ids])).logits[0, chat.response_start - 1 : -1].log_softmax(-1)  # (T, V)
        np.testing.assert_allclose(s.token_logprob, logprobs.gather(1, torch.tensor(chat.ids[chat.response_start :])[:, None])[:, 0].numpy(), atol=1e-5)
        np.testing.assert_array_equal(s.topk_ids[:, 0], logprobs.argmax(-1).numpy())
        assert s.seq_logprob == pytest.approx(float(np.mean(s.token_logprob)))


def _response(sid: str, rows: dict[str, tuple[str, str]]) -> str:
    i = int(sid[5:9])
    return " ".join([rows[sid][1]] * 12) if i % 9 == 0 else rows[sid][1]


def test_rows_follow_the_sample_ids_not_the_order_the_teacher_replied_in(root: Path, hf_cache: str, tmp_path: Path) -> None:
    """The same samples, arrived in the reverse order, make the same cache: a student's data order
    (its seed and the cache's rows) must not depend on the teacher's reply timing."""
    from pkd.teacher.samples import read_teacher_samples

    write_teacher_samples(tmp_path / "teacher", reverse=True)
    ids = [[s.sample_id for s in read_teacher_samples(Folder(str(d)))[1]] for d in (root / "teacher", tmp_path / "teacher")]
    assert ids[0] == ids[1][::-1]
    cfg = CacheLogitsConfig(teacher=str(tmp_path / "teacher"), proxy=str(root / "proxy"), out=str(tmp_path / "cache"), **SETTINGS)
    run_cache_logits(cfg, RunConfig(), progress=False)
    again, first = Folder(str(tmp_path / "cache")), Folder(hf_cache)
    rows = [list(iter_samples(f, f.read_manifest())) for f in (again, first)]
    assert [s.sample_id for s in rows[0]] == [s.sample_id for s in rows[1]]
    for a, b in zip(*rows):
        np.testing.assert_array_equal(a.input_ids, b.input_ids)
        np.testing.assert_array_equal(a.token_logprob, b.token_logprob)


def test_rerun_is_a_no_op_and_no_adapter_is_the_unaligned_proxy(root: Path, hf_cache: str) -> None:
    before = Folder(hf_cache).read_manifest()
    again = run_cache_logits(config(root, "hf"), RunConfig(), progress=False)
    assert again.scored == 0 and Folder(hf_cache).read_manifest() == before
    base = run_cache_logits(config(root, "base", no_adapter=True), RunConfig(), progress=False).manifest
    assert "proxy_adapter" not in base.inputs and base.proxy_fingerprint != before.proxy_fingerprint
    aligned, plain = samples(hf_cache), samples(str(root / "base"))
    assert max(float(np.abs(aligned[s].token_logprob - plain[s].token_logprob).max()) for s in aligned) > 0.05


def test_the_cli_reports_a_complete_cache(root: Path, hf_cache: str) -> None:
    result = cli(root, "--out", hf_cache, "--shard-rows", "8", "--dtype", "float32", "--max-length", "256")
    assert result.exit_code == 0, result.output
    assert "nothing to do" in result.output and f"{Folder(hf_cache).read_manifest().rows} samples" in result.output
    # shards are chunks of the row order (and parts own whole chunks): their size is a setting of the cache
    result = cli(root, "--out", hf_cache, "--shard-rows", "4", "--dtype", "float32", "--max-length", "256")
    assert result.exit_code == 3 and "config.shard_rows: 8 there, 4 now" in result.output, result.output


def test_the_proxy_is_found_from_a_proxy_folder_or_model_and_adapter(root: Path, tiny_family: TinyFamily) -> None:
    adapter = root / "proxy" / "adapter"
    from_folder = resolve_proxy(CacheLogitsConfig(proxy=str(root / "proxy")), RunConfig())
    assert (from_folder.model_dir, from_folder.adapter_dir) == (tiny_family.proxy, adapter)
    assert resolve_proxy(CacheLogitsConfig(model=str(tiny_family.proxy), adapter=str(adapter)), RunConfig()) == from_folder
    assert resolve_proxy(CacheLogitsConfig(adapter=str(adapter)), RunConfig()) == from_folder  # base from adapter_config.json
    plain = resolve_proxy(CacheLogitsConfig(proxy=str(root / "proxy"), no_adapter=True), RunConfig())
    assert plain.adapter_dir is None and plain.fingerprint != from_folder.fingerprint
    with pytest.raises(CompatibilityError, match="not the base the adapter"):
        resolve_proxy(CacheLogitsConfig(proxy=str(root / "proxy"), model=str(tiny_family.student)), RunConfig())
    with pytest.raises(InputError, match="not a proxy"):
        resolve_proxy(CacheLogitsConfig(proxy=str(root / "teacher")), RunConfig())


def test_max_length_policy_truncates_or_skips_and_counts(root: Path) -> None:
    cut = run_cache_logits(config(root, "cut", max_length=40), RunConfig(), progress=False)
    skip = run_cache_logits(config(root, "skip", max_length=40, overflow="skip"), RunConfig(), progress=False)
    n = cut.counts["samples"]
    assert cut.counts["truncated"] > 0 and cut.manifest.rows == n and all(len(s.input_ids) <= 40 for s in samples(str(root / "cut")).values())
    assert skip.counts["skipped_too_long"] == cut.counts["truncated"] and skip.manifest.rows == n - cut.counts["truncated"]
    assert skip.manifest.counts["skipped_too_long"] == skip.counts["skipped_too_long"]


def test_vllm_and_hf_write_the_same_cache(root: Path, hf_cache: str) -> None:
    """vLLM scores the merged proxy, transformers base + adapter: same rows, same top-k ids
    wherever the k-th and (k+1)-th logprobs are not tied (judged on an exact transformers
    top-(k+1)), the actual-token logprobs and ℓ within 1e-4; the engines' own top-k logprobs
    (before the codec quantises them) within 1e-4 too. The merge is made once and reused."""
    if reason := vllm_unusable_reason():
        pytest.skip(reason)
    from pkd.engines import load_engine

    summary = run_cache_logits(config(root, "vllm", engine="vllm"), RunConfig(), progress=False)
    assert summary.engine == "vllm"
    (merged,) = (root / "vllm-work").glob("merged-proxy-*")
    assert (merged / "model.safetensors").is_file() and not (merged / "adapter_config.json").exists()
    made = (merged / "model.safetensors").stat().st_mtime_ns
    proxy = resolve_proxy(config(root, "vllm"), RunConfig())
    assert scoring_model(proxy, "vllm", str(root / "vllm")) == ("vllm", merged, None)  # reused, not redone
    assert (merged / "model.safetensors").stat().st_mtime_ns == made
    hf, vl = samples(hf_cache), samples(str(root / "vllm"))
    assert set(hf) == set(vl)
    order = sorted(hf)
    with load_engine("hf", Folder(str(root / "proxy")).read_manifest().config["model"], adapter_dir=root / "proxy" / "adapter", max_logprobs=K + 1) as engine:
        exact = list(engine.score_topk([hf[s].input_ids.tolist() for s in order], [hf[s].response_start for s in order], K + 1))
    with load_engine("vllm", merged, max_logprobs=K + 1, max_model_len=SETTINGS["max_length"] + 1) as engine:
        fast = list(engine.score_topk([hf[s].input_ids.tolist() for s in order], [hf[s].response_start for s in order], K + 1))
    compared = 0
    for sid, ref in zip(order, exact):
        a, b = hf[sid], vl[sid]
        assert a.input_ids.tolist() == b.input_ids.tolist() and a.response_start == b.response_start
        assert np.abs(a.token_logprob - b.token_logprob).max() <= 1e-4 and abs(a.seq_logprob - b.seq_logprob) <= 1e-4
        clear = ref.topk_logprobs[:, K - 1] - ref.topk_logprobs[:, K] > 1e-4  # (T,) no tie at the cut
        for t in np.flatnonzero(clear):
            assert set(a.topk_ids[t]) == set(b.topk_ids[t]) == set(ref.topk_ids[t, :K])
        mine = fast[order.index(sid)]  # the merged proxy on vLLM, unquantised
        for t in np.flatnonzero(clear):  # same ids; their logprobs, matched by id
            ra, rb = np.argsort(ref.topk_ids[t, :K]), np.argsort(mine.topk_ids[t, :K])
            assert ref.topk_ids[t, ra].tolist() == mine.topk_ids[t, rb].tolist()
            assert np.abs(ref.topk_logprobs[t, ra] - mine.topk_logprobs[t, rb]).max() <= 1e-4
        compared += int(clear.sum())
    assert compared > 100
    assert summary.manifest.seq_logprob.mu == pytest.approx(Folder(hf_cache).read_manifest().seq_logprob.mu, abs=1e-4)


def test_parts_then_merge_are_a_single_run_byte_for_byte(root: Path, hf_cache: str) -> None:
    """Part I of 3 scores the chunks c ≡ I (mod 3) of the row order as shards data/part-I-c; merged
    (in any order) they are the single run's shards under its manifest, which a rerun of the
    single run finds finished."""
    parts = [str(root / f"part-{i}") for i in range(3)]
    for i, out in enumerate(parts):
        run_cache_logits(config(root, f"part-{i}", part=f"{i}/3"), RunConfig(), progress=False)
        paths = [f.path for f in Folder(out).read_manifest().files]
        assert paths and all(p.startswith(f"data/part-{i:05d}-") and int(p[-13:-8]) % 3 == i for p in paths)
    result = runner.invoke(app, ["cache", "merge", str(root / "merged"), parts[0], parts[2]])
    assert result.exit_code == 3 and "2 of the 3 parts of one cache-logits run: 1/3 missing" in result.output, result.output
    assert not (root / "merged").exists()
    result = runner.invoke(app, ["cache", "merge", str(root / "merged"), *reversed(parts)])
    assert result.exit_code == 0 and "the cache one process writes" in result.output, result.output
    assert len(fingerprint(hf_cache)[1]) >= 4 and fingerprint(str(root / "merged")) == fingerprint(hf_cache)
    assert run_cache_logits(config(root, "merged"), RunConfig(), progress=False).scored == 0


# resumption -------------------------------------------------------------------------------------

# Runs the CLI with a slowed transformers engine, so that the kill lands between two shards.
SLOW_CLI = """
import sys, time
import pkd.engines.hf as hf
score = hf.HFEngine.score_topk
def slow(self, *args, **kwargs):
    time.sleep(0.5)
    yield from score(self, *args, **kwargs)
hf.HFEngine.score_topk = slow
from pkd.cli import main
sys.argv[0] = "pkd"
main()
"""


def test_kill_9_then_rerun_gives_the_same_bytes(root: Path, hf_cache: str) -> None:
    cfg = config(root, "killed")
    flags = [f"--set=cache_logits.{k}={json.dumps(v)}" for k, v in cfg.model_dump(exclude_none=True, exclude={"launch"}).items()]
    manifest = root / "killed" / "manifest.json"
    proc = subprocess.Popen([sys.executable, "-c", SLOW_CLI, "cache-logits", *flags], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while not (manifest.is_file() and len(json.loads(manifest.read_text())["files"]) >= 2):
            assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
            assert time.monotonic() < deadline
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    interrupted = Folder(str(root / "killed")).read_manifest()
    assert not interrupted.complete and 2 <= len(interrupted.files) < len(Folder(hf_cache).read_manifest().files)
    summary = run_cache_logits(cfg, RunConfig(), progress=False)
    assert summary.scored == summary.manifest.rows - interrupted.rows  # nothing committed is scored again
    files = lambda uri: [(f.path, f.sha256, f.rows) for f in Folder(uri).read_manifest().files]  # noqa: E731
    assert files(str(root / "killed")) == files(hf_cache)
    assert Folder(str(root / "killed")).read_manifest().seq_logprob == Folder(hf_cache).read_manifest().seq_logprob


# bad input --------------------------------------------------------------------------------------


def cli(root: Path, *args: str) -> Any:
    base = ["cache-logits", "--teacher", str(root / "teacher"), "--proxy", str(root / "proxy"), "--k", str(K), "--engine", "hf"]
    return runner.invoke(app, [*base, *args])


def test_samples_without_a_distill_split(root: Path, tmp_path: Path) -> None:
    teacher = write_teacher_samples(tmp_path / "teacher", n_prompts=20, ratios=(0.5, 0.5, 0.0))
    result = runner.invoke(app, ["cache-logits", "--teacher", teacher, "--proxy", str(root / "proxy"), "--out", str(tmp_path / "out")])
    assert result.exit_code == 2, result.output
    assert "no teacher samples in split 'distill'" in result.output and "split_ratios" in result.output
    assert not (tmp_path / "out").exists()


def test_k_above_max_logprobs_says_how_to_raise_it(root: Path, tmp_path: Path) -> None:
    result = cli(root, "--out", str(tmp_path / "out"), "--k", "30")
    assert result.exit_code == 2, result.output
    assert "max_logprobs=20" in result.output and "--max-logprobs 30" in result.output


def test_a_student_with_another_tokenizer_is_refused(root: Path, tmp_path: Path) -> None:
    other = train_tokenizer([line.upper() for line in default_corpus()], 384, tmp_path / "tok")
    student = build_llama(tmp_path / "tok", tmp_path / "student", hidden_size=64, num_layers=1, num_heads=2, seed=0)
    assert len(other) == 384
    result = cli(root, "--out", str(tmp_path / "out"), "--student", str(student))
    assert result.exit_code == 3, result.output
    assert "tokenizer fingerprint" in result.output and "another student" in result.output


def test_an_existing_cache_with_another_tokenizer_is_refused(root: Path, hf_cache: str, tmp_path: Path) -> None:
    out = tmp_path / "out"
    shutil.copytree(hf_cache, out)
    m = Folder(str(out)).read_manifest()
    Folder(str(out)).write_manifest(m.model_copy(update={"tokenizer_fingerprint": "tok-other"}))
    result = cli(root, "--out", str(out), "--shard-rows", "8", "--dtype", "float32", "--max-length", "256")
    assert result.exit_code == 3, result.output
    assert "tokenizer_fingerprint: 'tok-other' there" in result.output and "choose another --out" in result.output
    assert Folder(str(out)).read_manifest().tokenizer_fingerprint == "tok-other"  # untouched


# a real model -----------------------------------------------------------------------------------

REAL_CHATS = [
    ("What is the capital of France?", "The capital of France is Paris."),
    ("Name three primary colors.", "The three primary colors are red, blue and yellow."),
    ("Write a haiku about the sea.", "Waves fold into foam,\nsalt wind carries gull voices,\nthe tide keeps its time."),
    ("How many legs does a spider have?", "A spider has eight legs."),
    ("Translate 'good morning' into Spanish.", "'Good morning' in Spanish is 'buenos días'."),
    ("Give one tip for better sleep.", "Keep a regular schedule: go to bed and wake up at the same time every day, even on weekends."),
]


@pytest.mark.slow
def test_smollm2_through_both_engines(tmp_path_factory: pytest.TempPathFactory) -> None:
    """SmolLM2-135M-Instruct (its own ChatML template with a default system prompt) scores six
    plausible answers: both engines agree, and the answers are likely under the model."""
    if reason := vllm_unusable_reason():
        pytest.skip(reason)
    from pkd.engines import load_engine
    from pkd.models.gguf import convert_gguf, smollm2_gguf_path

    root = tmp_path_factory.mktemp("smollm2")
    model = convert_gguf(smollm2_gguf_path(), root / "model")
    write_teacher_samples(root / "teacher", ratios=(0.0, 0.0, 1.0), chats=REAL_CHATS)
    caches = {}
    for engine in ("hf", "vllm"):
        cfg = CacheLogitsConfig(teacher=str(root / "teacher"), model=str(model), out=str(root / engine), engine=engine, k=20, max_length=256)
        summary = run_cache_logits(cfg, RunConfig(), progress=False)
        assert summary.engine == engine and summary.manifest.rows == len(REAL_CHATS) and "joined_tokenization" not in summary.counts
        caches[engine] = samples(str(root / engine))
    hf, vl = caches["hf"], caches["vllm"]
    order = sorted(hf)
    with load_engine("hf", model, max_logprobs=21) as engine:
        exact = list(engine.score_topk([hf[s].input_ids.tolist() for s in order], [hf[s].response_start for s in order], 21))
    for sid, ref in zip(order, exact):
        a, b = hf[sid], vl[sid]
        assert a.input_ids.tolist() == b.input_ids.tolist()
        assert np.abs(a.token_logprob - b.token_logprob).max() <= 1e-3
        clear = ref.topk_logprobs[:, 19] - ref.topk_logprobs[:, 20] > 1e-4
        assert all(set(a.topk_ids[t]) == set(b.topk_ids[t]) for t in np.flatnonzero(clear))
    ell = [hf[s].seq_logprob for s in order]  # fluent answers: far above uniform, log 1/49152 = -10.8
    assert min(ell) > -8.0 and np.median(ell) > -3.0, ell
