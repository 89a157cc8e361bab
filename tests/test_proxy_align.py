"""`pkd proxy-align` on the tiny family (CPU): warm-up, alignment rounds, resume, bad input, and
the saved adapter served by vLLM. Teacher samples are the tiny world's exact answers written
through teacher-sample's own writer, so the proxy has something learnable to align to."""

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

import pytest
from typer.testing import CliRunner

from pkd.align.data import preference_pairs, split_samples
from pkd.align.sample import merges_adapter
from pkd.align.select import choose_stage, skill_of
from pkd.teacher.samples import TeacherSample, read_teacher_samples
from pkd.models.lora import vllm_problems
from pkd.cli import app
from pkd.config import Recipe, override
from pkd.engines import load_engine
from pkd.errors import ConfigError, InputError
from pkd.records import Manifest
from pkd.teacher.splits import split_of
from pkd.steps.proxy_align import Summary, load_chat_tokenizer, run_proxy_align, vocab_warning
from pkd.teacher.samples import Outcome, Writer
from pkd.store import Folder
from pkd.models.tiny import TinyFamily, build_llama, default_corpus, synthetic_tasks, train_tokenizer
from pkd.models.chat import encode_chat

RATIOS = (0.4, 0.4, 0.2)


def write_teacher_samples(
    out: Path, *, n_prompts: int = 100, per_prompt: int = 1, ratios: tuple[float, float, float] = RATIOS, seed: int = 0, references: bool = True
) -> Path:
    """A complete teacher-sample folder whose "teacher" answers every synthetic task exactly
    (the prompts carry the answer as their `reference` unless `references` is off)."""
    folder = Folder(str(out))
    manifest = Manifest(kind="teacher", inputs={"prompts": f"synthetic-{n_prompts}-{seed}"}, config={"split_ratios": list(ratios)})
    writer = Writer(folder, manifest, [], shard_size=64)
    for i, (prompt, answer) in enumerate(synthetic_tasks(n_prompts, seed)):
        pid = f"task-{i:04d}"
        rows = [{
            "sample_id": f"{pid}#{j}", "prompt_id": pid, "sample_index": j, "split": split_of(pid, ratios),
            "messages": [{"role": "user", "content": prompt}], "response": answer, "finish_reason": "stop",
            "usage": None, "latency_s": 0.0, "teacher": "tiny-exact", "reference": answer if references else None, "logprobs": None,
        } for j in range(per_prompt)]  # fmt: skip
        writer.add(Outcome(rows=rows, ledger={"prompt_id": pid, "status": "ok", "samples": per_prompt, "attempts": 1}))
    writer.flush(complete=True)
    return out


def recipe_for(family: TinyFamily, root: Path, **overrides: Any) -> Recipe:
    """Tiny, fast settings: a high LR so that a few steps move a random-init model."""
    values = dict(
        teacher=str(root / "teacher"), model=str(family.proxy), student=str(family.student), out=str(root / "proxy"),
        lora_r=8, lora_alpha=16, lora_dropout=0.0, learning_rate=3e-3, per_device_batch_size=8, warmup_epochs=3, epochs=2,
        max_length=96, rounds=1, chunk_size=16, beta=0.1, engine="hf", max_new_tokens=16, eval_samples=16, logging_steps=1,
    )  # fmt: skip
    return override(Recipe(), "proxy_align", values | overrides)


@pytest.fixture(scope="module")
def aligned(tiny_family: TinyFamily, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Summary]:
    """One warm-up + one round with the transformers engine, shared by the checks below."""
    root = tmp_path_factory.mktemp("proxy-align")
    write_teacher_samples(root / "teacher")
    return root, run_proxy_align(recipe_for(tiny_family, root))


def stage(summary: Summary, name: str) -> dict[str, Any]:
    return next(s for s in summary.report["stages"] if s["stage"] == name)


def test_warmup_lowers_heldout_nll_and_a_round_raises_the_margin(aligned: tuple[Path, Summary]) -> None:
    _, s = aligned
    base, warm, round1 = stage(s, "base"), stage(s, "warmup"), stage(s, "round-01")
    assert s.report["heldout"]["from"] == "distill" and base["tokens"] > 50
    assert warm["nll_per_token"] < base["nll_per_token"] - 0.3
    assert warm["top1_agreement"] > base["top1_agreement"]
    # Before the round the policy is its own reference (margin 0): after it, the teacher's answers
    # gained log-likelihood relative to the proxy's own samples on nearly every pair.
    assert round1["pairs"] == 16 and round1["reward_margin"] > 0.1 and round1["reward_accuracy"] >= 0.75
    assert s.ran == ["warmup", "round-01"] and not s.warnings


def test_output_is_a_servable_adapter_with_lineage_and_a_report(aligned: tuple[Path, Summary], tiny_family: TinyFamily) -> None:
    root, s = aligned
    out = root / "proxy"
    m = Folder(str(out)).read_manifest()
    assert m.kind == "proxy" and m.complete and m.counts == {"warmup": 1, "rounds_sampled": 1, "rounds_done": 1, "selected": m.counts["selected"]}
    assert set(m.inputs) == {"teacher", "proxy_base"} and m.config["beta"] == 0.1
    assert {f.path for f in m.files} >= {"adapter/adapter_model.safetensors", "adapter/adapter_config.json", "report.json", "report.png", "round-01/samples.jsonl"}
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert vllm_problems(config) == [] and config["r"] == 8
    # PEFT writes its target set in string-hash order: sorted, one adapter has one fingerprint
    assert len(config["target_modules"]) > 2 and config["target_modules"] == sorted(config["target_modules"])
    assert not (out / "adapter" / "ref").exists()  # TRL's frozen reference copy is not shipped
    assert json.loads((out / "report.json").read_text())["stages"] == s.report["stages"]
    again = run_proxy_align(recipe_for(tiny_family, root, engine="vllm", merge=False))  # engine may change on a rerun
    assert again.ran == [] and again.report["stages"] == s.report["stages"]


def test_one_seed_aligns_bit_for_bit_the_same(aligned: tuple[Path, Summary], tiny_family: TinyFamily, tmp_path: Path) -> None:
    """A rerun with the same seed writes the same adapter: the new adapter's initialisation is
    seeded too (before, only Trainer's data order was, and two runs gave two proxies)."""
    root, _ = aligned
    run_proxy_align(recipe_for(tiny_family, root, out=str(tmp_path / "again")))
    weights = "adapter/adapter_model.safetensors"
    assert (root / "proxy" / weights).read_bytes() == (tmp_path / "again" / weights).read_bytes()


def _files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_every_stage_is_measured_and_the_selected_stage_is_the_output(aligned: tuple[Path, Summary], tiny_family: TinyFamily) -> None:
    """Base, warm-up and each round carry held-out NLL, top-1 and exact match against the prompts'
    references; the output adapter is the selected stage's, and a rerun with --select last
    re-selects without training anything."""
    root, s = aligned
    out = root / "proxy"
    assert [st["stage"] for st in s.report["stages"]] == ["base", "warmup", "round-01"]
    for st in s.report["stages"]:
        assert st["exact_match_rows"] == s.report["heldout"]["exact_match_rows"] == s.report["heldout"]["samples"] > 0
        assert 0.0 <= st["exact_match"] <= 1.0 and st["nll_per_token"] > 0 and 0.0 <= st["top1_agreement"] <= 1.0
    chosen = s.report["selection"]
    assert chosen["select"] == "best" and chosen["max_skill_drop"] == 5.0 and chosen["skill_kept"] is True
    trained = [st for st in s.report["stages"][1:]]
    assert chosen["stage"] == min(trained, key=lambda st: st["nll_per_token"])["stage"]  # every stage kept the (tiny) skill
    assert _files(out / "adapter") == _files(out / chosen["stage"] / "model")
    m = Folder(str(out)).read_manifest()
    assert m.counts["selected"] == (0 if chosen["stage"] == "warmup" else 1)

    last = run_proxy_align(recipe_for(tiny_family, root, select="last"))
    assert last.ran == [] and last.report["selection"]["stage"] == "round-01" and "--select last" in last.report["selection"]["reason"]
    assert _files(out / "adapter") == _files(out / "round-01" / "model")
    assert Folder(str(out)).read_manifest().counts["selected"] == 1
    run_proxy_align(recipe_for(tiny_family, root))  # back to best: the same adapter as the first run
    assert _files(out / "adapter") == _files(out / chosen["stage"] / "model")


def _row(stage: str, nll: float, em: float | None) -> dict[str, Any]:
    return {"stage": stage, "nll_per_token": nll, "top1_agreement": 0.5, "exact_match": em}


def test_a_stage_that_loses_skill_is_not_selected() -> None:
    """The lowest-NLL stage lost 60 points of exact match: best keeps the lowest NLL among the
    stages within --max-skill-drop of the base; if none is, the lowest NLL, flagged."""
    stages = [_row("base", 2.0, 0.98), _row("warmup", 0.30, 0.38), _row("round-01", 0.45, 0.95), _row("round-02", 0.40, 0.91)]
    best = choose_stage(stages, "best", 5.0)
    assert (best.stage, best.index, best.skill_kept) == ("round-01", 1, True)
    assert "skill >= 93.0" in best.reason and "NLL 0.4500" in best.reason
    assert choose_stage(stages, "best", 10.0).stage == "round-02"  # 91 ≥ 98 − 10: now the lowest NLL within bound
    last = choose_stage(stages, "last", 5.0)
    assert (last.stage, last.index, last.skill_kept) == ("round-02", 2, None)
    lost = choose_stage([_row("base", 2.0, 0.98), _row("warmup", 0.3, 0.2), _row("round-01", 0.35, 0.4)], "best", 5.0)
    assert (lost.stage, lost.skill_kept) == ("warmup", False)
    assert "every stage lost more than 5 points" in lost.reason and "warmup 20.0; round-01 40.0" in lost.reason
    unmeasured = choose_stage([_row("base", 2.0, None), _row("warmup", 0.5, None), _row("round-01", 0.4, None)], "best", 5.0)
    assert (unmeasured.stage, unmeasured.skill_kept) == ("round-01", None) and "not measured" in unmeasured.reason
    lm_eval = {"tasks": {"arc_easy": {"acc,none": 0.6}, "piqa": {"acc,none": 0.7}}}
    assert skill_of({"exact_match": None, "benchmarks": lm_eval}) == pytest.approx(65.0)


def test_prompts_without_references_still_align(tiny_family: TinyFamily, tmp_path: Path) -> None:
    """No reference, no eval tasks: skill is not measured, the report says so, best = lowest NLL."""
    write_teacher_samples(tmp_path / "teacher", n_prompts=40, references=False)
    s = run_proxy_align(recipe_for(tiny_family, tmp_path, rounds=0, warmup_epochs=1))
    assert all(st["exact_match"] is None and st["exact_match_rows"] == 0 for st in s.report["stages"])
    assert s.report["selection"]["stage"] == "warmup" and s.report["selection"]["skill_kept"] is None
    assert "not measured" in s.report["selection"]["reason"] and s.skill_warning is None
    assert (tmp_path / "proxy" / "report.png").is_file()


def test_help_shows_the_selection_options() -> None:
    text = CliRunner().invoke(app, ["proxy-align", "--help"], env={"COLUMNS": "200"}).output
    for option in ("--select", "--max-skill-drop", "--eval-tasks", "--answer-pattern", "--nll-weight"):
        assert option in text
    assert "--weight-ce" in CliRunner().invoke(app, ["train-student", "--help"], env={"COLUMNS": "200"}).output


def test_pairs_drop_equal_texts_and_chunks_wrap_around() -> None:
    def sample(pid: str, response: str) -> TeacherSample:
        return TeacherSample(f"{pid}#0", pid, "align", [{"role": "user", "content": pid}], response)

    chunk = [[sample("a", "4."), sample("a", "four")], [sample("b", "5.")]]
    rows, dropped = preference_pairs(chunk, {"a": " 4. ", "b": "6."})
    assert dropped == 1 and [r["chosen"][0]["content"] for r in rows] == ["four", "5."]
    data = split_samples([sample(p, "x") for p in "abcde"] + [TeacherSample("w#0", "w", "warmup", [], "y")], eval_samples=2, seed=0, where="t")
    assert data.heldout_from == "align" and len(data.heldout) == 2 and len(data.align_prompts) == 3
    rounds = [[g[0].prompt_id for g in data.chunk(k, rounds=4, chunk_size=2)] for k in range(4)]
    assert sum(rounds, [])[:3] == [g[0].prompt_id for g in data.align_prompts] and all(len(r) == 2 for r in rounds)


def test_bad_inputs_fail_up_front_with_clear_messages(tiny_family: TinyFamily, tmp_path: Path) -> None:
    write_teacher_samples(tmp_path / "teacher", n_prompts=20, ratios=(0.0, 0.0, 1.0))
    with pytest.raises(InputError, match=r"no teacher samples in split\(s\) warmup and align \(distill 20\)"):
        run_proxy_align(recipe_for(tiny_family, tmp_path))

    write_teacher_samples(tmp_path / "teacher2", n_prompts=20)
    bare = tmp_path / "no-template"
    shutil.copytree(tiny_family.proxy, bare)
    (bare / "chat_template.jinja").unlink(missing_ok=True)
    tok_config = json.loads((bare / "tokenizer_config.json").read_text())
    tok_config.pop("chat_template", None)
    (bare / "tokenizer_config.json").write_text(json.dumps(tok_config))
    with pytest.raises(InputError, match="no chat template"):
        run_proxy_align(recipe_for(tiny_family, tmp_path, teacher=str(tmp_path / "teacher2"), model=str(bare)))

    with pytest.raises(ConfigError, match=r"\[proxy_align\] 'lora_r'.*cannot be served by vLLM"):
        recipe_for(tiny_family, tmp_path, lora_r=12)
    with pytest.raises(ConfigError, match="lm_head cannot be served by vLLM"):
        recipe_for(tiny_family, tmp_path, lora_target="q_proj,lm_head")
    result = CliRunner().invoke(app, ["proxy-align", "--model", str(tiny_family.proxy), "--lora-r", "24"])
    assert result.exit_code == 2 and "cannot be served by vLLM" in result.output and "Traceback" not in result.output
    assert vllm_problems({"r": 8, "use_dora": True, "modules_to_save": ["lm_head"], "bias": "all"}) == [
        "modules_to_save=['lm_head'] (fully trained copies of those modules)", "DoRA (use_dora=true)", "trained biases (bias/lora_bias)",
    ]  # fmt: skip


def test_sample_merged_merges_where_it_is_set_or_vllm_runs_on_the_cpu(tiny_family: TinyFamily, tmp_path: Path) -> None:
    decisions = {(s, cpu): merges_adapter(s, cpu) for s in ("auto", "always", "never") for cpu in (True, False)}
    assert decisions == {("auto", True): True, ("auto", False): False, ("always", True): True, ("always", False): True, ("never", True): False, ("never", False): False}
    with pytest.raises(ConfigError, match="sample_merged"):
        recipe_for(tiny_family, tmp_path, sample_merged="sometimes")


def test_a_student_with_another_vocabulary_gets_a_warning(tiny_family: TinyFamily, tmp_path: Path) -> None:
    other_tok = tmp_path / "other-tokenizer"
    train_tokenizer(default_corpus(n=50), 300, other_tok)
    other = build_llama(other_tok, tmp_path / "other-student", hidden_size=64, num_heads=2)
    tokenizer = load_chat_tokenizer(tiny_family.proxy)
    assert vocab_warning(tokenizer, tiny_family.proxy, str(tiny_family.student)) is None
    warning = vocab_warning(tokenizer, tiny_family.proxy, str(other))
    assert warning and "tokenizers differ" in warning and "proxy vocab 512 > student vocab 300" in warning and "useless" in warning


@pytest.mark.slow
def test_the_adapter_in_vllm_gives_peft_logprobs(aligned: tuple[Path, Summary], tiny_family: TinyFamily) -> None:
    root, _ = aligned
    adapter = root / "proxy" / "adapter"
    tokenizer = load_chat_tokenizer(tiny_family.proxy)
    _, samples = read_teacher_samples(Folder(str(root / "teacher")))
    chats = [encode_chat(tokenizer, s.messages, s.response) for s in samples[:8]]
    seqs, starts = [c.ids for c in chats], [c.response_start for c in chats]
    scores = {}
    for kind in ("hf", "vllm"):
        with load_engine(kind, tiny_family.proxy, adapter_dir=adapter) as engine:
            scores[kind] = list(engine.score_topk(seqs, starts, 5))
        with load_engine(kind, tiny_family.proxy) as engine:  # the base differs: the adapter is really applied
            base = list(engine.score_topk(seqs[:1], starts[:1], 5))[0]
        assert abs(base.token_logprobs - scores[kind][0].token_logprobs).max() > 1e-2
    for hf, vl in zip(scores["hf"], scores["vllm"], strict=True):
        assert abs(hf.token_logprobs - vl.token_logprobs).max() < 1e-3


@pytest.mark.slow
def test_kill_9_during_a_round_then_rerun_continues_after_the_last_finished_round(tiny_family: TinyFamily, tmp_path: Path) -> None:
    """With vLLM sampling each round from the adapter merged into the base (in the round's work
    folder, gone once the round's samples are committed)."""
    write_teacher_samples(tmp_path / "teacher")
    # the child reads the embedded recipe under its --set flags, and TOML has no null to unset its answer_pattern: set one
    args = dict(rounds=2, chunk_size=8, warmup_epochs=1, epochs=1, max_new_tokens=8, engine="vllm", sample_merged="always", answer_pattern=r"(\d+)")
    settings = recipe_for(tiny_family, tmp_path, **args).proxy_align.model_dump(exclude_none=True)
    flags = [f"--set=proxy_align.{k}={json.dumps(v)}" for k, v in settings.items()]
    manifest = tmp_path / "proxy" / "manifest.json"
    proc = subprocess.Popen([sys.executable, "-c", "from pkd.cli import main; main()", "proxy-align", *flags], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 300
        while not (manifest.is_file() and json.loads(manifest.read_text())["counts"]["rounds_sampled"] == 2):
            assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
            assert time.monotonic() < deadline
            time.sleep(0.2)
        os.kill(proc.pid, signal.SIGKILL)  # round 2 is sampled and training
    finally:
        proc.kill()
        proc.wait()
    before = {f.path: f.sha256 for f in Folder(str(tmp_path / "proxy")).read_manifest().files}
    summary = run_proxy_align(recipe_for(tiny_family, tmp_path, **args))
    assert summary.ran == ["round-02"]
    after = {f.path: f.sha256 for f in Folder(str(tmp_path / "proxy")).read_manifest().files}
    assert all(after[p] == sha for p, sha in before.items())  # nothing committed was redone
    assert stage(summary, "round-02")["pairs"] == 8 and not list((tmp_path / "proxy").glob(".tmp-*"))
    for k in (1, 2):
        sampling = json.loads((tmp_path / "proxy" / f"round-0{k}" / "sampling.json").read_text())
        assert sampling["merged"] and sampling["merge_s"] > 0 and sampling["new_tokens"] > 0
        assert stage(summary, f"round-0{k}")["merged"]
