#!/usr/bin/env bash
# The engine issue's CPU benchmark matrix on the embedded model (SmolLM2-135M-Instruct, fp32), one run
# per block, results under $OUT (JSON + Markdown + PNG each). About 45 minutes on 2 cores; run it on a
# quiet machine (nothing else running): every figure is a ratio measured side by side in one run.
set -euo pipefail
KVPOLICY=${KVPOLICY:-kvpolicy}
OUT=${OUT:-docs/images/performance}
mkdir -p "$OUT"
EVICTING=(--policy "h2o:evict_during_decode=true" --policy "streamingllm:rolling=true")
# 1. eager decode, batch 1, 4K: every method, evicting ones beside their non-evicting counterparts
"$KVPOLICY" bench e2e --policy snapkv --policy fastkv "${EVICTING[@]}" --policy h2o --policy streamingllm \
    --policy pyramidinfer --lengths 4096 --gen 32 --repeats 2 --warmup 1 --out "$OUT/engine-b1-4k.json"
# 2. eager decode, batch 1, 8K (h2o's prefill column sums are O(L^2): left to the 4K block)
"$KVPOLICY" bench e2e --policy snapkv --policy fastkv --policy "streamingllm:rolling=true" --policy pyramidinfer \
    --lengths 8000 --gen 32 --repeats 2 --warmup 0 --out "$OUT/engine-b1-8k.json"
# 3. compiled decode (inductor; the warm-up repeat pays for compiling), batch 1, 4K, with transformers'
#    StaticCache + torch.compile as the baseline
"$KVPOLICY" bench e2e --compile --transformers-compiled --policy snapkv "${EVICTING[@]}" \
    --lengths 4096 --gen 32 --repeats 2 --warmup 1 --out "$OUT/engine-b1-4k-compiled.json"
# 4. batch 8 (eager), 2K: a batch of 8 prompts of 2K is the work of a 16K prompt on these 2 cores
"$KVPOLICY" bench e2e --batch-size 8 --policy snapkv "${EVICTING[@]}" --lengths 2048 --gen 16 --repeats 2 \
    --warmup 0 --out "$OUT/engine-b8-2k.json"
# 5. peak prefill memory at 32K tokens on a narrow random Llama (4 layers, hidden 256), against the bound
"$KVPOLICY" bench prefill --random-weights bench/shapes/narrow-llama.json \
    --policy "fastkv:tsp_layer=1,tsp_rate=0.2,kv_budget=0.1" --lengths 32768 --repeats 1 --warmup 0 \
    --no-transformers-baseline --out "$OUT/engine-prefill-32k-narrow.json"
