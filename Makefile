# One entry point. `make demo` and `make test` set up .venv from the project's own files
# (constraints.txt pins every version) the first time, then reuse it.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-$(shell cat constraints.txt pyproject.toml | cksum | cut -d' ' -f1)

.PHONY: setup demo shakespeare test test-slow test-all bench clean

setup: $(STAMP)

$(STAMP): constraints.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade -c constraints.txt setuptools
	$(PY) -m pip install --quiet --no-build-isolation -c constraints.txt -e ".[test,plot,serve]"
	rm -f $(VENV)/.installed-*
	touch $@

# The main job: prepare the default corpus, train the default model on the CPU, sample.
demo: setup
	$(PY) data/prepare.py
	$(PY) train.py --config configs/default.toml --overwrite
	$(PY) sample.py out/default/best.pt --num-samples 3 --max-new-tokens 300 --seed 1

# The CPU recipe: char-level tinyshakespeare, 90 s of training (needs ../shared/data or SHAKESPEARE=path).
SHAKESPEARE ?= ../shared/data/tinyshakespeare.txt
shakespeare: setup
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

bench: setup
	$(PY) bench/train_speed.py
	$(PY) bench/sample_speed.py
	$(PY) bench/compare_speed.py
	$(PY) bench/prepare_memory.py

clean:
	rm -rf out data/pydoc .pytest_cache
