"""The kvpolicy half, run by the main venv (``.venv/bin/python``); imports nothing of kvpress.

Per ratio x ``kv_bits`` x prompt: ``kvpolicy.generate`` with SnapKV at kvpress's settings (window 64,
kernel 5, average pooling) and the count kvpress keeps as an int budget, ``max(1, int(T * (1 - r)))``,
greedy, 30 new tokens. Records the answer and ``stats.kv_bytes`` (bytes kept after prefill as stored),
split into codes and float16 scales/zeros from the layout (every entry of a width has the same one).
Appends to ``OUT/policy.jsonl`` (resumes).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import torch

BITS = (16, 4, 2)


def split(total: int, bits: int, group: int = 32) -> dict[str, int]:
    """``total`` bytes as codes and scales: per element ``bits / 8`` of code and ``2 * 2 / group`` of
    float16 scale and zero (kvpolicy.storage.KVStorage.bytes_per_element)."""
    if bits == 16:
        return {"codes": total, "scales": 0, "residual": 0}
    codes = round(total * (bits / 8) / (bits / 8 + 4 / group))
    return {"codes": codes, "scales": total - codes, "residual": 0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.5])
    ap.add_argument("--bits", type=int, nargs="+", default=list(BITS))
    ap.add_argument("--max-new-tokens", type=int, default=30)
    args = ap.parse_args()
    torch.set_num_threads(1)
    import kvpolicy
    from kvpolicy.models import load_model

    data = json.loads((args.out / "prompts.json").read_text())
    model, tok = load_model(data["model_dir"], dtype="fp32")
    path = args.out / "policy.jsonl"
    done = {json.loads(line)["key"] for line in path.open()} if path.exists() else set()
    for ratio in args.ratios:
        for p, prompt in enumerate(data["prompts"]):
            for bits in args.bits:
                key = f"kvpolicy|{bits}|{ratio}|{p}"
                if key in done:
                    continue
                T = len(prompt["ids"])
                n = max(1, int(T * (1 - ratio)))
                width = (
                    bits if bits == 16 else f"int{bits}"
                )  # per token, as measured (4 alone is KIVI's layout)
                policy = kvpolicy.get_policy(
                    "snapkv", kv_budget=n, window=64, kernel=5, pooling="avg", kv_bits=width
                )
                t0 = time.perf_counter()
                with torch.no_grad():
                    out = kvpolicy.generate(
                        model, tok, input_ids=prompt["ids"], policy=policy, max_new_tokens=args.max_new_tokens
                    )
                row = {
                    "key": key,
                    "side": "kvpolicy",
                    "cache": str(bits),
                    "ratio": ratio,
                    "prompt": p,
                    "length": prompt["length"],
                    "depth": prompt["depth"],
                    "T": T,
                    "bytes": split(out.stats.kv_bytes, bits),
                    "kept_per_layer": out.stats.kv_tokens_per_layer[0],
                    "tokens": list(out.token_ids),
                    "text": out.text,
                    "seconds": time.perf_counter() - t0,
                }
                with path.open("a") as f:
                    f.write(json.dumps(row) + "\n")
                print(f"{key}: {row['seconds']:.1f}s {out.text[:70]!r}", flush=True)


if __name__ == "__main__":
    main()
