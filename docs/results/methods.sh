#!/usr/bin/env bash
# Reproduces the "newer methods" section of docs/results.md (issue 14) on the embedded SmolLM2-135M:
# needle-in-a-haystack at 2K tokens (5 depths) and the RULER tasks the model solves at 2K (1 sample
# each), query-aware (the question in the prompt, last: FastKV's protocol) and query-agnostic (the
# context compressed before the question is seen, kvpress's protocol); every method at compression
# 25 / 50 / 75 % (kv budget 0.75 / 0.5 / 0.25 of the prompt), with
# FastKV's TSP (layer 23, calibrated; rate 0.2) in front of AdaKV and ExpectedAttention as extra rows,
# and DuoAttention with the streaming-head share that matches each budget.
#
#   bash docs/results/methods.sh [needle|ruler|agnostic|compare|all]   (default: all)
#
# Runs are keyed by their configuration: rerunning resumes. About 1.5 hours on 2 CPU cores.
set -euo pipefail
cd "$(dirname "$0")/../.."
KV=${KV:-.venv/bin/kvpolicy}
OUT=${OUT:-results/eval-methods}
BUDGETS=${BUDGETS:-"0.75 0.5 0.25"}
RULER_BUDGETS=${RULER_BUDGETS:-$BUDGETS}
# Query-agnostic needle and RULER at 50 % compression only: each row costs about a minute on 2 cores
# (set AGNOSTIC_BUDGETS="$BUDGETS" for the whole grid).
AGNOSTIC_BUDGETS=${AGNOSTIC_BUDGETS:-0.5}
RULER_TASKS=${RULER_TASKS:-"niah_single_1 niah_single_2 niah_multikey_1 niah_multivalue niah_multiquery"}

# DuoAttention at the same KV share: the streaming-head ratio that makes retrieval heads (whole prompt)
# plus streaming heads (64 sinks + 256 recent) keep about a `b` share of a 2048-token prompt, turned
# into a threshold on the head map `kvpolicy calibrate --duo-heads` measured for this model.
DUO_MAP=${DUO_MAP:-tests/data/duo_smollm2_head_map.json}
duo_threshold() {  # duo_threshold BUDGET_SHARE
  "$(dirname "$KV")/python" -c "
import sys
from kvpolicy.policies.duoattention import read_head_map, threshold_for_ratio
b, n, streaming_keep = float(sys.argv[1]), 2048, 64 + 256
print(threshold_for_ratio(read_head_map('$DUO_MAP'), min(1.0, (1 - b) * n / (n - streaming_keep))))" "$1"
}

configs() {  # configs BUDGETS: one line per run, "--policy preset options" or "--policy-config file --label name"
  echo "--policy fullkv"
  for b in $1; do
    for preset in snapkv ada-snapkv expected_attention tova cake streamingllm; do
      echo "--policy $preset --kv-budget $b"
    done
    echo "--policy duoattention --head-map-file $DUO_MAP --threshold $(duo_threshold "$b") --label duoattention-$b"
    echo "--policy fastkv --kv-budget $b --tsp-layer 23 --tsp-rate 0.2"
    for cache in ada-snapkv expected_attention ada-expected_attention; do
      echo "--policy-config docs/results/methods/tsp23+$cache-$b.json --label tsp23+$cache-$b"
    done
  done
}

run() {  # run BUDGETS OUT BENCHMARK ARGS...
  local budgets=$1 out=$2 bench=$3
  shift 3
  configs "$budgets" | while read -r options; do
    # shellcheck disable=SC2086
    $KV eval "$bench" $options "$@" --out "$out" --quiet < /dev/null
  done
}

needle() { run "$BUDGETS" "$OUT" needle --lengths 2048 --depths 5; }
# shellcheck disable=SC2086
ruler() { run "$RULER_BUDGETS" "$OUT" ruler --tasks $RULER_TASKS --lengths 2048 --samples 1; }
# Query-agnostic: the haystack is prefilled and compressed without the question, which comes after.
agnostic() {
  run "$AGNOSTIC_BUDGETS" "$OUT-agnostic" needle --query-agnostic --lengths 2048 --depths 5
  # shellcheck disable=SC2086
  run "$AGNOSTIC_BUDGETS" "$OUT-agnostic" ruler --query-agnostic --tasks $RULER_TASKS --lengths 2048 --samples 1
}
compare() {
  $KV eval compare "$OUT"/needle/* --out docs/results/methods/needle
  $KV eval compare "$OUT"/ruler/* --out docs/results/methods/ruler
  $KV eval compare "$OUT-agnostic"/needle/* --out docs/results/methods/agnostic
  $KV eval compare "$OUT-agnostic"/ruler/* --out docs/results/methods/agnostic-ruler
}

case ${1:-all} in
  needle | ruler | agnostic | compare) "$1" ;;
  all) needle && ruler && agnostic && compare ;;
  *) echo "usage: $0 [needle|ruler|agnostic|compare|all]" >&2 && exit 2 ;;
esac
