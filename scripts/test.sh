#!/usr/bin/env bash
# The README's test command: install refit-gym with its test extras, then run the test suite.
# torch==2.13.0 is named first so pip takes the CPU build on disk instead of a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install --quiet "torch==2.13.0" -e ".[dev]"
python -m pytest -q "$@"
