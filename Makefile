# The README's two commands: `make demo` (the main job on the built-in data) and `make test`.
# Both create .venv when missing and install into it; a second run installs nothing.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: install demo test bench clean

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e ".[dev]"
	@touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m mixer_lite.cli demo --data data/synth-small --reports reports --run runs/demo

test: $(STAMP)
	$(PY) -m pytest -q

clean:
	rm -rf reports runs data/synth-*
