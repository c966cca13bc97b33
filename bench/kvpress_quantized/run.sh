#!/usr/bin/env bash
# kvpress SnapKV over transformers' QuantizedCache (quanto) vs kvpolicy SnapKV with kv_bits, on the
# needle prompts. Dev-only, outside `make test`. Usage: bench/kvpress_quantized/run.sh [OUT]
#   .venv          kvpolicy's venv (make install)
#   .venv-kvpress  as bench/kvpress_parity/run.sh, plus: .venv-kvpress/bin/pip install optimum-quanto==0.2.7
# RATIOS="0.5 0.75" (default 0.5) picks the ratios; both sides resume from OUT/*.jsonl.
set -euo pipefail
cd "$(dirname "$0")"
OUT=$(realpath -m "${1:-../out/kvpress_quantized}")
ROOT=../..
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
read -ra R <<<"${RATIOS:-0.5}"
"$ROOT/.venv/bin/python" prepare.py --out "$OUT"
"$ROOT/.venv-kvpress/bin/python" press_side.py --out "$OUT" --ratios "${R[@]}"
"$ROOT/.venv/bin/python" policy_side.py --out "$OUT" --ratios "${R[@]}"
"$ROOT/.venv/bin/python" compare.py --out "$OUT"
