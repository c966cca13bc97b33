"""The kvpress half, run by ``.venv-kvpress/bin/python`` (kvpress 0.5.5, transformers 5.2, quanto);
imports nothing of kvpolicy.

Per ratio x cache x prompt: ``with SnapKVPress(...)(model): model(prompt, past_key_values=cache)`` over
the whole needle prompt (chat template and question included), then greedy decoding of 30 tokens
(positions ``T + i``, as ``KVPressTextGenerationPipeline.generate_answer``). Caches: ``DynamicCache``
(16: the model's fp32) and transformers' ``QuantizedCache(backend="quanto", nbits=4|2)`` with its
defaults (axis 0, groups of 64, residual 128: kvpress's README usage) and with groups of 32.

Per run it records the answer, the KV bytes held after prefill (codes, float scales and shifts,
full-precision residual) and at the end of decoding, the quantization error of the re-quantized kept
entries, and the Jaccard index of SnapKV's kept positions vs the 16-bit run's (per layer, KV head).
Appends to ``OUT/press.jsonl`` (resumes); the 16-bit kept sets go to ``OUT/press_kept16.npz``.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch
from kvpress import SnapKVPress
from transformers import AutoModelForCausalLM, DynamicCache, QuantizedCache

CACHES = {"16": None, "q4-g64": (4, 64), "q4-g32": (4, 32), "q2-g64": (2, 64), "q2-g32": (2, 32)}


def nbytes(t) -> int:
    return t.numel() * t.element_size()


def cache_bytes(cache) -> dict[str, int]:
    """Bytes as held: quanto's packed codes (uint8), its scale and shift (model dtype), the residual."""
    out = {"codes": 0, "scales": 0, "residual": 0}
    for layer in cache.layers:
        if isinstance(cache, QuantizedCache):
            for q in (layer._quantized_keys, layer._quantized_values):
                out["codes"] += nbytes(q._data._data)
                out["scales"] += nbytes(q._scale) + nbytes(q._shift)
            out["residual"] += nbytes(layer.keys) + nbytes(layer.values)
        else:
            out["codes"] += nbytes(layer.keys) + nbytes(layer.values)
    return out


def run(model, ids: list[int], ratio: float, spec, max_new: int, eos: set[int]) -> dict:
    T = len(ids)
    if spec is None:
        cache = DynamicCache(config=model.config)
    else:
        cache = QuantizedCache(backend="quanto", config=model.config, nbits=spec[0], q_group_size=spec[1])
    press = SnapKVPress(compression_ratio=ratio, window_size=64, kernel_size=5)
    kept, given = {}, {}
    score = press.score

    def recording_score(module, hidden_states, keys, values, attentions, kwargs):
        s = score(module, hidden_states, keys, values, attentions, kwargs)
        n = max(1, int(keys.shape[2] * (1 - ratio)))  # kvpress.utils.compute_n_kept
        idx = s.topk(n, dim=-1).indices[0]  # as ScorerPress.compress
        kept[module.layer_idx] = idx
        given[module.layer_idx] = [
            x[0].gather(1, idx[..., None].expand(-1, -1, x.shape[-1])) for x in (keys, values)
        ]
        return s

    press.score = recording_score
    t0 = time.perf_counter()
    with torch.no_grad():
        with press(model):
            out = model(
                input_ids=torch.tensor([ids]), past_key_values=cache, use_cache=True, logits_to_keep=1
            )
        after_prefill = cache_bytes(cache)
        requant = 0.0
        if spec is not None:  # kvpress re-quantizes the kept (already dequantized) entries
            for i, layer in enumerate(cache.layers):
                for q, x in zip((layer._quantized_keys, layer._quantized_values), given[i], strict=True):
                    requant = max(requant, (q.dequantize()[0] - x).abs().max().item())
        tokens = [int(out.logits[0, -1].argmax())]
        for i in range(max_new - 1):
            if tokens[-1] in eos:
                break
            out = model(
                input_ids=torch.tensor([[tokens[-1]]]),
                past_key_values=cache,
                position_ids=torch.tensor([[T + i]]),
            )
            tokens.append(int(out.logits[0, -1].argmax()))
    mask = np.zeros((len(kept), kept[0].shape[0], T), dtype=bool)
    for i, idx in kept.items():
        np.put_along_axis(mask[i], idx.numpy(), True, axis=1)
    return {
        "bytes": after_prefill,
        "bytes_end": cache_bytes(cache),
        "kept_per_head": int(kept[0].shape[1]),
        "requant_max_abs": requant,
        "tokens": tokens,
        "seconds": time.perf_counter() - t0,
        "mask": mask,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.5])
    ap.add_argument("--caches", nargs="+", default=list(CACHES))
    ap.add_argument("--max-new-tokens", type=int, default=30)
    args = ap.parse_args()
    torch.set_num_threads(1)
    data = json.loads((args.out / "prompts.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(
        data["model_dir"], dtype=torch.float32, attn_implementation="sdpa"
    )
    model.eval()
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(data["model_dir"])
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos])
    path, kept_path = args.out / "press.jsonl", args.out / "press_kept16.npz"
    done = {json.loads(line)["key"] for line in path.open()} if path.exists() else set()
    kept16 = dict(np.load(kept_path)) if kept_path.exists() else {}
    for ratio in args.ratios:
        for p, prompt in enumerate(data["prompts"]):
            for name in sorted(args.caches, key=lambda c: c != "16"):  # 16 first: the reference kept sets
                key = f"kvpress|{name}|{ratio}|{p}"
                if key in done:
                    continue
                r = run(model, prompt["ids"], ratio, CACHES[name], args.max_new_tokens, eos)
                mask, ref = r.pop("mask"), kept16.get(f"{ratio}|{p}")
                if name == "16":
                    kept16[f"{ratio}|{p}"] = np.packbits(mask, axis=-1)
                    np.savez_compressed(kept_path, **kept16)
                    r["jaccard16"] = 1.0
                elif ref is not None:
                    ref = np.unpackbits(ref, axis=-1, count=mask.shape[-1]).astype(bool)
                    r["jaccard16"] = float(((mask & ref).sum(-1) / (mask | ref).sum(-1)).mean())
                r["text"] = tok.decode(r["tokens"], skip_special_tokens=True)
                row = {
                    "key": key,
                    "side": "kvpress",
                    "cache": name,
                    "ratio": ratio,
                    "prompt": p,
                    **prompt,
                    **r,
                }
                del row["ids"]
                row["T"] = len(prompt["ids"])
                with path.open("a") as f:
                    f.write(json.dumps(row) + "\n")
                print(f"{key}: {r['seconds']:.1f}s {r['text'][:70]!r}", flush=True)


if __name__ == "__main__":
    main()
