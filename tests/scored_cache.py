"""A realistic logit cache without vLLM: the tiny proxy scores synthetic chat samples with
transformers, and the real writer stores its top-k under the family's tokenizer."""

from __future__ import annotations

import numpy as np

from pkd.cache.coded import TopkAnsCodec
from pkd.fingerprint import files_fingerprint, tokenizer_fingerprint
from pkd.cache.shards import LogitCacheWriter, LogitSample
from pkd.records import LogitCacheManifest
from pkd.store import Folder
from pkd.models.tiny import IM_END, TinyFamily, synthetic_tasks


def chat_ids(tokenizer, prompt: str, answer: str) -> tuple[list[int], int]:
    """Prompt (chat template + generation prompt) and response ids, and where the response starts."""
    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
    head = tokenizer(text, add_special_tokens=False)["input_ids"]
    tail = tokenizer(answer + IM_END, add_special_tokens=False)["input_ids"]
    return head + tail, len(head)


def score_cache(family: TinyFamily, uri: str, *, n: int = 48, k: int = 8, seed: int = 0, shard_rows: int = 16, tokenizer_fp: str | None = None) -> LogitCacheManifest:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(family.tokenizer)
    proxy = AutoModelForCausalLM.from_pretrained(family.proxy).eval()
    header = LogitCacheManifest(
        codec=TopkAnsCodec(k=k, vocab_size=proxy.config.vocab_size).spec(),
        vocab_size=proxy.config.vocab_size,
        tokenizer_fingerprint=tokenizer_fp or tokenizer_fingerprint(tok),
        proxy_fingerprint=files_fingerprint(family.proxy),
        teacher_model="tiny-teacher",
        inputs={"samples": f"synthetic-{n}-{seed}"},
        config={"k": k},
    )
    writer = LogitCacheWriter(Folder(uri), header, shard_rows=shard_rows)
    for i, (prompt, answer) in enumerate(synthetic_tasks(n, seed)):
        ids, start = chat_ids(tok, prompt, answer)
        with torch.no_grad():
            logp = torch.log_softmax(proxy(torch.tensor([ids])).logits[0].float(), -1)  # (L, V)
        rows = logp[start - 1 : len(ids) - 1]  # (T, V): row t predicts ids[start + t]
        lp, top = rows.topk(k, dim=-1)
        target = torch.tensor(ids[start:])
        writer.add(
            LogitSample(
                sample_id=f"q{i:04d}",
                input_ids=np.asarray(ids, np.int32),
                response_start=start,
                topk_ids=top.numpy().astype(np.int32),
                topk_logprobs=lp.numpy().astype(np.float32),
                token_logprob=rows.gather(1, target[:, None]).squeeze(1).numpy().astype(np.float32),
            )
        )
    return writer.close()
