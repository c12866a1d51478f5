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

.PHONY: install demo test bench lint clean

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

bench: install
	$(PY) benchmarks/backbones.py
	$(PY) benchmarks/pipeline.py
	$(PY) benchmarks/st_lora.py
	$(PY) benchmarks/factost.py
	$(PY) benchmarks/st_link.py

lint: install
	$(PY) -m ruff check .

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
