# latentdiff — the two commands a newcomer runs:
#   make quickstart   set up .venv and run the whole pipeline on CPU
#   make test         set up .venv and run the test suite (what CI runs)
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: install test test-fast quickstart bench clean
# VAE=train (default): the small f4 autoencoder, trained once and cached in .cache/; VAE=none: pixel space;
# VAE=DIR|HUB_ID: a pretrained AutoencoderKL
VAE ?= train

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip wheel setuptools
	# torch is served from the local disk; torchvision 0.29.1 pairs with torch 2.14.1
	$(BIN)/python -m pip install -q torch torchvision==0.29.1
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q -rfEs --durations=15 $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow" $(PYTEST_ARGS)

quickstart: $(STAMP)
	$(BIN)/python tools/quickstart.py --vae $(VAE) --out quickstart

bench: $(STAMP)
	$(BIN)/python tools/bench/sampler_accuracy.py --out bench_out/sampler_accuracy

clean:
	rm -rf $(VENV) bench_out quickstart .cache/quickstart-autoencoder
