# The commands of the README, with everything they need set up on a fresh machine:
#   make demo         fine-tune the embedded model on GSM8K with a live view (GPU if there is one, else CPU)
#   make test         the quick tier: every test not marked `slow` (unit tests, the Triton kernels under
#                     the interpreter, one real short training run); GPU tests are skipped without CUDA
#   make test-all     every test: the quick tier (on every core) plus the `slow` ones (notebooks, the browser tests with
#                     Debian's chromium, installed here with apt when missing and run as root, the
#                     data-parallel launches, the demo)
#   make test-matrix  the quick tier on the newest releases and on the oldest supported versions
#                     (requirements/newest.txt, requirements/oldest.txt; .ci/stack, environments cached
#                     outside the clone)
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.nbtune-setup
PYTEST_ARGS ?=

.PHONY: setup browser demo test test-all test-matrix gpu-suite clean

$(STAMP): pyproject.toml requirements/ci.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -c requirements/ci.txt torch
	$(PY) -m pip install -q --disable-pip-version-check -c requirements/ci.txt -e ".[test]"
	touch $(STAMP)

setup: $(STAMP)

# tests/browser runs JupyterLab in headless Chromium through Playwright, which cannot download its
# own browser builds here: it launches Debian's chromium. Without root (or apt) nothing is
# installed; the browser tests then skip with the install command, and fail under CI=true.
browser:
	@if command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 \
	    || [ -n "$$NBTUNE_CHROMIUM" ]; then exit 0; fi; \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  echo "make: installing chromium (apt-get) for tests/browser"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
	    chromium >/dev/null && chromium --version 2>/dev/null \
	  || echo "make: apt-get could not install chromium: tests/browser will not run" >&2; \
	else \
	  echo "make: no chromium; tests/browser need it: sudo apt-get install chromium" >&2; \
	fi

demo: setup
	$(VENV)/bin/nbtune demo

# the quick tier; .ci/stack runs the same selection on the other stacks
QUICK := not gpu and not slow

# -n auto (pytest-xdist): one worker per core, torch's threads shared out between them (tests/conftest.py)
XDIST ?= -n auto

test: setup
	@$(PY) -m pytest -m "$(QUICK)" $(XDIST) $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests" >&2; exit 1; fi; exit $$rc

# the slow tests (each one long run: notebooks, the demo, learning curves, launches) file by file on
# every core: much of each is single-threaded (imports, kernels starting, tokenizing), so two files
# at once finish sooner than one at a time with all the threads
SLOW_XDIST ?= -n auto --dist loadfile

# the quick tier on every core, then the slow tier
test-all: setup browser
	@$(PY) -m pytest -m "$(QUICK)" $(XDIST) $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test-all: pytest collected no quick tests" >&2; exit 1; fi; \
	$(PY) -m pytest -m "slow and not gpu" $(SLOW_XDIST) $(PYTEST_ARGS); rc2=$$?; \
	if [ $$rc2 -eq 5 ]; then echo "make test-all: pytest collected no slow tests" >&2; exit 1; fi; \
	[ $$rc -eq 0 ] && [ $$rc2 -eq 0 ]

test-matrix:
	@rc=0; for stack in newest oldest; do bash .ci/stack $$stack $(PYTEST_ARGS) || rc=1; done; exit $$rc

clean:
	rm -rf $(VENV) outputs build *.egg-info
