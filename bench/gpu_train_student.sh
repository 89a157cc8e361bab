#!/usr/bin/env bash
# Proxy-KD trainer (loss fused with the output layer) vs its α = 0 path, the unfused loss, plain
# HF-Trainer SFT and online white-box KD (dense and chunked), one GPU, bf16: 151,936-token
# vocabulary (Qwen-sized), seq 2048, batch 2, LoRA r = 16 on a random-init Llama (hidden 1024,
# 8 layers: ~0.44 B parameters; the online proxy: hidden 2048, 16 layers, ~1.7 B).
# Peak memory is torch.cuda.max_memory_allocated per variant, each in its own process.
# Targets (issue 14, printed PASS/MISS): proxy-kd peak memory ≤ 0.6 × hf-sft, throughput
# ≥ 1.0 × hf-sft, ≤ 10% time / 5% memory over kd-alpha0, ≥ 1.5 × online-kd-chunked.
# About 4-5 minutes on an H100 (model build ~1 min, seven short runs).
#
# The GPU image has torch, transformers, peft, accelerate, pyarrow, fsspec but not TRL (trl-sft is
# skipped) nor pydantic (pkd.records needs it): carry its wheels, made here beforehand with
#   .venv/bin/python -m pip download pydantic pydantic-core annotated-types typing-inspection \
#       --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 -d bench/results/wheels
# and run from the repository root with bench/results/wheels carried:  bash bench/gpu_train_student.sh
set -euo pipefail
python3 -c "import pydantic" 2>/dev/null || python3 -m pip install -q --no-index --find-links bench/results/wheels pydantic
export PYTHONPATH="$PWD" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 bench/train_student.py --device cuda --vocab 151936 --seq 2048 --batch 2 --hidden 1024 --layers 8 \
    --rows 16 --steps 10 --warmup 3 --variants proxy-kd,kd-alpha0,proxy-kd-unfused,hf-sft,online-kd,online-kd-chunked \
    --out "${OUT:-bench/results}/gpu_train_student.json"
