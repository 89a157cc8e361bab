#!/usr/bin/env bash
# Transformers-engine scoring (pkd cache-logits --engine hf) vs a plain forward on one GPU, bf16:
# a ~1.0 B random-init Llama (hidden 2048, 16 layers) with a 151,936-token vocabulary, 64
# sequences of 1024 tokens, 8 per batch; tokens/s and peak memory (torch.cuda.max_memory_allocated
# over the weights) of each. vLLM is not installed on the GPU image, so only the HF engine runs.
# About 1-2 minutes on an H100 (model build and save ~30 s, two short passes).
#
# The GPU image has torch, transformers, tokenizers, numpy and rich, which is all this needs
# (pkd.engines and pkd.models.tiny import no pydantic). Run from the repository root:
#   bash bench/gpu_cache_logits.sh            (GPU, realistic size)
#   bash bench/gpu_cache_logits.sh --tiny     (CPU, toy size: checks that it runs)
set -euo pipefail
export PYTHONPATH="$PWD" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
PY=python3
[ -x .venv/bin/python ] && ! command -v nvidia-smi >/dev/null && PY=.venv/bin/python
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
"$PY" bench/gpu_cache_logits.py "$@" --out "${OUT:-bench/results}/gpu_cache_logits.json"
