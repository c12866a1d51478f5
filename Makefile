# torch must be installed first and pinned exactly: a looser pin, or installing it after
# the rest, lets pip resolve a CUDA build of several gigabytes.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
TORCH_VERSION ?= 2.13.0
# A folder of local wheels (a CPU torch wheel, say) that pip should look in first, if any.
WHEELS ?= $(wildcard /opt/wheels)
FIND_LINKS := $(if $(WHEELS),--find-links $(WHEELS))
STAMP := $(VENV)/.installed

.PHONY: install demo test notebooks bench lint clean

install: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet $(FIND_LINKS) torch==$(TORCH_VERSION)
	$(PIP) install --quiet $(FIND_LINKS) -e ".[dev]"
	touch $(STAMP)

demo: install
	$(PY) -m st_peft.demo

test: install
	$(PY) -m ruff check .
	$(PY) -m pytest -q -p no:cacheprovider tests --nbmake notebooks

# Re-run every notebook top to bottom in notebooks/ and save it with its outputs (plots included), as
# committed; nbclient (from nbmake) without per-cell timestamps, so a re-run changes only what changed.
notebooks: install
	$(PY) -c 'import sys, nbclient, nbformat; [nbformat.write(nbclient.execute(nbformat.read(p, 4), cwd="notebooks", timeout=600, record_timing=False), p) for p in sys.argv[1:]]' notebooks/*.ipynb

bench: install
	$(PIP) install --quiet $(FIND_LINKS) -e ".[dev,bench]"
	$(PY) benchmarks/backbones.py
	$(PY) benchmarks/pipeline.py
	$(PY) benchmarks/st_lora.py
	$(PY) benchmarks/factost.py
	$(PY) benchmarks/st_link.py
	$(PY) benchmarks/cli_startup.py

lint: install
	$(PY) -m ruff check .

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
