#!/usr/bin/env bash
# The GPU decode issue's whole matrix on one H200, as one prepared script (< 9 minutes, compile and graph
# capture included): random weights in the Llama-3.1-8B shape, bf16, random token ids (no tokenizer, no
# network), every policy at 10 % KV:
#   1. batch 1 at 8K / 32K: fullkv, snapkv, fastkv (TSP layer 15, rate 0.2), ada-snapkv (AdaKV, ragged),
#      h2o with evict_during_decode, tova; the fast decode path ($FAST) with the eager step timed from the
#      same prefill beside it (--also-eager); transformers + DynamicCache as the eager baseline.
#   1b. storage: SnapKV at half the prompt at the last of $LENGTHS, its entries at bf16, int8, per-token
#      int4 and KIVI's 4 bits (kv_bits=4): decode over quantized pages side by side (docs/storage.md).
#   2. throughput at batch 1 / 8 / 32 / max at 8K / 32K ($FAST): tokens/s of the whole batch, max = the
#      largest batch that fits (cost model against free memory, confirmed by running it), and each
#      policy's tokens/s at its max over full KV's at its max (target: FastKV >= 5x at 32K).
#   3. batch 1 at 128K, as 1 without H2O (its prefill scores every query: O(L^2) fp32, minutes at 128K).
#   4. transformers StaticCache + torch.compile (its documented fast path) at $HF_LENGTH, fullkv beside.
#   5. throughput at 128K (as far as it fits in what is left of the time budget).
# Stage limits are sized from the first H200 run (docs/performance.md, GPU section: 8B prefill 1.4 s at
# 32K, 12 s at 128K; eager steps ~45 ms); the whole matrix has not run on a GPU yet.
# Each stage is one process under `timeout`, capped by what is left of $BUDGET seconds; every run's
# figures are printed as they come and each stage rewrites its JSON after every length, so a stage cut
# short still reports. The last step prints one summary of every JSON (bench/summarize.py). Results in
# $OUT (JSON + Markdown per stage).
#
# FAST: the fast decode path's flag, --graphs: kvpolicy's CUDA-graph-replayed decode step
# (`generate(..., graphs=True)`, kvpolicy.graphs; the first step of a batch runs eagerly, the second records
# the graph, both untimed, their seconds reported as "untimed warm steps"). FAST=--compile is the fallback
# for a kvpolicy without it (inductor: ~60-85 s of compile per policy and shape on an 8B model, so the fast
# stages then run into their timeouts); FAST="--graphs --compile" records the compiled step.
#
# On the device machine (torch and transformers there, no network): build kvpolicy's wheel and fetch the
# missing ones here (`pip wheel --no-deps -w .whl .`,
# and pydantic, pydantic-core, annotated-types, typing-inspection, gguf, transformers==5.24.0 with
# `pip download --no-deps --only-binary=:all: --python-version 3.12 ...`), carry .whl, and run
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && \
#   PYTHONPATH=/tmp/site PYTHONSAFEPATH=1 FAST=--graphs bash bench/gpu-h200.sh
# Every Python here runs with PYTHONSAFEPATH=1 (exported below; Python >= 3.11): `python -m` would
# otherwise put the working folder first on sys.path and import the source folder kvpolicy/, which has no
# kvpolicy.adapters or kvpolicy.policies (installation maps them from the repository root). The script
# first imports kvpolicy.adapters and stops with one line if that fails. `make test-wheel` replays this
# on a CPU: the wheel installed with --target, a Python with the dependencies but no kvpolicy.
# STAGES picks the stages to run (default: all, "check b1 storage throughput b1-128k hf-static throughput-128k"),
# POLICIES the policies they run beside full KV (default: all five, "snapkv fastkv ada-snapkv h2o tova").
# The script exits 1 if the check or any stage failed, or a stage that exited 0 left no rows in its JSON
# (a stage cut at its time limit is not a failure: what it finished is in its JSON).
# Dry run on a CPU with a tiny shape (about 10 minutes on 2 cores):
#   PYTHON=.venv/bin/python SHAPE=tests/data/tiny-llama.json DEVICE=cpu DTYPE=fp32 LENGTHS="128 256" \
#   LONG=512 TP_LENGTHS="128 256" TP_LONG=512 HF_LENGTH=256 GEN=4 WARMUP=0 MEMORY=0.08 BATCHES=1,8,max \
#   FAST="--graphs --compile-backend eager" SCALE=4 BUDGET=1800 OUT=/tmp/gpu-dry bash bench/gpu-h200.sh
# (on a CPU --graphs runs kvpolicy.graphs' traced stand-in, not faster; --compile-backend eager spares the
# StaticCache baseline inductor's minutes of code generation)
set -uo pipefail
export PYTHONUNBUFFERED=1  # figures as they come, also through a pipe
export PYTHONSAFEPATH=1    # the installed kvpolicy, never the source folder in the working folder (above)
PYTHON=${PYTHON:-python3}
KVPOLICY=${KVPOLICY:-"$PYTHON -m kvpolicy.cli"}
OUT=${OUT:-bench/out}
SHAPE=${SHAPE:-llama-3.1-8b}
DEVICE=${DEVICE:-cuda}
DTYPE=${DTYPE:-bf16}
LENGTHS=${LENGTHS:-"8192 32768"}       # batch 1, every policy
LONG=${LONG:-131072}                   # batch 1 without H2O
TP_LENGTHS=${TP_LENGTHS:-"8192 32768"} # throughput
TP_LONG=${TP_LONG:-131072}             # throughput where it fits, last
HF_LENGTH=${HF_LENGTH:-32768}          # transformers StaticCache + compile
BATCHES=${BATCHES:-1,8,32,max}
GEN=${GEN:-32}                         # decode steps per run
REPEATS=${REPEATS:-1}                  # timed repeats (interleaved across variants)
WARMUP=${WARMUP:-1}                    # warm-up repeats at 8K / 32K (at 128K: none; its prefills take seconds)
TP_WARMUP=${TP_WARMUP:-0}              # throughput: every run's untimed warm steps already take JIT and capture
HF_WARMUP=${HF_WARMUP:-1}              # StaticCache + compile: the warm-up repeat takes the compile
MEMORY=${MEMORY:-}                     # --memory-gib for throughput; empty: free device memory
FAST=${FAST:---graphs}                 # the fast decode path (see above)
BUDGET=${BUDGET:-520}                  # seconds for the whole script
SCALE=${SCALE:-1}                      # multiplies every stage's limit (a slower machine, a dry run)
STAGES=${STAGES:-"check b1 storage throughput b1-128k hf-static throughput-128k"}  # which stages run
ST_LENGTH=${ST_LENGTH:-${LENGTHS##* }}  # storage: SnapKV at half the prompt per KV width, one length
POLICIES=${POLICIES:-"snapkv fastkv ada-snapkv h2o tova"}  # which of these the stages run beside full KV
declare -A SPEC=(
    [fastkv]="fastkv:tsp_layer=15,tsp_rate=0.2,kv_budget=0.1"
    [snapkv]="snapkv:kv_budget=0.1"
    [ada-snapkv]="ada-snapkv:kv_budget=0.1"
    [h2o]="h2o:evict_during_decode=true,kv_budget=0.1"
    [tova]="tova:kv_budget=0.1"
)
# policies NAME...: chosen=(--policy SPEC ...) for each NAME that $POLICIES names, in this order.
policies() {
    chosen=()
    local n
    for n; do
        if [[ " $POLICIES " == *" $n "* ]]; then chosen+=(--policy "${SPEC[$n]}"); fi
    done
}
# One line, and no stage started, when kvpolicy cannot be imported as installed.
if ! where=$($PYTHON -c 'import kvpolicy.adapters, kvpolicy.policies; print(kvpolicy.__file__)' 2>&1); then
    echo "gpu-h200: $PYTHON cannot import kvpolicy.adapters (${where##*$'\n'}): put the installed wheel on" \
        "PYTHONPATH as this script's header says, with Python >= 3.11 (its PYTHONSAFEPATH keeps the source" \
        "folder kvpolicy/, which lacks adapters and policies, off sys.path)" >&2
    exit 2
fi
echo "== kvpolicy from ${where##*$'\n'}"
mkdir -p "$OUT"
model=(--random-weights "$SHAPE" --dtype "$DTYPE" --device "$DEVICE" --gen "$GEN" --repeats "$REPEATS")
memory=()
[[ -n "$MEMORY" ]] && memory=(--memory-gib "$MEMORY")
start=$SECONDS
failed=() finished=()
selected() { [[ " $STAGES " == *" $1 "* ]]; }

# stage NAME LIMIT_S ARGS...: `kvpolicy bench ARGS --out $OUT/NAME.json` in its own process under timeout,
# the limit capped by what is left of $BUDGET (skipped when under 20 s are left).
stage() {
    local name=$1 limit=$(($2 * SCALE))
    shift 2
    selected "$name" || return
    local left=$((BUDGET - (SECONDS - start)))
    if ((left < 20)); then
        echo "== $name: skipped (${left}s left of ${BUDGET}s)"
        return
    fi
    ((limit > left)) && limit=$left
    echo "== $name (limit ${limit}s; $((SECONDS - start))s elapsed)"
    # shellcheck disable=SC2086  # KVPOLICY and FAST are word lists
    timeout -k 5 "$limit" $KVPOLICY bench "$@" --out "$OUT/$name.json"
    local rc=$?
    if ((rc == 124 || rc == 137)); then
        echo "== $name: cut at ${limit}s; what it finished is printed above and in $OUT/$name.json"
    elif ((rc != 0)); then
        echo "== $name: exit $rc"
        failed+=("$name")
    else
        finished+=("$name")
    fi
}

if selected check; then
    echo "== check (limit $((120 * SCALE))s)"
    timeout -k 5 $((120 * SCALE)) $PYTHON bench/gpu_check.py
    rc=$?
    if ((rc == 124 || rc == 137)); then
        echo "== check: cut at $((120 * SCALE))s (see above); timing goes on"
    elif ((rc != 0)); then
        echo "== check: FAILED, exit $rc (see above); timing goes on"
        failed+=(check)
    fi
fi

# shellcheck disable=SC2086
{
    policies snapkv fastkv ada-snapkv h2o tova
    stage b1 150 e2e "${model[@]}" --warmup "$WARMUP" --lengths $LENGTHS $FAST --also-eager "${chosen[@]}"
    # decode over quantized pages (per token and KIVI's layout) beside the model's dtype, same entries
    stage storage 90 e2e "${model[@]}" --warmup "$WARMUP" --lengths $ST_LENGTH $FAST \
        --policy snapkv:kv_budget=0.5 --policy snapkv:kv_budget=0.5,kv_bits=8 \
        --policy snapkv:kv_budget=0.5,kv_bits=int4 --policy snapkv:kv_budget=0.5,kv_bits=4
    stage throughput 170 e2e "${model[@]}" --warmup "$TP_WARMUP" --lengths $TP_LENGTHS $FAST --throughput \
        --batch-sizes "$BATCHES" "${memory[@]}" "${chosen[@]}"
    policies snapkv fastkv ada-snapkv tova
    stage b1-128k 110 e2e "${model[@]}" --warmup 0 --lengths $LONG $FAST --also-eager "${chosen[@]}"
    policies fastkv
    stage hf-static 100 e2e "${model[@]}" --warmup "$HF_WARMUP" --lengths $HF_LENGTH $FAST --no-transformers-baseline \
        --transformers-compiled "${chosen[@]}"
    policies snapkv fastkv ada-snapkv tova
    stage throughput-128k 600 e2e "${model[@]}" --warmup 0 --lengths $TP_LONG $FAST --throughput \
        --batch-sizes "$BATCHES" "${memory[@]}" "${chosen[@]}"
}
echo "== summary ($((SECONDS - start))s)"
# A stage that exited 0 must have written rows (summarize exits 1 otherwise).
$PYTHON bench/summarize.py "$OUT" ${finished[@]:+--require "${finished[@]}"} || failed+=(summary)
if ((${#failed[@]})); then
    echo "== failed: ${failed[*]}"
    exit 1
fi
