#!/usr/bin/env bash
# Regenerate the committed CI baseline: the smoke profile's run on this CPU.
# CI compares a fresh smoke run's deterministic figures (tokens at fixed seeds,
# acceptance counts, output perplexity) against it; re-run this script, review
# the diff and commit when a change of decoding behaviour is intended.
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf reports/baselines/smoke
.venv/bin/harness profile profiles/smoke.yaml -o reports/baselines/smoke --no-progress
