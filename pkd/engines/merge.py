"""Merge a LoRA adapter into its base once, so that an engine scores a plain model.

vLLM's LoRA path is the slow part of scoring an aligned proxy (on this project's CPU machines,
SmolLM2-135M + LoRA r16: 45 response tokens/s with the adapter against 224 without), and the
merged weights give the same logits. The merge is written to a temporary folder and renamed into
place, with a marker naming the base and adapter fingerprints, so a rerun (or a resumed
`pkd cache-logits`) reuses it and a different adapter never picks up a stale merge.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from pkd.engines import checkpoint_dtype
from pkd.store import TMP_MARK

MARKER = "pkd-merged.json"


def merged_model(base_dir: Path, adapter_dir: Path, out: Path, inputs: dict[str, str]) -> Path:
    """`out`, holding base + adapter merged (safetensors, the base's dtype and tokenizer);
    reused when its marker names the same `inputs` (base and adapter fingerprints)."""
    marker = out / MARKER
    if marker.is_file() and json.loads(marker.read_text()) == inputs:
        return out
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = checkpoint_dtype(base_dir)
    base = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)  # merge in float32
    merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    merged = merged.to(getattr(torch, dtype))
    tmp = out.with_name(out.name + TMP_MARK)
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(out, ignore_errors=True)
    merged.save_pretrained(str(tmp), safe_serialization=True)
    AutoTokenizer.from_pretrained(str(base_dir)).save_pretrained(str(tmp))
    (tmp / MARKER).write_text(json.dumps(inputs, sort_keys=True))
    tmp.rename(out)
    return out
