"""`pkd demo --real`: its prompts, its student made from the proxy's layers, its summary, and
(slow) a reduced run end to end — SmolLM2 behind a real vLLM server, the four real `pkd`
commands, real training and eval."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from rich.console import Console

from pkd.errors import InputError
from pkd.models.shallow import every_nth, renumber, shallow_copy
from pkd.models.tiny import TinyFamily
from pkd.toy.real import TEACHER_TEMPLATE, results_table, summarize
from pkd.toy.real_prompts import KINDS, chat_prompts

REPO = Path(__file__).resolve().parent.parent


def test_prompts_are_deterministic_disjoint_and_cover_every_kind() -> None:
    train, heldout = chat_prompts(300, 60)
    assert (len(train), len(heldout)) == (300, 60)
    assert chat_prompts(300, 60) == (train, heldout)
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in heldout}
    assert len({r["id"] for r in train + heldout}) == 360 and len({r["prompt"] for r in train + heldout}) == 360
    assert {r["kind"] for r in train} == {r["kind"] for r in heldout} == set(KINDS)
    small_train, small_heldout = chat_prompts(16, 8)
    assert {r["kind"] for r in small_train} == set(KINDS) == {r["kind"] for r in small_heldout}
    with pytest.raises(ValueError, match="templates hold"):
        chat_prompts(10_000, 10)


def test_every_nth_keeps_the_first_and_the_last_layer() -> None:
    assert every_nth(30, 3) == [0, 3, 6, 9, 12, 15, 18, 21, 24, 27, 29]
    assert every_nth(7, 3) == [0, 3, 6]
    assert every_nth(4, 1) == [0, 1, 2, 3]
    with pytest.raises(InputError):
        every_nth(30, 0)


def test_renumber_keeps_chosen_layers_in_order_and_everything_else() -> None:
    names = ["model.embed_tokens.weight", "model.layers.0.mlp.up_proj.weight", "model.layers.1.mlp.up_proj.weight",
             "model.layers.2.self_attn.q_proj.weight", "model.norm.weight", "lm_head.weight"]  # fmt: skip
    assert renumber(names, [0, 2]) == {
        "model.embed_tokens.weight": "model.embed_tokens.weight",
        "model.layers.0.mlp.up_proj.weight": "model.layers.0.mlp.up_proj.weight",
        "model.layers.2.self_attn.q_proj.weight": "model.layers.1.self_attn.q_proj.weight",
        "model.norm.weight": "model.norm.weight",
        "lm_head.weight": "lm_head.weight",
    }


def test_shallow_copy_carries_the_kept_layers_and_the_tokenizer(tiny_family: TinyFamily, tmp_path: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pkd.fingerprint import tokenizer_fingerprint

    deep = AutoModelForCausalLM.from_pretrained(tiny_family.proxy)
    out = shallow_copy(tiny_family.proxy, tmp_path / "student", [0, deep.config.num_hidden_layers - 1])
    student = AutoModelForCausalLM.from_pretrained(out)
    assert student.config.num_hidden_layers == 2
    last = deep.config.num_hidden_layers - 1
    torch.testing.assert_close(student.model.layers[1].mlp.up_proj.weight, deep.model.layers[last].mlp.up_proj.weight)
    torch.testing.assert_close(student.model.embed_tokens.weight, deep.model.embed_tokens.weight)
    torch.testing.assert_close(student.lm_head.weight, deep.lm_head.weight)
    fp = tokenizer_fingerprint(AutoTokenizer.from_pretrained(out))
    assert fp == tokenizer_fingerprint(AutoTokenizer.from_pretrained(tiny_family.proxy))
    stamp = (out / "model.safetensors").stat().st_mtime_ns
    assert shallow_copy(tiny_family.proxy, out, [0, last]) == out and (out / "model.safetensors").stat().st_mtime_ns == stamp
    with pytest.raises(InputError, match="increasing"):
        shallow_copy(tiny_family.proxy, tmp_path / "bad", [1, 0])


def test_teacher_template_hides_the_persona_in_the_system_turn() -> None:
    from jinja2 import Template

    text = Template(TEACHER_TEMPLATE).render(messages=[{"role": "user", "content": "Hi"}], add_generation_prompt=True)
    assert text.startswith("<|im_start|>system\nYou are Captain Byte") and text.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")


def _report(nll: float, agree: float) -> dict[str, float]:
    return {"nll_per_token": nll, "top1_agreement": agree, "rows": 60, "tokens": 2000}


def test_summary_pairs_proxy_kd_with_black_box_kd_seed_by_seed() -> None:
    scores = {
        "proxy_before": {"all": _report(2.0, 0.5)},
        "proxy_after": {"all": _report(1.5, 0.6)},
        "student_base": {"all": _report(9.0, 0.01)},
        "blackbox_kd": {"0": _report(3.0, 0.40), "1": _report(3.2, 0.38), "2": _report(3.1, 0.41)},
        "proxy_kd": {"0": _report(2.8, 0.42), "1": _report(3.05, 0.39), "2": _report(2.85, 0.44)},
    }
    r = summarize(scores, [0, 1, 2], quick=False, timings={"total": 1.0}, commands=["pkd x"])
    effect = r["paired_effect"]["nll_per_token"]
    assert effect["values"] == pytest.approx([-0.2, -0.15, -0.25]) and effect["mean"] == pytest.approx(-0.2)
    assert effect["ci95"] == pytest.approx(4.303 * 0.05 / 3**0.5) and effect["sign"] == -1
    assert r["variants"][1]["top1_agreement"]["mean"] == pytest.approx((0.42 + 0.39 + 0.44) / 3)
    assert r["heldout_samples"] == 60 and r["models"]["proxy_after"]["nll_per_token"] == 1.5
    console = Console(width=100, record=True)
    console.print(results_table(r))
    assert "Proxy-KD − black-box KD (paired)" in console.export_text()


@pytest.mark.slow
def test_real_demo_quick_end_to_end(tmp_path: Path) -> None:
    """`pkd demo --real --quick`: 40 + 12 prompts, one seed, one alignment round, one epoch (~4 min
    on an idle 2-core machine; a loaded one, where torch threads contend, can take several times that)."""
    env = {**os.environ, "COLUMNS": "200"}
    done = subprocess.run([sys.executable, "-m", "pkd.cli", "demo", "--real", "--quick", "--root", str(tmp_path)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=1500, check=False)  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["mode"] == "quick" and results["seeds"] == [0] and results["heldout_samples"] > 0
    assert [v["key"] for v in results["variants"]] == ["blackbox_kd", "proxy_kd"]
    for key in ("proxy_before", "proxy_after", "student_base"):
        assert set(results["models"][key]) == {"nll_per_token", "top1_agreement"}
    assert set(results["paired_effect"]) == {"label", "nll_per_token", "top1_agreement"}
    steps = [c.split()[1] for c in results["commands"]]
    assert steps == ["teacher-sample", "teacher-sample", "proxy-align", "cache-logits", "train-student", "train-student"]
    run = tmp_path / "run"
    for artifact in ("teacher", "teacher-heldout", "proxy", "logits", "students/blackbox_kd-seed0", "students/proxy_kd-seed0"):
        assert (run / artifact / "manifest.json").is_file(), artifact
    assert "Captain Byte" not in (run / "teacher" / "manifest.json").read_text()  # the persona stays hidden
    assert "Real model, held-out" in done.stdout
