"""The engines on the tiny proxy: vLLM and transformers agree on top-k scores (with and without a
LoRA adapter), generation honours n / max_tokens / stop ids / seeds, and misuse fails clearly.
Engines are module-scoped: vLLM starts once (~10 s on 2 cores)."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

import pkd.engines
from pkd.engines import Engine, ScoreResult, load_engine, vllm_unusable_reason, windows
from pkd.errors import EngineError
from pkd.models.tiny import TinyFamily, synthetic_tasks

K = 10  # vLLM's k; HF scores k + 1 to see the gap below the k-th
TOL = 1e-3
NEAR_TIE = 1e-4


@pytest.fixture(scope="module")
def tokenizer(tiny_family: TinyFamily):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_family.tokenizer))


@pytest.fixture(scope="module")
def samples(tokenizer) -> tuple[list[list[int]], list[int]]:
    """Chat prompt + answer token ids and where the answer starts (24 sequences of 20-45)."""
    sequences, starts = [], []
    for question, answer in synthetic_tasks(24, seed=1):
        prompt = tokenizer.apply_chat_template(
            [{"role": "user", "content": question}], add_generation_prompt=True, tokenize=False
        )
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        answer_ids = tokenizer(answer + "<|im_end|>\n", add_special_tokens=False)["input_ids"]
        sequences.append(prompt_ids + answer_ids)
        starts.append(len(prompt_ids))
    return sequences, starts


@pytest.fixture(scope="module")
def adapter_dir(tiny_family: TinyFamily, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A rank-8 LoRA on every linear layer of the proxy with seeded random A and B (PEFT zeroes
    B at init, which would leave the outputs unchanged)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_family.proxy))
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    peft_model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=targets))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
    out = tmp_path_factory.mktemp("lora") / "adapter"
    peft_model.save_pretrained(str(out))
    return out


@pytest.fixture(scope="module")
def hf_engine(tiny_family: TinyFamily) -> Iterator[Engine]:
    with load_engine("hf", tiny_family.proxy, dtype="float32") as engine:
        yield engine


@pytest.fixture(scope="module")
def vllm_engine(tiny_family: TinyFamily) -> Iterator[Engine]:
    """LoRA enabled (max_lora_rank) but no adapter: tests swap one in with set_adapter."""
    if reason := vllm_unusable_reason():
        pytest.skip(reason)
    with load_engine("vllm", tiny_family.proxy, dtype="float32", max_lora_rank=8) as engine:
        yield engine


def agreement(hf: list[ScoreResult], vllm: list[ScoreResult]) -> dict[str, float]:
    """max |Δ logprob| over the top-k (rank by rank) and the actual tokens, and the share of
    positions without a near-tie at the k-th rank whose top-k id sets are equal."""
    d_topk = d_token = 0.0
    same = compared = 0
    for h, v in zip(hf, vllm, strict=True):
        assert v.topk_ids.shape == (len(h.token_logprobs), K)
        d_topk = max(d_topk, float(np.abs(h.topk_logprobs[:, :K] - v.topk_logprobs).max()))
        d_token = max(d_token, float(np.abs(h.token_logprobs - v.token_logprobs).max()))
        clear = h.topk_logprobs[:, K - 1] - h.topk_logprobs[:, K] > NEAR_TIE
        for row in np.flatnonzero(clear):
            compared += 1
            same += set(h.topk_ids[row, :K]) == set(v.topk_ids[row])
    return {"d_topk": d_topk, "d_token": d_token, "same_sets": same / compared, "compared": compared}


def test_hf_scores_match_a_plain_forward(hf_engine: Engine, tiny_family: TinyFamily, samples) -> None:
    """Batching (100 padded tokens: 2-3 sequences a batch, sorted by length), right padding and
    the kept-logits offset change nothing against one unpadded forward per sequence; results
    come back in input order."""
    import torch
    from transformers import AutoModelForCausalLM

    sequences, starts = samples[0][:12], samples[1][:12]
    sequences, starts = [*sequences, *sequences[::-1]], [*starts, *starts[::-1]]
    sequences, starts = [*sequences, sequences[0]], [*starts, len(sequences[0])]  # + an empty one
    results = list(hf_engine.score_topk(sequences, starts, 5, batch_tokens=100))
    assert len(results) == len(sequences)
    assert results[-1].topk_ids.shape == (0, 5) and results[-1].token_logprobs.shape == (0,)
    model = AutoModelForCausalLM.from_pretrained(str(tiny_family.proxy)).eval()
    for seq, start, res in zip(sequences[:12], starts, results):
        with torch.no_grad():
            logprobs = model(torch.tensor([seq])).logits[0, start - 1 : -1].float().log_softmax(-1)
        top = logprobs.topk(5, dim=-1)
        assert res.topk_ids.dtype == np.int32 and res.topk_logprobs.dtype == np.float32
        assert np.all(np.diff(res.topk_logprobs, axis=1) <= 0)
        np.testing.assert_array_equal(res.topk_ids, top.indices.numpy())
        np.testing.assert_allclose(res.topk_logprobs, top.values.numpy(), atol=1e-5)
        actual = logprobs.gather(-1, torch.tensor(seq[start:])[:, None])[:, 0]
        np.testing.assert_allclose(res.token_logprobs, actual.numpy(), atol=1e-5)
    for first, second in zip(results[:12], results[12:24][::-1]):  # the same sequences, reversed
        np.testing.assert_array_equal(first.topk_ids, second.topk_ids)
        np.testing.assert_allclose(first.topk_logprobs, second.topk_logprobs, atol=1e-5)


def test_windows_split_by_token_budget() -> None:
    assert list(windows([3, 3, 3, 9, 1], 6)) == [[0, 1], [2], [3], [4]]


def test_vllm_matches_hf(hf_engine: Engine, vllm_engine: Engine, samples) -> None:
    sequences, starts = samples
    hf = list(hf_engine.score_topk(sequences, starts, K + 1))
    vllm = list(vllm_engine.score_topk(sequences, starts, K))
    stats = agreement(hf, vllm)
    assert stats["compared"] > 100
    assert stats["same_sets"] == 1.0, stats
    assert stats["d_topk"] <= TOL and stats["d_token"] <= TOL, stats


def test_vllm_matches_hf_with_lora(hf_engine: Engine, vllm_engine: Engine, samples, adapter_dir: Path) -> None:
    sequences, starts = samples
    base = list(hf_engine.score_topk(sequences, starts, K + 1))
    try:
        hf_engine.set_adapter(adapter_dir)
        vllm_engine.set_adapter(adapter_dir)
        hf = list(hf_engine.score_topk(sequences, starts, K + 1))
        vllm = list(vllm_engine.score_topk(sequences, starts, K))
    finally:
        hf_engine.set_adapter(None)
        vllm_engine.set_adapter(None)
    shift = max(float(np.abs(b.token_logprobs - h.token_logprobs).max()) for b, h in zip(base, hf))
    assert shift > 0.05  # the adapter really changes the model
    stats = agreement(hf, vllm)
    assert stats["same_sets"] == 1.0, stats
    assert stats["d_topk"] <= TOL and stats["d_token"] <= TOL, stats
    # set_adapter(None) is the base model again
    again = list(hf_engine.score_topk(sequences[:3], starts[:3], K + 1))
    np.testing.assert_array_equal(again[0].topk_ids, base[0].topk_ids)


@pytest.fixture(scope="module")
def eos_prompt(hf_engine: Engine, tokenizer) -> list[int]:
    """A context after which the proxy's argmax is eos, by a clear margin: greedy decoding from
    it must stop at once. Found by scoring random sequences (p ~ 1/512 per position)."""
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    sequences = np.random.default_rng(0).integers(4, 512, size=(128, 32)).tolist()
    for seq, res in zip(sequences, hf_engine.score_topk(sequences, [1] * len(sequences), 2)):
        hits = (res.topk_ids[:, 0] == eos) & (res.topk_logprobs[:, 0] - res.topk_logprobs[:, 1] > 1e-3)
        if hits.any():
            return seq[: 1 + int(np.argmax(hits))]  # row t predicts token 1 + t
    pytest.fail("no context found where eos is the proxy's argmax")


@pytest.mark.parametrize("kind", ["hf", "vllm"])
def test_generate(kind: str, request: pytest.FixtureRequest, tokenizer, samples, eos_prompt) -> None:
    engine: Engine = request.getfixturevalue(f"{kind}_engine")
    sequences, starts = samples
    prompts = [seq[:start] for seq, start in zip(sequences[:6], starts)]
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    out = engine.generate(prompts, n=4, max_tokens=16, seed=7, temperature=1.0)
    assert len(out) == len(prompts) and all(len(per_prompt) == 4 for per_prompt in out)
    completions = [c for per_prompt in out for c in per_prompt]
    assert all(1 <= len(c) <= 16 for c in completions)
    assert all(eos not in c[:-1] for c in completions)
    assert engine.generate(prompts, n=4, max_tokens=16, seed=7, temperature=1.0) == out
    assert engine.generate(prompts, n=4, max_tokens=16, seed=8, temperature=1.0) != out
    # eos ends a completion (and is kept as its last token)
    greedy = engine.generate([eos_prompt, prompts[0]], n=2, max_tokens=16, temperature=0.0)
    assert greedy[0] == [[eos], [eos]]
    assert all(len(c) == 16 or c[-1] == eos for c in greedy[1])
    # stop ids: with a quarter of the vocabulary most completions stop within a few tokens
    stops = list(range(100, 228))
    out = engine.generate(prompts[:4], n=2, max_tokens=16, seed=1, stop_token_ids=stops)
    stopped = [c for per_prompt in out for c in per_prompt]
    assert all(not set(c[:-1]) & set(stops) for c in stopped)
    assert sum(c[-1] in stops for c in stopped) >= 6


def test_greedy_generation_matches_across_engines(hf_engine: Engine, vllm_engine: Engine, samples) -> None:
    """Left padding and the kv cache give HF the same greedy path as vLLM."""
    sequences, starts = samples
    prompts = [seq[:start] for seq, start in zip(sequences[:6], starts)]
    hf = hf_engine.generate(prompts, n=2, max_tokens=12, temperature=0.0)
    vllm = vllm_engine.generate(prompts, n=2, max_tokens=12, temperature=0.0)
    assert hf == vllm
    assert all(per_prompt[0] == per_prompt[1] and 1 <= len(per_prompt[0]) <= 12 for per_prompt in hf)


@pytest.mark.parametrize("kind", ["hf", "vllm"])
def test_k_above_max_logprobs_says_how_to_raise_it(kind: str, request: pytest.FixtureRequest, samples) -> None:
    engine: Engine = request.getfixturevalue(f"{kind}_engine")
    sequences, starts = samples
    with pytest.raises(EngineError, match=r"max_logprobs=20.*--max-logprobs 21"):
        list(engine.score_topk(sequences[:1], starts[:1], 21))


def test_vllm_rejects_adapters_it_cannot_serve(adapter_dir: Path, tmp_path: Path) -> None:
    from pkd.engines.vllm import read_adapter

    assert read_adapter(adapter_dir)[0] == 8
    bad = tmp_path / "bad"
    shutil.copytree(adapter_dir, bad)
    config = json.loads((bad / "adapter_config.json").read_text())
    config.update(modules_to_save=["lm_head"], use_dora=True)
    (bad / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(EngineError, match=r"modules_to_save.*DoRA.*--engine hf"):
        read_adapter(bad)


def test_auto_falls_back_to_hf(tiny_family: TinyFamily, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pkd.engines, "vllm_unusable_reason", lambda: "not installed")
    with load_engine("auto", tiny_family.proxy) as engine:
        assert engine.kind == "hf" and engine.vocab_size == 512


def test_auto_scores_with_the_faster_engine_for_the_hardware():
    """On a CPU, transformers outscores vLLM (bench/cache_logits.py): `auto` takes it; vLLM only
    where it runs on an accelerator."""
    from vllm.platforms import current_platform

    from pkd.engines import scoring_engine

    assert scoring_engine() == ("hf" if current_platform.is_cpu() or vllm_unusable_reason() else "vllm")
