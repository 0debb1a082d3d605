# One entry point. `make demo` and `make test` set up .venv from the project's own files
# (constraints.txt pins every version) the first time, then reuse it.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-$(shell cat constraints.txt pyproject.toml | cksum | cut -d' ' -f1)

.PHONY: setup venv-hf demo shakespeare test test-slow test-all bench clean

setup: $(STAMP)

$(STAMP): constraints.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade -c constraints.txt setuptools
	$(PY) -m pip install --quiet --no-build-isolation -c constraints.txt -e ".[test,plot,serve]"
	rm -f $(VENV)/.installed-*
	touch $@

# A second venv, .venv-hf, with torch and transformers at constraints.txt's pins: the
# Hugging Face side of bench/sample_speed.py and bench/gpt2_speed.py and of their tests.
# transformers is never installed in .venv. $HF_PYTHON, when set, names another such Python.
HF_VENV := .venv-hf

venv-hf: $(HF_VENV)/.installed

$(HF_VENV)/.installed: constraints.txt
	$(PYTHON) -m venv $(HF_VENV)
	$(HF_VENV)/bin/python -m pip install --quiet -c constraints.txt torch transformers
	touch $@

# The main job: prepare the default corpus, train the default model on the CPU, sample.
demo: setup
	$(PY) data/prepare.py
	$(PY) train.py --config configs/default.toml --overwrite
	$(PY) sample.py out/default/best.pt --num-samples 3 --max-new-tokens 300 --seed 1

# The CPU recipe: char-level tinyshakespeare, 90 s of training. The text is downloaded from
# its public source (checked against its SHA-256) when the network is there; otherwise
# pass a local copy: make shakespeare SHAKESPEARE=path/to/tinyshakespeare.txt
SHAKESPEARE_URL    := https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt
SHAKESPEARE_SHA256 := 86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed
SHAKESPEARE ?= data/tinyshakespeare.txt

data/tinyshakespeare.txt:
	$(PYTHON) data/download.py $(SHAKESPEARE_URL) $(SHAKESPEARE_SHA256) $@

shakespeare: setup $(SHAKESPEARE)
	$(PY) data/prepare.py $(SHAKESPEARE) --tokenizer char --out data/shakespeare_char
	$(PY) train.py --config configs/shakespeare_char.toml --overwrite
	$(PY) train.py --plot out/shakespeare_char
	$(PY) sample.py out/shakespeare_char/best.pt --prompt "ROMEO:" --max-new-tokens 300

test: setup
	$(PY) -m pytest

test-slow: setup
	$(PY) -m pytest -m slow

test-all: setup
	$(PY) -m pytest -m "slow or not slow"

# compare_speed.py times the comparison on the demo's checkpoint: the demo runs first
# when out/default/best.pt is not there yet. After setup (order-only), so that under
# make -j the sub-make's demo does not build .venv a second time beside this one.
out/default/best.pt: | setup
	$(MAKE) demo

bench: setup out/default/best.pt
	$(PY) bench/train_speed.py
	$(PY) bench/sample_speed.py
	$(PY) bench/compare_speed.py
	$(PY) bench/prepare_memory.py

clean:
	rm -rf out data/pydoc .pytest_cache
