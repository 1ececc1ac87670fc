# The README's two commands: `make demo` (the main job on the built-in data) and `make test`.
# Both create .venv when missing and install into it; a second run installs nothing.  uv
# resolves the same versions as pip (constraints.txt) and downloads them in parallel: torch's
# CUDA wheels, several GB, took 30 s against 5.5 minutes with pip on a 2-core machine.  Where
# uv cannot install (no PyPI, only pip's configured indexes), pip does.  uv compiles the
# bytecode at install, as pip does: without it, where PYTHONDONTWRITEBYTECODE is set, every
# process (each test's command, each DDP rank) compiled torch's sources again on import.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
PIP_QUIET := --quiet --disable-pip-version-check

.PHONY: install renderer browser demo serve test test-kernels reproduce notebooks data-icons \
	gpu-check clean

# The stamp depends on this file too: a change to the install recipe reaches existing venvs.
$(STAMP): pyproject.toml constraints.txt Makefile
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install $(PIP_QUIET) -c constraints.txt uv
	$(VENV)/bin/uv pip install --quiet --compile-bytecode --python $(PY) -c constraints.txt \
		-e ".[dev]" || \
		$(PY) -m pip install $(PIP_QUIET) -c constraints.txt -e ".[dev]"
	@touch $(STAMP)

install: $(STAMP)

# librsvg's rsvg-convert draws the icon sets' SVG files (the icons dataset and its tests):
# installed from Debian's packages when missing, through sudo unless root.
SUDO := $(if $(filter 0,$(shell id -u)),,sudo)
APT_RSVG := $(SUDO) apt-get install -y -qq --no-install-recommends librsvg2-bin
renderer:
	@command -v rsvg-convert >/dev/null || $(APT_RSVG) || \
		($(SUDO) apt-get update -qq && $(APT_RSVG))

# Headless Chromium and its driver, for the search page's browser test (Debian's packages).
APT_BROWSER := $(SUDO) apt-get install -y -qq --no-install-recommends chromium chromium-driver
browser:
	@(command -v chromium && command -v chromedriver) >/dev/null || $(APT_BROWSER) || \
		($(SUDO) apt-get update -qq && $(APT_BROWSER))

# CONFIG=scratch-cpu: the same job with the image encoder trained from random weights, into
# its own run and reports folders.
CONFIG ?= tiny-cpu
DEMO_SUFFIX := $(if $(filter-out tiny-cpu,$(CONFIG)),-$(CONFIG))
# The demo's data: SynthShop small with 30% scene docs (mixer_lite/demo.py says why).
DEMO_DATA := data/synth-small-scenes30
demo: $(STAMP)
	$(PY) -m mixer_lite.cli demo --config $(CONFIG) --data $(DEMO_DATA) --scene-share 0.3 \
		--reports reports$(DEMO_SUFFIX) --run runs/demo$(DEMO_SUFFIX)

# The search service and page over the demo's run (after make demo): http://127.0.0.1:8000/
serve: $(STAMP)
	$(PY) -m mixer_lite.cli serve --run runs/demo$(DEMO_SUFFIX) --data $(DEMO_DATA)

# The suite on TEST_WORKERS processes (pytest-xdist), the CPU's own kernels at 1 torch thread a
# test; the notebooks one after another (they share the cached runs in runs/experiments/: two
# notebooks on 2 cores at once took longer, and so did the notebooks beside the suite) with
# AVX2 kernels at 2 threads, so their claims are checked under the other kernel kind and thread
# count than the suite's (the committed outputs come from the CPU's own kernels); then the
# numerics-sensitive tests again under the other kernels and threads (test-kernels).
TEST_WORKERS ?= 2
AVX2 := ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2
# On a CPU whose own kernels are AVX2 the suite runs under them already, so it measures the
# committed record too (beside the other tests), and test-kernels is left out.
test: $(STAMP) renderer browser
	$(PY) -m pytest -q -n $(TEST_WORKERS) $(if $(NATIVE_AVX2),,--deselect $(RECORD_TEST))
	MIXER_LITE_FAST=1 $(AVX2) $(PY) -m pytest -q --nbval-lax --nbval-current-env notebooks/
	$(if $(NATIVE_AVX2),,$(MAKE) --no-print-directory test-kernels)

# The tests whose numbers depend on the CPU's kernels and the thread count (learning, the
# committed record re-measured, rankings compared across libraries; the losses' tests compare
# with references to tolerances no kernel reaches, and run once) again, with AVX2 kernels
# (most laptops') and 2 torch threads, one test at a time (two workers of 2 threads each on 2
# cores took twice as long).  The committed record (about 2 minutes) is measured again only
# here: it runs at the record's own thread count in both passes, so they would differ only in
# the kernels, and AVX2's are the harder check of a record made with AVX-512's.  The notebooks
# ran under AVX2 above.
RECORD_TEST := tests/test_reproduce.py::test_a_committed_record_is_what_the_code_measures_again
NUMERICS_TESTS := tests/test_learning.py tests/test_retrieval.py $(RECORD_TEST)
NATIVE_AVX2 = $(filter AVX2,$(shell $(PY) -c \
	"import torch; print(torch.backends.cpu.get_cpu_capability())"))
test-kernels: $(STAMP)
	$(AVX2) MIXER_LITE_TEST_THREADS=2 $(PY) -m pytest -q -p no:xdist $(NUMERICS_TESTS)

# The icons dataset (real drawings by 18 icon sets' designers, mixer_lite/icons.py): installs
# the sets by package name (npm into data/.icon-packages, Debian's themes and librsvg with
# apt-get, through sudo unless root), then writes data/icons. `make reproduce PRESET=icons`
# does the same when data/icons is missing.
data-icons: $(STAMP)
	$(PY) -m mixer_lite.icon_sources
	test -e data/icons/docs.jsonl || $(PY) -m mixer_lite.cli make-data --source icons \
		--out data/icons --workers 2

# The README's reproduction table on SynthShop small, built from the records in
# results/reproduce/ (a missing one is trained and written, so an interrupted table resumes).
# PRESET=tiny for a quick version, PRESET=icons for the icons dataset (after make data-icons);
# SEEDS=0,1,2 for three seeds; ROWS=mixer,infonce for some rows (default: all); RETRAIN=1 to
# measure every run again instead of reading the records.
PRESET ?= small
SEEDS ?= 0
ROWS ?=
reproduce: $(STAMP)
	$(PY) -m mixer_lite.reproduce --preset $(PRESET) --seeds $(SEEDS) \
		$(if $(ROWS),--rows $(ROWS)) --out reports/reproduce-$(PRESET).json \
		$(if $(RETRAIN),--retrain)

# The committed notebooks: every notebook executed in full mode on SynthShop small, written to
# its .ipynb (prints the runs it will train and an estimate of their time first; runs are
# cached in runs/experiments/, so a second call only re-executes).  ONLY=02,05 for some.
ONLY ?=
notebooks: $(STAMP)
	$(PY) -m mixer_lite.notebooks $(if $(ONLY),--only $(ONLY))

# On a GPU machine: every command's smoke run, throughput per precision and switch, and the
# classifier at 1e6-1e7 classes, in at most 10 minutes (bench/gpu_check.py).
gpu-check: $(STAMP)
	$(PY) bench/gpu_check.py

clean:
	rm -rf reports reports-* runs data/synth-* data/icons
