#!/usr/bin/env bash
# Reproduces the Gemma 3 270M section of docs/results.md: needle-in-a-haystack on the base model
# (completion-style prompt: `--completion`) at 2K, 4K and 8K tokens, full KV vs SnapKV vs FastKV.
#
#   bash docs/results/gemma3.sh [run|compare|all]   (default: all)
#
# Gemma 3 270M has 18 layers: 15 sliding-window (512 tokens) and 3 full-attention (5, 11, 17). Cache
# policies compress the full-attention layers; sliding layers keep their 511 newest entries whatever
# the budget (kvpolicy warns when a budget is below the window). FastKV's TSP layer must see the whole
# prompt to choose tokens well, so it sits at a full-attention layer: 11 (and 5, to show the cost of
# selecting early). Runs are keyed by their configuration: rerunning resumes. About 30 minutes on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/../.."
KV=${KV:-.venv/bin/kvpolicy}
OUT=${OUT:-results/eval-gemma3}
LENGTHS=${LENGTHS:-"2000 4000 8000"}
DEPTHS=${DEPTHS:-5}
COMMON="needle --model gemma3-270m --completion --lengths $LENGTHS --depths $DEPTHS --max-new-tokens 24 --out $OUT --quiet"

run() {
  $KV eval $COMMON --policy fullkv
  $KV eval $COMMON --policy snapkv --kv-budget 256
  $KV eval $COMMON --policy fastkv --kv-budget 256 --tsp-layer 11 --tsp-rate 0.2
  $KV eval $COMMON --policy fastkv --kv-budget 256 --tsp-layer 5 --tsp-rate 0.2
  # a third of the prompt, as SmolLM2 needs (docs/results.md)
  $KV eval $COMMON --policy snapkv --kv-budget 0.33
  $KV eval $COMMON --policy fastkv --kv-budget 0.33 --tsp-layer 11 --tsp-rate 0.33
}

compare() {
  $KV eval compare "$OUT"/needle/* --out docs/results/gemma3
}

case ${1:-all} in
  run) run ;;
  compare) compare ;;
  all) run && compare ;;
  *) echo "usage: $0 [run|compare|all]" >&2; exit 2 ;;
esac
