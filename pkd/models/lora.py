"""What a LoRA adapter must look like for vLLM to serve it (proxy-align samples and cache-logits
scores the aligned proxy with a `LoRARequest`): checked by the recipe before any training, so
that no GPU hour makes an unusable adapter, and by the vLLM engine before it loads one.

vLLM (0.32, `vllm/lora/peft_helper.py`) rejects `modules_to_save` (a trained embedding or
lm_head), DoRA, LoRA biases and weight-modifying inits, and its `max_lora_rank` takes only the
values in `VLLM_LORA_RANKS`. No torch import here: pkd.config validates recipes with it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
UNSERVABLE_TARGETS = ("embed_tokens", "lm_head")  # would need modules_to_save-style full copies


def target_modules(spec: str) -> str | list[str]:
    """peft `target_modules` from the config string: "all-linear" (every linear layer but the
    lm_head) or comma-separated module names."""
    spec = spec.strip()
    return spec if spec == "all-linear" else [m.strip() for m in spec.split(",") if m.strip()]


def check_rank(rank: int) -> int:
    if rank not in VLLM_LORA_RANKS:
        raise ValueError(f"LoRA rank {rank} cannot be served by vLLM, whose max_lora_rank takes only {', '.join(map(str, VLLM_LORA_RANKS))}; pick one of those")
    return rank


def check_targets(spec: str) -> str:
    names = target_modules(spec)
    if not names:
        raise ValueError("no LoRA target modules: give 'all-linear' or comma-separated module names such as 'q_proj,v_proj'")
    bad = [n for n in names if n in UNSERVABLE_TARGETS] if isinstance(names, list) else []
    if bad:
        raise ValueError(f"LoRA on {', '.join(bad)} cannot be served by vLLM (it would need trained embedding/lm_head copies); target the linear layers, e.g. 'all-linear'")
    return spec


def vllm_problems(adapter_config: dict[str, Any]) -> list[str]:
    """Why vLLM would refuse a peft adapter config (empty if it would serve it)."""
    c = adapter_config
    problems = []
    if c.get("peft_type", "LORA") != "LORA":
        problems.append(f"peft_type is {c.get('peft_type')!r}, vLLM serves only LORA adapters")
    if c.get("modules_to_save"):
        problems.append(f"modules_to_save={c['modules_to_save']} (fully trained copies of those modules)")
    if c.get("use_dora"):
        problems.append("DoRA (use_dora=true)")
    if c.get("bias", "none") != "none" or c.get("lora_bias"):
        problems.append("trained biases (bias/lora_bias)")
    init = c.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower() not in ("gaussian", "eva", "orthogonal", "mica", "lora_ga"):
        problems.append(f"init_lora_weights={init!r} (changes the base weights)")
    ranks = [c.get("r", 0), *(c.get("rank_pattern") or {}).values()]
    if max(ranks) > max(VLLM_LORA_RANKS):
        problems.append(f"rank {max(ranks)} > {max(VLLM_LORA_RANKS)}")
    targets = c.get("target_modules") or []
    bad = sorted(t for t in ([targets] if isinstance(targets, str) else targets) if t in UNSERVABLE_TARGETS)
    if bad:
        problems.append(f"LoRA on {', '.join(bad)} (vLLM leaves an lm_head LoRA out of prompt logprobs, vllm#51594)")
    return problems


def new_adapter(model: Any, lora: Any, seed: int) -> Any:
    """`model` wrapped in a fresh PEFT adapter (`lora`: a peft LoraConfig) whose A matrices are
    drawn under `seed`. Trainer seeds only once the model exists, so without this one seed gave a
    different adapter, and so a different proxy or student, on every run."""
    from peft import get_peft_model
    from transformers import set_seed

    set_seed(seed)
    return get_peft_model(model, lora)


def sort_adapter_targets(folder: str | Path) -> None:
    """Rewrite a saved adapter's `target_modules` sorted. PEFT holds them as a set once the
    adapter is built and writes them in the process's string-hash order, so two byte-identical
    adapters had different adapter_config.json files, and so different fingerprints in every
    cache and report downstream."""
    path = Path(folder) / "adapter_config.json"
    if not path.is_file():
        return  # a full model, not an adapter
    config = json.loads(path.read_text())
    if isinstance(config.get("target_modules"), list):
        config["target_modules"] = sorted(config["target_modules"])
        path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
