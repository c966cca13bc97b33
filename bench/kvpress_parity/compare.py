"""Half (c) of the kvpress parity harness: numpy only, runs in either venv.

Reads every ``OUT/kept_kvpress*.npz`` and every ``OUT/kept_kvpolicy*.npz`` and prints, per method x ratio x
length, as a markdown table: the (layer, KV head) pairs whose kept sets are identical, the mean
Jaccard index of the kept sets, the share of kvpress's kept entries that kvpolicy keeps too, the
pairs where one set contains the other (same ranking, different counts), and the mean kept per head
on each side. Also writes the table to ``OUT/results.md``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from methods import METHODS


def unpack(packed: np.ndarray) -> np.ndarray:
    """``(L, H, bits)`` bool; padding bits are zero on both sides (a KVzip prompt is longer than ``T``:
    the chat template's prefix comes first)."""
    return np.unpackbits(packed, axis=-1).astype(bool)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    press: dict[str, np.ndarray] = {}
    for path in sorted(args.out.glob("kept_kvpress*.npz")):
        press.update(dict(np.load(path)))
    policy: dict[str, np.ndarray] = {}
    for path in sorted(args.out.glob("kept_kvpolicy*.npz")):
        policy.update(dict(np.load(path)))
    order = {name: i for i, name in enumerate(METHODS)}

    def sort_key(key: str) -> tuple:
        method, ratio, length = key.split("|")
        return (order.get(method, len(order)), method, int(length), float(ratio))

    lines = [
        "| method | ratio removed | T | heads identical | mean Jaccard | kvpress entries kept by kvpolicy "
        "| nested | kept/head kvpress | kept/head kvpolicy |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    totals: dict[str, list[int]] = {}
    for key in sorted(set(press) & set(policy), key=sort_key):
        method, ratio, length = key.split("|")
        a = unpack(press[key])  # (L, H, T)
        b = unpack(policy[key])
        inter = (a & b).sum(-1)
        union = (a | b).sum(-1)
        na, nb = a.sum(-1), b.sum(-1)
        same = (a == b).all(-1)
        nested = (inter == np.minimum(na, nb)) & ~same
        jaccard = np.where(union > 0, inter / np.maximum(union, 1), 1.0)
        pairs = same.size
        t = totals.setdefault(method, [0, 0, 0, 0])
        t[0] += int(same.sum())
        t[1] += pairs
        t[2] += int(inter.sum())
        t[3] += int(na.sum())
        lines.append(
            f"| {method} | {ratio} | {length} | {int(same.sum())}/{pairs} | {jaccard.mean():.4f} "
            f"| {inter.sum() / max(na.sum(), 1):.2%} | {int(nested.sum())} | {na.mean():.1f} | {nb.mean():.1f} |"
        )
    lines += [
        "",
        "| method | heads identical (all runs) | kvpress entries kept by kvpolicy (all runs) |",
        "|---|---|---|",
    ]
    for method in sorted(totals, key=lambda m: order.get(m, len(order))):
        same, pairs, inter, na = totals[method]
        lines.append(f"| {method} | {same}/{pairs} ({same / pairs:.1%}) | {inter / max(na, 1):.2%} |")
    missing = sorted(set(press) ^ set(policy), key=sort_key)
    if missing:
        lines += ["", "Measured on one side only: " + ", ".join(missing)]
    text = "\n".join(lines)
    print(text)
    (args.out / "results.md").write_text(text + "\n")


if __name__ == "__main__":
    main()
