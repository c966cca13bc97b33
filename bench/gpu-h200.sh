#!/usr/bin/env bash
# The engine issue's GPU check, as one prepared script for the lent GPU machine (one call, < 10 min):
# random-weight Llama-3.1-8B shape in bf16, fullkv vs FastKV (TSP layer 15, rate 0.2, retention 0.1),
# prefill and end-to-end at 8K / 32K / 128K, batch 1 (and 8 at 8K / 32K), eager and compiled decode,
# peak memory and the cost model's bound beside every ratio. Results go to $OUT (JSON, Markdown, PNG).
#
# On the device machine (torch and transformers are there; nothing can be installed from the network):
#   carry the missing wheels (pydantic, pluggy, gguf, rich) in wheels/ and run
#   `pip install --no-index --no-deps wheels/*.whl && pip install --no-deps -e . && bash bench/gpu-h200.sh`
# Dry run on a CPU with a tiny shape: SHAPE=tests/data/tiny-llama.json DEVICE=cpu DTYPE=fp32 \
#   LENGTHS_LONG="256 512" LENGTHS_BATCH="256" GEN=8 REPEATS=1 bash bench/gpu-h200.sh
set -euo pipefail
KVPOLICY=${KVPOLICY:-kvpolicy}
OUT=${OUT:-bench/out}
SHAPE=${SHAPE:-llama-3.1-8b}
DEVICE=${DEVICE:-cuda}
DTYPE=${DTYPE:-bf16}
LENGTHS_LONG=${LENGTHS_LONG:-"8192 32768 131072"}
LENGTHS_BATCH=${LENGTHS_BATCH:-"8192 32768"}
GEN=${GEN:-256}
REPEATS=${REPEATS:-3}
FASTKV="fastkv:tsp_layer=15,tsp_rate=0.2,kv_budget=0.1"
mkdir -p "$OUT"
common=(--random-weights "$SHAPE" --dtype "$DTYPE" --device "$DEVICE" --policy "$FASTKV" --repeats "$REPEATS" --warmup 1)
# 1. prefill alone, batch 1: the TSP speed-up (paper: 1.82x at 128K) against its bound
"$KVPOLICY" bench prefill "${common[@]}" --lengths $LENGTHS_LONG --out "$OUT/prefill-b1.json"
# 2. end to end, batch 1, eager decode, then compiled decode (CUDA graphs): paper 2.87x decode
"$KVPOLICY" bench e2e "${common[@]}" --lengths $LENGTHS_LONG --gen "$GEN" --out "$OUT/e2e-b1-eager.json"
"$KVPOLICY" bench e2e "${common[@]}" --lengths $LENGTHS_LONG --gen "$GEN" --compile --no-transformers-baseline \
    --transformers-compiled --out "$OUT/e2e-b1-compiled.json"
# 3. batch 8 at 8K / 32K, compiled decode
"$KVPOLICY" bench e2e "${common[@]}" --lengths $LENGTHS_BATCH --gen "$GEN" --batch-size 8 --compile \
    --no-transformers-baseline --out "$OUT/e2e-b8-compiled.json"
ls -l "$OUT"
