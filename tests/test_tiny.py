"""The tiny family must be a faithful stand-in for a real model family: lossless tokenizer,
ChatML template that stops generation at end of turn, one vocabulary across members."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from pkd.models.tiny import IM_END, IM_START, TinyFamily, build_family, build_llama


@pytest.fixture(scope="module")
def tokenizer(tiny_family: TinyFamily):
    return AutoTokenizer.from_pretrained(tiny_family.tokenizer)


@pytest.mark.parametrize(
    "text",
    ["What is 12 + 30?", "Sort the list: 5, 2, 9.", " tabs\tand\nnewlines ", "héllo wörld 🙂"],
)
def test_tokenizer_round_trips_any_text(tokenizer, text: str) -> None:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == text


def test_special_tokens(tokenizer) -> None:
    assert tokenizer.eos_token == IM_END
    assert tokenizer.pad_token_id is not None and tokenizer.bos_token_id is not None
    for token in (IM_START, IM_END):
        assert tokenizer(token, add_special_tokens=False)["input_ids"] == [
            tokenizer.convert_tokens_to_ids(token)
        ]


def test_chat_template_renders_chatml(tokenizer) -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 2 + 2?"},
        {"role": "assistant", "content": "4."},
    ]
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    assert text == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nWhat is 2 + 2?<|im_end|>\n"
        "<|im_start|>assistant\n4.<|im_end|>\n"
    )
    prompt = tokenizer.apply_chat_template(messages[:2], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>assistant\n")
    ids = tokenizer.apply_chat_template(messages, return_dict=True)["input_ids"]
    assert ids == tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.eos_token_id in ids  # each turn ends with eos


def test_models_load_and_share_the_vocabulary(tiny_family: TinyFamily, tokenizer) -> None:
    sizes = {}
    for name in ("student", "proxy", "teacher"):
        path = getattr(tiny_family, name)
        model = AutoModelForCausalLM.from_pretrained(path)
        assert model.dtype == torch.float32
        assert model.config.vocab_size == len(tokenizer)
        assert model.generation_config.eos_token_id == tokenizer.eos_token_id
        assert AutoTokenizer.from_pretrained(path).get_vocab() == tokenizer.get_vocab()
        assert (path / "model.safetensors").is_file()
        with torch.no_grad():
            logits = model(torch.tensor([[1, 2, 3]])).logits  # (B, T, V)
        assert logits.shape == (1, 3, len(tokenizer))
        sizes[name] = model.num_parameters()
    assert sizes["student"] < sizes["proxy"]


@pytest.mark.parametrize(("hidden", "heads"), [(64, 4), (64, 3), (48, 1)])
def test_build_llama_rejects_head_dims_vllm_cpu_cannot_run(
    tiny_family: TinyFamily, tmp_path: Path, hidden: int, heads: int
) -> None:
    with pytest.raises(ValueError, match="head_dim|divisible"):
        build_llama(tiny_family.tokenizer, tmp_path / "m", hidden_size=hidden, num_heads=heads)
    assert not (tmp_path / "m").exists()


def test_build_llama_is_deterministic_for_a_seed(tiny_family: TinyFamily, tmp_path: Path) -> None:
    state = []
    for name, seed in [("a", 7), ("b", 7), ("c", 8)]:
        out = build_llama(tiny_family.tokenizer, tmp_path / name, seed=seed)
        state.append(load_file(out / "model.safetensors"))
    assert all(torch.equal(state[0][k], state[1][k]) for k in state[0])
    assert not torch.equal(state[0]["lm_head.weight"], state[2]["lm_head.weight"])


def test_build_family_reuses_a_complete_family(tiny_family: TinyFamily) -> None:
    weights = tiny_family.student / "model.safetensors"
    before = weights.stat().st_mtime_ns
    assert build_family(tiny_family.root, seed=0) == tiny_family
    assert weights.stat().st_mtime_ns == before
