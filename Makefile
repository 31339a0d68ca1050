# The two commands of the README, with everything they need set up on a fresh machine:
#   make demo   fine-tune the embedded model on GSM8K with a live view (GPU if there is one, else CPU)
#   make test   the test suite (CPU; GPU tests are skipped without CUDA)
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.nbtune-setup
PYTEST_ARGS ?=

.PHONY: setup demo test gpu-suite clean

$(STAMP): pyproject.toml requirements/ci.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -c requirements/ci.txt torch
	$(PY) -m pip install -q --disable-pip-version-check -c requirements/ci.txt -e ".[test]"
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(VENV)/bin/nbtune demo

test: setup
	@$(PY) -m pytest -m "not gpu" $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests" >&2; exit 1; fi; exit $$rc

clean:
	rm -rf $(VENV) outputs build *.egg-info
