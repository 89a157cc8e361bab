"""A shallower student made from a deeper model: keep some of its decoder layers, drop the rest.

Why: the real-model demo needs a student that shares the proxy's tokenizer and is smaller, and
no smaller pretrained model of the SmolLM2 family is available offline. Keeping every n-th layer
of the proxy (embeddings, final norm and head kept) gives a model that starts far from random —
the kept layers still read and write the same residual stream — and that distillation can repair
in minutes on a CPU. Llama-style models only (`model.layers.N.` parameter names).
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Sequence
from pathlib import Path

from pkd.errors import InputError

_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_MARKER = "pkd-shallow.json"  # written last: its presence means the folder is complete
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "vocab.json", "merges.txt", "generation_config.json")  # fmt: skip


def every_nth(num_layers: int, n: int) -> list[int]:
    """Layers 0, n, 2n, ... plus the last one (which writes what the final norm and head read)."""
    if n < 1 or num_layers < 1:
        raise InputError(f"every_nth: need n ≥ 1 and at least one layer (n = {n}, layers = {num_layers})")
    keep = list(range(0, num_layers, n))
    return keep if keep[-1] == num_layers - 1 else [*keep, num_layers - 1]


def renumber(names: Sequence[str], keep: Sequence[int]) -> dict[str, str]:
    """Old parameter name -> new one: layer `keep[i]` becomes layer i; other layers' parameters
    are left out; parameters outside the layers keep their names."""
    index = {old: new for new, old in enumerate(keep)}
    out: dict[str, str] = {}
    for name in names:
        m = _LAYER.match(name)
        if m is None:
            out[name] = name
        elif int(m.group(1)) in index:
            out[name] = f"model.layers.{index[int(m.group(1))]}.{m.group(2)}"
    return out


def shallow_copy(model_dir: str | Path, out_dir: str | Path, keep: Sequence[int]) -> Path:
    """Write a model with only the decoder layers `keep` of `model_dir` (in that order), and its
    tokenizer files, to `out_dir`. Idempotent: a complete folder made from the same source and
    layers is returned untouched. Returns `out_dir`."""
    src, out = Path(model_dir), Path(out_dir)
    record = {"source": str(src.resolve()), "layers": list(keep)}
    marker = out / _MARKER
    if marker.is_file() and json.loads(marker.read_text()) == record:
        return out

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(src)
    if not keep or sorted(set(keep)) != list(keep) or keep[-1] >= config.num_hidden_layers:
        raise InputError(f"{src}: layers to keep must be increasing and below {config.num_hidden_layers}, got {list(keep)}")
    deep = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    names = renumber(list(deep.state_dict()), keep)
    state = {new: deep.state_dict()[old] for old, new in names.items()}
    if not any(_LAYER.match(n) for n in state):
        raise InputError(f"{src}: no `model.layers.N.` parameters; shallow_copy handles Llama-style models only")
    config.num_hidden_layers = len(keep)
    if getattr(config, "layer_types", None):
        config.layer_types = [config.layer_types[i] for i in keep]
    student = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = student.load_state_dict(state, strict=False)
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    if set(missing) - tied or unexpected:
        raise InputError(f"{src}: kept layers do not fit the shallow config (missing {sorted(set(missing) - tied)}, unexpected {sorted(unexpected)})")
    student.tie_weights()

    if out.exists():
        shutil.rmtree(out)  # a partial earlier attempt: start clean
    out.mkdir(parents=True)
    student.save_pretrained(out, safe_serialization=True)
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, out / name)
    tmp = out / (_MARKER + ".tmp")
    tmp.write_text(json.dumps(record, indent=2))
    tmp.replace(marker)
    return out
