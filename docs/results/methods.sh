#!/usr/bin/env bash
# Reproduces the "newer methods" section of docs/results.md (issue 14) on the embedded SmolLM2-135M:
# needle-in-a-haystack at 2K tokens (5 depths) and the RULER tasks the model solves at 2K (1 sample
# each), every method at compression 25 / 50 / 75 % (kv budget 0.75 / 0.5 / 0.25 of the prompt), with
# FastKV's TSP (layer 23, calibrated; rate 0.2) in front of AdaKV and ExpectedAttention as extra rows.
#
#   bash docs/results/methods.sh [needle|ruler|compare|all]   (default: all)
#
# Query-aware protocol (question inside the prompt, last), FastKV's. Runs are keyed by their
# configuration: rerunning resumes. About 30 minutes on 2 CPU cores.
set -euo pipefail
cd "$(dirname "$0")/../.."
KV=${KV:-.venv/bin/kvpolicy}
OUT=${OUT:-results/eval-methods}
BUDGETS=${BUDGETS:-"0.75 0.5 0.25"}
RULER_TASKS=${RULER_TASKS:-"niah_single_1 niah_single_2 niah_multikey_1 niah_multivalue niah_multiquery"}

configs() {  # one line per run: "--policy preset options" or "--policy-config file --label name"
  echo "--policy fullkv"
  for b in $BUDGETS; do
    for preset in snapkv ada-snapkv expected_attention tova cake streamingllm; do
      echo "--policy $preset --kv-budget $b"
    done
    echo "--policy fastkv --kv-budget $b --tsp-layer 23 --tsp-rate 0.2"
    for cache in ada-snapkv expected_attention ada-expected_attention; do
      echo "--policy-config docs/results/methods/tsp23+$cache-$b.json --label tsp23+$cache-$b"
    done
  done
}

run() {  # run BENCHMARK ARGS...
  local bench=$1
  shift
  configs | while read -r options; do
    # shellcheck disable=SC2086
    $KV eval "$bench" $options "$@" --out "$OUT" --quiet < /dev/null
  done
}

needle() { run needle --lengths 2048 --depths 5; }
# shellcheck disable=SC2086
ruler() { run ruler --tasks $RULER_TASKS --lengths 2048 --samples 1; }
compare() { $KV eval compare "$OUT"/needle/* --out docs/results/methods/needle && $KV eval compare "$OUT"/ruler/* --out docs/results/methods/ruler; }

case ${1:-all} in
  needle | ruler | compare) "$1" ;;
  all) needle && ruler && compare ;;
  *) echo "usage: $0 [needle|ruler|compare|all]" >&2 && exit 2 ;;
esac
