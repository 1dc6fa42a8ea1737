# The README's two commands. Each creates its own virtual environment on first use.
VENV ?= .venv
PYTHON := $(VENV)/bin/python

.PHONY: demo test clean

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PYTHON) -m pip install --quiet -e .
	touch $@

# torch==2.13.0 (CPU) installs from a local file that only pip sees; uv or poetry would fetch CUDA.
$(VENV)/.installed-test: pyproject.toml
	python3 -m venv $(VENV)
	$(PYTHON) -m pip install --quiet -e '.[test]'
	touch $@ $(VENV)/.installed

demo: $(VENV)/.installed
	$(VENV)/bin/qwen-jax train --config=configs/pretrain_tiny.py --workdir=runs/demo

# Two workers (the CI machine's cores); worksteal balances the files' very uneven lengths, and a
# file's tests stay on one worker (sharing its compiled fixtures) unless the other runs dry.
test: $(VENV)/.installed-test
	$(PYTHON) -m pytest -n 2 --dist worksteal

clean:
	rm -rf $(VENV)
