"""Half (b) of the kvpress parity harness, run by the main venv (``.venv/bin/python``); imports
nothing of kvpress.

For each method x ratio x length of ``methods.METHODS`` it prefills the context's token ids with
the matching kvpolicy policy (``kvpolicy.generation.prefill``, fp32, one thread) and reads, per
layer and KV head, the original positions the ragged cache holds (``cache.layers[i].positions``,
``-1`` on padding). Methods whose component kind is not registered yet are skipped.

Writes ``OUT/kept_kvpolicy.npz`` in the press side's format.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import numpy as np
import torch
from methods import METHODS, RATIOS


def namespace() -> tuple[dict[str, object], set[str]]:
    import kvpolicy
    import kvpolicy.policies as builtin

    names: dict[str, object] = {"compose": kvpolicy.compose}
    kinds: set[str] = set()
    import importlib
    import pkgutil

    classes = [getattr(builtin, k) for k in dir(builtin) if isinstance(getattr(builtin, k), type)]
    for info in pkgutil.iter_modules(builtin.__path__):  # files not registered in __init__ yet too
        try:
            module = importlib.import_module(f"{builtin.__name__}.{info.name}")
        except Exception as exc:  # a file another session is still writing
            print(f"kvpolicy.policies.{info.name}: not importable ({exc})", file=sys.stderr)
            continue
        classes += [
            v for v in vars(module).values() if isinstance(v, type) and v.__module__ == module.__name__
        ]
    try:
        from kvpolicy_keynorm import KeyNorm

        classes.append(KeyNorm)
    except ImportError:
        pass
    for cls in classes:
        names[cls.__name__] = cls
        if isinstance(getattr(cls, "kind", None), str):
            kinds.add(cls.kind)
    return names, kinds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--methods", nargs="*", default=None)
    ap.add_argument("--ratios", type=float, nargs="*", default=list(RATIOS))
    ap.add_argument(
        "--file",
        default="kept_kvpolicy.npz",
        help="output file name under --out (compare.py reads kept_kvpolicy*.npz)",
    )
    ap.add_argument("--lengths", type=int, nargs="*", default=None)
    ap.add_argument("--redo", action="store_true", help="rerun entries already in the output file")
    args = ap.parse_args()
    torch.set_num_threads(1)
    context = json.loads((args.out / "context.json").read_text())
    from kvpolicy.generation import prefill
    from kvpolicy.models import load_model

    model, tokenizer = load_model(context["model_dir"], dtype="fp32")
    names, kinds = namespace()
    path = args.out / args.file
    results = dict(np.load(path)) if path.exists() else {}
    for _length, plain_ids in context["ids"].items():  # length-major: every method at 1.5K first
        T = len(plain_ids)
        if args.lengths and T not in args.lengths:
            continue
        for method, row in METHODS.items():
            if args.methods and method not in args.methods:
                continue
            if row["requires"] not in kinds:
                print(
                    f"{method}: skipped (no kvpolicy component of kind {row['requires']!r} yet)",
                    file=sys.stderr,
                )
                continue
            ids = context["chat_prefix"] + plain_ids if row.get("context") == "chat" else plain_ids
            for r in args.ratios:
                key = f"{method}|{r}|{T}"
                if key in results and not args.redo:
                    continue
                n = max(1, int(T * (1 - r)))
                env = {
                    "r": r,
                    "n": n,
                    "T": T,
                    "head_map": context["head_map"],
                    "qfilters": context["qfilters"],
                }
                policy = eval(row["policy"], dict(names), env).with_tokenizer(tokenizer)
                t0 = time.perf_counter()
                with torch.no_grad():
                    done = prefill(model, torch.tensor([ids]), policy)
                layers = []
                for layer in done.cache.layers:
                    pos = layer.positions[0].cpu()  # (H, n), -1 on padding
                    kept = torch.zeros(pos.shape[0], len(ids) + 1, dtype=torch.bool)
                    kept.scatter_(1, torch.where(pos >= 0, pos, len(ids)).long(), True)
                    layers.append(kept[:, : len(ids)])
                kept = torch.stack(layers).numpy()
                results[key] = np.packbits(kept, axis=-1)
                took = time.perf_counter() - t0
                print(
                    f"kvpolicy {method} r={r} T={T}: mean kept {kept.sum(-1).mean():.1f} ({took:.1f} s)",
                    flush=True,
                )
                np.savez_compressed(path, **results)
                del done


if __name__ == "__main__":
    main()
