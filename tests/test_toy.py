"""The toy world: a deterministic task family whose answers are checkable in either solution
style, and (slow) a quick world whose teacher vLLM serves exactly as transformers decodes it."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from pkd.teacher.prompts import load_prompts
from pkd.toy.tasks import (
    STYLES,
    Problem,
    TaskSpec,
    extract_answer,
    is_correct,
    make_prompt_split,
    prompt_record,
    proxy_solution,
    read_prompts,
    sample_problems,
    teacher_solution,
    write_prompts,
)
from pkd.toy.world import MARKER, ToyWorld, build_world


def test_generators_are_deterministic_and_distinct() -> None:
    a, b = sample_problems(200, seed=3), sample_problems(200, seed=3)
    assert a == b and a != sample_problems(200, seed=4)
    assert len({p.question for p in a}) == 200
    assert make_prompt_split(50, 10, seed=1) == make_prompt_split(50, 10, seed=1)


def test_problems_follow_their_spec() -> None:
    spec = TaskSpec()
    for p in sample_problems(500, seed=0, spec=spec):
        expr = p.question.removeprefix("What is ").removesuffix("?")
        assert eval(expr) == p.answer  # + and - associate left, as the steps do
        assert spec.steps[0] <= len(p.ops) <= spec.steps[1]
        assert all(0 <= r <= spec.ceiling for _, _, _, r in p.steps())


def test_the_two_styles_differ_and_both_are_checked_correct() -> None:
    p = Problem((23, 5, 8), ("+", "-"))
    assert teacher_solution(p) == "23 + 5 = 28. 28 - 8 = 20. Answer: 20"
    assert proxy_solution(p) == "First add 5 to 23 to get 28; then subtract 8 to get 20. The answer is 20."
    for p in sample_problems(300, seed=1):
        record = prompt_record("x", p)
        for style in STYLES.values():
            assert extract_answer(style(p)) == str(p.answer)
            assert is_correct(record, style(p))


@pytest.mark.parametrize(
    "response",
    [
        "23 + 5 = 28. 28 - 8 = 21. Answer: 21",  # wrong number
        "First add 5 to 23 to get 28; then subtract 8 to get 20.",  # never states an answer
        "23 + 5 = 28. 28 - 8 = 20. Answer: 200",
        "Answer: 20. Answer: 19",  # the last stated answer counts
        "",
    ],
)
def test_wrong_or_missing_answers_are_rejected(response: str) -> None:
    record = prompt_record("x", Problem((23, 5, 8), ("+", "-")))
    assert not is_correct(record, response)


def test_prompts_jsonl_is_teacher_sample_input(tmp_path: Path) -> None:
    train, heldout = make_prompt_split(40, 10, seed=0)
    assert not {r["messages"][0]["content"] for r in train} & {r["messages"][0]["content"] for r in heldout}
    path = write_prompts(train, tmp_path / "p" / "train.jsonl")
    lines = path.read_text().splitlines()
    assert [json.loads(line) for line in lines] == train == list(read_prompts(path))
    assert all(set(r) == {"id", "messages", "reference"} for r in train)
    parsed = load_prompts(str(path))  # what `pkd teacher-sample` reads
    assert [p.id for p in parsed] == [f"train-{i:05d}" for i in range(40)]
    assert all(is_correct(p, f"Answer: {p.reference}") for p in parsed)


def test_sft_loop_teaches_a_tiny_model_to_answer(tmp_path: Path) -> None:
    """The training and decoding helpers end to end, on a handful of memorised samples."""
    import torch
    from transformers import AutoModelForCausalLM

    from pkd.models.tiny import build_llama, train_tokenizer
    from pkd.toy.tasks import chat_example
    from pkd.toy.train import agreement, chat_examples, greedy_responses, train_sft

    problems = sample_problems(4, seed=0)
    texts = [s(p) for p in problems for s in STYLES.values()] + [p.question for p in problems]
    tokenizer = train_tokenizer(texts + ["user", "assistant"], 300, tmp_path / "tok")
    model = AutoModelForCausalLM.from_pretrained(build_llama(tmp_path / "tok", tmp_path / "m"))
    examples = chat_examples(tokenizer, [chat_example(p, "teacher") for p in problems])
    for p, e in zip(problems, examples):  # the loss covers the reply and its end of turn only
        reply = tokenizer.decode(e.ids[e.loss_start :])
        assert reply == teacher_solution(p) + tokenizer.eos_token + "\n"
    torch.set_num_threads(1)
    loss = train_sft(model, examples, steps=60, batch_size=4, lr=1e-2, pad_id=tokenizer.pad_token_id, warmup=5)
    assert loss < 0.1
    assert agreement(model, examples, tokenizer.pad_token_id)["agreement"] > 0.95
    responses = greedy_responses(model, tokenizer, [p.question for p in problems])
    assert responses == [teacher_solution(p) for p in problems]  # stops at end of turn


@pytest.mark.slow
def test_quick_world_is_complete_and_cached(toy_world_quick: ToyWorld) -> None:
    report = toy_world_quick.report
    for path in (toy_world_quick.teacher, toy_world_quick.proxy, toy_world_quick.student):
        assert (path / "model.safetensors").is_file() and (path / "tokenizer.json").is_file()
    members = report["members"]
    assert members["proxy"]["params"] > members["student"]["params"]
    assert report["teacher_heldout_accuracy"] >= 0.6  # the full build reaches ~100%
    assert report["teacher_heldout_accuracy"] > members["student"]["heldout_accuracy"]
    assert members["proxy"]["teacher_agreement"] < 0.8  # misaligned until proxy-align runs
    held = list(read_prompts(toy_world_quick.prompts_heldout))
    train = list(read_prompts(toy_world_quick.prompts_train))
    assert (len(train), len(held)) == (report["prompts"]["train"], report["prompts"]["heldout"])
    marker = toy_world_quick.root / MARKER
    stamp = marker.stat().st_mtime_ns
    again = build_world(toy_world_quick.root, quick=True)
    assert again == toy_world_quick and marker.stat().st_mtime_ns == stamp


@pytest.mark.slow
def test_vllm_serves_the_teacher_as_transformers_decodes_it(toy_world_quick: ToyWorld) -> None:
    """Greedy chat completions through the OpenAI API stop at end of turn and equal HF greedy."""
    import torch
    from openai import AsyncOpenAI
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pkd.engines.serve import vllm_server
    from pkd.toy.train import greedy_responses

    held = list(read_prompts(toy_world_quick.prompts_heldout))
    tokenizer = AutoTokenizer.from_pretrained(toy_world_quick.teacher)
    model = AutoModelForCausalLM.from_pretrained(toy_world_quick.teacher)
    torch.set_num_threads(1)
    expected = greedy_responses(model, tokenizer, [r["messages"][0]["content"] for r in held])
    del model

    async def ask_all(base_url: str, model_name: str) -> list:
        client, gate = AsyncOpenAI(base_url=base_url, api_key="unused"), asyncio.Semaphore(16)

        async def ask(record: dict) -> object:
            async with gate:
                reply = await client.chat.completions.create(
                    model=model_name, messages=record["messages"], temperature=0.0, max_tokens=64
                )
                return reply.choices[0]

        return await asyncio.gather(*(ask(r) for r in held))

    with vllm_server(toy_world_quick.teacher, served_model_name="teacher", dtype="float32") as server:
        choices = asyncio.run(ask_all(server.base_url, server.model))
    assert {c.finish_reason for c in choices} == {"stop"}
    got = [c.message.content for c in choices]
    same = sum(a == b for a, b in zip(got, expected))
    assert same >= 0.95 * len(held)  # float32 both sides; a rare near-tie may flip
    hf_acc = sum(is_correct(r, t) for r, t in zip(held, expected))
    vllm_acc = sum(is_correct(r, t) for r, t in zip(held, got))
    assert abs(hf_acc - vllm_acc) <= len(held) - same


def test_the_flawed_teacher_errs_on_a_realistic_share_in_model_like_ways() -> None:
    from pkd.toy.tasks import Flaws, parse_question

    flaws = Flaws(seed=0)
    problems = sample_problems(3000, seed=5)
    wrong = [p for p in problems if flaws.answer(p) != p.answer]
    assert 0.2 <= len(wrong) / len(problems) <= 0.3
    kinds = {"slip": 0, "skip": 0}
    for p in wrong[:300]:
        steps = flaws.steps(p)
        assert flaws.solution(p).endswith(f"Answer: {steps[-1][3]}")
        assert parse_question(p.question) == p
        if len(steps) < len(p.ops):
            kinds["skip"] += 1  # a step left out; what is written is still one chain
        if any((a + b if op == "+" else a - b) != r for a, op, b, r in steps):
            kinds["slip"] += 1  # an equation off by one
        assert all(steps[i][3] == steps[i + 1][0] for i in range(len(steps) - 1))
    assert kinds["slip"] > 50 and kinds["skip"] > 20
    # A fact's fate is fixed (a model's wrong fact is wrong every time); no flaws = the teacher style.
    assert all(flaws.solution(p) == Flaws(seed=0).solution(p) for p in wrong[:50])
    assert Flaws(seed=1).solution(wrong[0]) != flaws.solution(wrong[0]) or Flaws(seed=1).answer(wrong[1]) != flaws.answer(wrong[1])
    assert all(Flaws(slip=0, skip=0).solution(p) == teacher_solution(p) for p in problems[:200])
