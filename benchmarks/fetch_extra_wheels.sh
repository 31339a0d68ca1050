#!/usr/bin/env bash
# Wheels an offline GPU machine lacks beyond the benchmark stack (bitsandbytes, trl, datasets; the
# Unsloth set in .whl/peer/: benchmarks/README.md), into .whl/ (copied to the GPU machine with the
# checkout, installed there by benchmarks/gpu_suite.sh with --no-deps):
#   - pydantic (nbtune's config), for the Python 3.12 of the GPU image;
#   - IPython and plotly, for the notebook-door GPU tests (tests/distributed/test_ddp_gpu.py:
#     %finetune --gpus 2 in a real IPython shell, the notebook launcher with the dashboard).
# Versions are those of requirements/ci.txt's tested stack. packaging / typing_extensions come with
# the image and are not fetched (an older copy on PYTHONPATH would shadow torch's).
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
pip download -q --only-binary=:all: --python-version 3.12 \
  --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform any -d .whl \
  "pydantic==2.14.4" "pydantic_core==2.50.5" "ipython==9.18.1" "plotly==7.1.0"
rm -f .whl/packaging-*.whl .whl/typing_extensions-*.whl
ls .whl
