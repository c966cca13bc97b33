#!/usr/bin/env bash
# Reproduces the "Quantized KV storage" section of docs/results.md: full KV at every storage width, and
# SnapKV, AdaKV and FastKV at budgets and widths that take equal bytes (an eighth of the entries at 16
# bits beside a quarter at int8 and half at int4), on the embedded SmolLM2-135M-Instruct (needle at 1K
# and 2K, RULER's niah_single_1 and niah_multikey_1 at 1K) and on Gemma 3 270M (needle at 2K and 4K,
# completion-style: it is a base model).
#
#   bash docs/results/storage.sh [run|compare|all]   (default: all)
#
# Runs are keyed by their configuration (the storage width included): rerunning resumes. About 70
# minutes on one CPU thread.
set -euo pipefail
cd "$(dirname "$0")/../.."
KV=${KV:-.venv/bin/kvpolicy}
OUT=${OUT:-results/eval-storage}
NEEDLE="needle --lengths 1024 2048 --depths 5 --out $OUT/smollm2 --quiet"
RULER="ruler --lengths 1024 --tasks niah_single_1 niah_multikey_1 --samples 5 --out $OUT/smollm2 --quiet"
GEMMA="needle --model gemma3-270m --completion --lengths 2000 4000 --depths 5 --out $OUT/gemma3 --quiet"

run() {
  for bits in 16 8 fp8 4 2; do $KV eval $NEEDLE --policy fullkv --kv-bits $bits; done
  for spec in "0.125 16" "0.25 16" "0.5 16" "0.25 8" "0.5 8" "0.25 4" "0.5 4" "0.5 2"; do
    read -r budget bits <<<"$spec"
    $KV eval $NEEDLE --policy snapkv --kv-budget "$budget" --kv-bits "$bits"
  done
  for policy in ada-snapkv fastkv; do
    $KV eval $NEEDLE --policy $policy --kv-budget 0.125
    $KV eval $NEEDLE --policy $policy --kv-budget 0.5 --kv-bits 4
  done
  for bits in 16 8 4 2; do $KV eval $RULER --policy fullkv --kv-bits $bits; done
  $KV eval $RULER --policy snapkv --kv-budget 0.125
  $KV eval $RULER --policy snapkv --kv-budget 0.25 --kv-bits 8
  $KV eval $RULER --policy snapkv --kv-budget 0.5 --kv-bits 4
  for bits in 16 8 4 2; do $KV eval $GEMMA --policy fullkv --kv-bits $bits; done
  $KV eval $GEMMA --policy snapkv --kv-budget 0.125
  $KV eval $GEMMA --policy snapkv --kv-budget 0.5 --kv-bits 4
}

compare() {
  $KV eval compare "$OUT"/smollm2/needle/* --out docs/results/storage/smollm2-needle
  $KV eval compare "$OUT"/smollm2/ruler/* --out docs/results/storage/smollm2-ruler
  $KV eval compare "$OUT"/gemma3/needle/* --out docs/results/storage/gemma3-needle
}

case ${1:-all} in
  run) run ;;
  compare) compare ;;
  all) run && compare ;;
  *) echo "usage: $0 [run|compare|all]" >&2; exit 2 ;;
esac
