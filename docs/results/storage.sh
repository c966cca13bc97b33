#!/usr/bin/env bash
# Reproduces the "Quantized KV storage" section of docs/results.md: full KV at every storage width, and
# SnapKV, AdaKV and FastKV at budgets and widths that take equal bytes (an eighth of the entries at 16
# bits beside a quarter at int8 and half at int4), on the embedded SmolLM2-135M-Instruct (needle at 1K
# and 2K, RULER's niah_single_1 and niah_multikey_1 at 1K) and on Gemma 3 270M (needle at 2K and 4K,
# completion-style: it is a base model).
#
#   bash docs/results/storage.sh [run|kivi|compare|all]   (default: all; kivi: KIVI's layout only)
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

# one run: BENCH LABEL POLICY BUDGET BITS (budget "-": the preset's full KV); labels are the tables' rows
one() {
  local bench=$1 label=$2 policy=$3 budget=$4 bits=$5
  case $bits in 4|2) bits=int$bits ;; esac  # the tables' 4 and 2 rows are per token (alone, 4 and 2 mean KIVI's layout)
  local args=(--policy "$policy" --label "$label" --kv-bits "$bits")
  [[ $budget != - ]] && args+=(--kv-budget "$budget")
  $KV eval $bench "${args[@]}"
}

run() {
  for bits in 16 8 fp8 4 2; do one "$NEEDLE" "full-$bits" fullkv - "$bits"; done
  for spec in "0.125 16" "0.25 16" "0.25 8" "0.5 8" "0.25 4" "0.5 4" "0.5 2"; do
    read -r budget bits <<<"$spec"
    one "$NEEDLE" "snapkv-$budget-$bits" snapkv "$budget" "$bits"
  done
  one "$NEEDLE" ada-0.125-16 ada-snapkv 0.125 16
  one "$NEEDLE" ada-0.5-4 ada-snapkv 0.5 4
  one "$NEEDLE" fastkv-0.125-16 fastkv 0.125 16
  one "$NEEDLE" fastkv-0.5-4 fastkv 0.5 4
  for bits in 16 8 fp8 4 2; do one "$RULER" "full-$bits" fullkv - "$bits"; done
  for spec in "0.125 16" "0.25 16" "0.25 8" "0.25 4" "0.5 4"; do
    read -r budget bits <<<"$spec"
    one "$RULER" "snapkv-$budget-$bits" snapkv "$budget" "$bits"
  done
  for bits in 16 8 fp8 4 2; do one "$GEMMA" "full-$bits" fullkv - "$bits"; done
  one "$GEMMA" snapkv-0.125-16 snapkv 0.125 16
  one "$GEMMA" snapkv-0.5-8 snapkv 0.5 8
  one "$GEMMA" snapkv-0.5-4 snapkv 0.5 4
}

# KIVI's layout (kivi4, kivi2) on the same prompts, in folders of their own; the group-size and residual
# variants are not kv_bits names, so they run through the Python API
KIVI_NEEDLE="needle --lengths 1024 2048 --depths 5 --out $OUT/smollm2-kivi --quiet"
KIVI_RULER="ruler --lengths 1024 --tasks niah_single_1 niah_multikey_1 --samples 5 --out $OUT/smollm2-kivi --quiet"
KIVI_GEMMA="needle --model gemma3-270m --completion --lengths 2000 4000 --depths 5 --out $OUT/gemma3-kivi --quiet"
kivi() {
  one "$KIVI_NEEDLE" full-kivi4 fullkv - kivi4
  one "$KIVI_NEEDLE" full-kivi2 fullkv - kivi2
  one "$KIVI_NEEDLE" snapkv-0.5-kivi4 snapkv 0.5 kivi4
  one "$KIVI_NEEDLE" snapkv-0.5-kivi2 snapkv 0.5 kivi2
  one "$KIVI_NEEDLE" snapkv-0.25-kivi4 snapkv 0.25 kivi4
  one "$KIVI_NEEDLE" ada-0.5-kivi4 ada-snapkv 0.5 kivi4
  one "$KIVI_NEEDLE" fastkv-0.5-kivi4 fastkv 0.5 kivi4
  one "$KIVI_RULER" full-kivi4 fullkv - kivi4
  one "$KIVI_RULER" full-kivi2 fullkv - kivi2
  one "$KIVI_RULER" snapkv-0.5-kivi4 snapkv 0.5 kivi4
  ${PYTHON:-.venv/bin/python} - "$OUT/smollm2-kivi" <<'EOF'
import sys

import kvpolicy
from kvpolicy.eval.runner import run_eval

for label, settings in (("full-kivi2-r128", {"residual": 128}), ("full-kivi2-g16", {"group_size": 16})):
    storage = kvpolicy.KVStorage(bits=2, layout="kivi", **settings)
    policy = kvpolicy.get_policy("fullkv").with_storage(storage)
    run_eval("needle", policy=policy, label=label, out=sys.argv[1], lengths=[1024, 2048], depths=5, quiet=True)
EOF
  one "$KIVI_GEMMA" full-kivi4 fullkv - kivi4
  one "$KIVI_GEMMA" full-kivi2 fullkv - kivi2
  one "$KIVI_GEMMA" snapkv-0.5-kivi4 snapkv 0.5 kivi4
}

compare() {
  $KV eval compare "$OUT"/smollm2/needle/* --out docs/results/storage/smollm2-needle
  $KV eval compare "$OUT"/smollm2/ruler/* --out docs/results/storage/smollm2-ruler
  $KV eval compare "$OUT"/gemma3/needle/* --out docs/results/storage/gemma3-needle
  $KV eval compare "$OUT"/smollm2-kivi/needle/* --out docs/results/storage/smollm2-kivi-needle
  $KV eval compare "$OUT"/smollm2-kivi/ruler/* --out docs/results/storage/smollm2-kivi-ruler
  $KV eval compare "$OUT"/gemma3-kivi/needle/* --out docs/results/storage/gemma3-kivi-needle
}

case ${1:-all} in
  run) run && kivi ;;
  kivi) kivi ;;
  compare) compare ;;
  all) run && kivi && compare ;;
  *) echo "usage: $0 [run|kivi|compare|all]" >&2; exit 2 ;;
esac
