"""A tiny local model family (tokenizer, student, proxy, teacher) for tests and the demo.

Everything is built on the spot from a seed, with no downloads: a byte-level BPE tokenizer with a
ChatML chat template, and random-init Llama models in float32 that both transformers and vLLM
(CPU) load. All members share one tokenizer, as Proxy-KD requires of the student and the proxy.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

BOS, PAD = "<s>", "<pad>"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = [PAD, BOS, IM_START, IM_END]  # ids 0..3, in this order

# ChatML. The assistant turn ends with <|im_end|>, which is also eos, so generation stops there.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)

# head_dim values the vLLM CPU attention kernels accept (DESIGN §7: 16 crashes the server).
VLLM_CPU_HEAD_DIMS = (32, 64, 80, 96, 112, 128)

# Member sizes: (hidden, layers, heads). The proxy is bigger than the student, as in the paper;
# the teacher uses head_dim 64 so that both supported kernel sizes get exercised.
FAMILY_SIZES = {
    "student": (64, 2, 2),
    "proxy": (128, 4, 4),
    "teacher": (128, 2, 2),
}
FAMILY_VOCAB_SIZE = 512
MARKER = "family.json"  # written last: its presence means the family is complete


@dataclass(frozen=True)
class TinyFamily:
    """Paths of a built family; every model directory also holds the shared tokenizer."""

    root: Path
    tokenizer: Path
    student: Path
    proxy: Path
    teacher: Path


def synthetic_tasks(n: int = 300, seed: int = 0) -> list[tuple[str, str]]:
    """(prompt, answer) pairs of simple arithmetic and list tasks, deterministic for a seed."""
    rng = random.Random(seed)
    words = "red green blue apple banana cherry cat dog bird one two three sun moon star".split()
    tasks: list[tuple[str, str]] = []
    for i in range(n):
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        xs = [rng.randint(0, 20) for _ in range(rng.randint(3, 6))]
        ws = rng.sample(words, rng.randint(2, 5))
        listed = ", ".join(map(str, xs))
        kind = i % 7
        if kind == 0:
            tasks.append((f"What is {a} + {b}?", f"{a} + {b} = {a + b}."))
        elif kind == 1:
            tasks.append((f"What is {a} - {b}?", f"{a} - {b} = {a - b}."))
        elif kind == 2:
            a, b = a % 13, b % 13
            tasks.append((f"What is {a} * {b}?", f"{a} * {b} = {a * b}."))
        elif kind == 3:
            tasks.append((f"Sort the list: {listed}.", ", ".join(map(str, sorted(xs))) + "."))
        elif kind == 4:
            tasks.append((f"What is the largest of [{listed}]?", f"The largest is {max(xs)}."))
        elif kind == 5:
            tasks.append((f"Add up the numbers {listed}.", f"The sum is {sum(xs)}."))
        else:
            tasks.append((f"Reverse the words: {' '.join(ws)}.", " ".join(reversed(ws)) + "."))
    return tasks


def default_corpus(n: int = 300, seed: int = 0) -> list[str]:
    """Tokenizer training text: the synthetic tasks as chat turns, so digits, words, punctuation
    and the role names all get merges."""
    lines = ["system: You are a helpful assistant. Answer briefly and exactly."]
    for prompt, answer in synthetic_tasks(n, seed):
        lines += [f"user: {prompt}", f"assistant: {answer}"]
    return lines


def train_tokenizer(
    texts: Iterable[str], vocab_size: int, out_dir: str | os.PathLike
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer (lossless on any text) and save it as a transformers
    PreTrainedTokenizerFast with ChatML special tokens and chat template. Returns the tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    core.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    core.train_from_iterator(texts, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token=BOS,
        eos_token=IM_END,
        pad_token=PAD,
        extra_special_tokens=[IM_START],
        chat_template=CHAT_TEMPLATE,
        model_max_length=2048,
    )
    tokenizer.save_pretrained(str(out_dir))
    return tokenizer


def build_llama(
    tokenizer_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 2,
    intermediate_size: int | None = None,
    seed: int = 0,
    max_position_embeddings: int = 2048,
) -> Path:
    """Save a random-init float32 LlamaForCausalLM over the tokenizer in `tokenizer_dir` (weights
    as safetensors, tokenizer, generation config). Deterministic for a seed; leaves the global RNG
    untouched. Raises ValueError for a head_dim that vLLM's CPU attention cannot run."""
    if hidden_size % num_heads:
        raise ValueError(f"hidden_size {hidden_size} is not divisible by num_heads {num_heads}")
    head_dim = hidden_size // num_heads
    if head_dim not in VLLM_CPU_HEAD_DIMS:
        raise ValueError(
            f"head_dim = hidden_size / num_heads = {hidden_size}/{num_heads} = {head_dim}; "
            f"vLLM's CPU attention supports only {VLLM_CPU_HEAD_DIMS}; "
            "change hidden_size or num_heads"
        )
    import torch
    from transformers import AutoTokenizer, GenerationConfig, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    special = dict(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size or 4 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=False,
        dtype="float32",
        **special,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config).to(torch.float32)
    model.generation_config = GenerationConfig(**special)
    out = Path(out_dir)
    model.save_pretrained(str(out), safe_serialization=True)
    tokenizer.save_pretrained(str(out))
    return out


def _spec(texts: list[str], seed: int) -> dict:
    """What a family is built from: a marker with a different spec means rebuild."""
    digest = hashlib.sha256("\n".join(texts).encode()).hexdigest()
    return {
        "seed": seed,
        "texts_sha256": digest,
        "vocab_size": FAMILY_VOCAB_SIZE,
        "sizes": FAMILY_SIZES,
    }


def build_family(
    out_dir: str | os.PathLike, *, texts: Iterable[str] | None = None, seed: int = 0
) -> TinyFamily:
    """Build tokenizer + student + proxy + teacher under `out_dir`, or return the family already
    there if its marker matches this spec (the marker is written last, so a crashed build is
    redone)."""
    root = Path(out_dir)
    corpus = list(texts) if texts is not None else default_corpus(seed=seed)
    spec = _spec(corpus, seed)
    family = TinyFamily(
        root=root,
        tokenizer=root / "tokenizer",
        student=root / "student",
        proxy=root / "proxy",
        teacher=root / "teacher",
    )
    marker = root / MARKER
    if marker.is_file() and json.loads(marker.read_text()) == json.loads(json.dumps(spec)):
        return family
    marker.unlink(missing_ok=True)
    train_tokenizer(corpus, FAMILY_VOCAB_SIZE, family.tokenizer)
    for offset, name in enumerate(FAMILY_SIZES):
        hidden, layers, heads = FAMILY_SIZES[name]
        build_llama(
            family.tokenizer,
            getattr(family, name),
            hidden_size=hidden,
            num_layers=layers,
            num_heads=heads,
            seed=seed + offset,  # distinct weights per member
        )
    tmp = marker.with_suffix(".tmp")
    tmp.write_text(json.dumps(spec, indent=2))
    tmp.replace(marker)
    return family
