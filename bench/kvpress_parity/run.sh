#!/usr/bin/env bash
# The kvpress parity harness (issue 29): kept KV entries of kvpress 0.5.5 vs kvpolicy on the embedded
# model. Dev-only, outside `make test`. Usage: bench/kvpress_parity/run.sh [--text FILE] [OUT]
#   .venv          kvpolicy's venv (make install)
#   .venv-kvpress  python -m venv .venv-kvpress && .venv-kvpress/bin/pip install torch==2.13.0 (CPU build)
#                  && .venv-kvpress/bin/pip install kvpress==0.5.5 "transformers<5.3"
# METHODS="SnapKV TOVA" / RATIOS="0.5" limit the runs.
set -euo pipefail
cd "$(dirname "$0")"
TEXT=()
if [[ "${1:-}" == "--text" ]]; then TEXT=(--text "$(realpath "$2")"); shift 2; fi
OUT=$(realpath -m "${1:-../out/kvpress_parity}")
ROOT=../..
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
SEL=()
[[ -n "${METHODS:-}" ]] && { read -ra M <<<"$METHODS"; SEL+=(--methods "${M[@]}"); }
[[ -n "${RATIOS:-}" ]] && { read -ra R <<<"$RATIOS"; SEL+=(--ratios "${R[@]}"); }
"$ROOT/.venv/bin/python" prepare.py --out "$OUT" "${TEXT[@]}"
"$ROOT/.venv-kvpress/bin/python" press_side.py --out "$OUT" "${SEL[@]}"
"$ROOT/.venv/bin/python" policy_side.py --out "$OUT" "${SEL[@]}"
"$ROOT/.venv/bin/python" compare.py --out "$OUT"
