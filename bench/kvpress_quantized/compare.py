"""The table of the kvpress-quantized comparison, run by the main venv (needs ``kvpolicy.eval.needle``).

Reads ``OUT/press.jsonl`` and ``OUT/policy.jsonl``; per side x cache x ratio: needle found (answer names
"sandwich" and "dolores"), mean needle recall (share of the needle's words in the answer), KV bytes per
prompt token after prefill split into codes / scales (+ zero points) / full-precision residual, the
residual per prompt token at the end of decoding (kvpress only: new tokens stay full precision until
128), the Jaccard index of kvpress's kept positions vs its 16-bit run, and the answers equal to the same
side's 16-bit answer; below it, the answers token-identical across the sides at each width. Writes
the table to ``OUT/results.md`` too.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

from kvpolicy.eval.needle import needle_found, needle_recall

LABELS = {
    "16": ("fp32 (model dtype)", "-"),
    "q4-g64": ("quanto int4, QuantizedCache defaults", "64"),
    "q4-g32": ("quanto int4", "32"),
    "q2-g64": ("quanto int2, QuantizedCache defaults", "64"),
    "q2-g32": ("quanto int2", "32"),
    "4": ("kvpolicy int4", "32"),
    "2": ("kvpolicy int2", "32"),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    rows = []
    for name in ("press.jsonl", "policy.jsonl"):
        path = args.out / name
        if path.exists():
            rows += [json.loads(line) for line in path.open()]
    groups: dict[tuple, list[dict]] = defaultdict(list)
    ref = {(r["side"], r["ratio"], r["prompt"]): r["tokens"] for r in rows if r["cache"] == "16"}
    for r in rows:
        groups[(r["ratio"], r["side"], r["cache"])].append(r)
    order = list(LABELS)
    lines = [
        "| ratio removed | side | storage | group | found | mean recall | KV B / prompt token | codes | "
        "scales+zeros | residual | residual after decode | Jaccard kept vs 16 | answers = 16-bit |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for (ratio, side, cache), rs in sorted(
        groups.items(), key=lambda kv: (kv[0][0], kv[0][1], order.index(kv[0][2]))
    ):
        tokens = sum(r["T"] for r in rs)

        def per_token(field: str, rs: list[dict] = rs, tokens: int = tokens) -> float:
            return sum(r[field[0]][field[1]] for r in rs) / tokens

        parts = {k: per_token(("bytes", k)) for k in ("codes", "scales", "residual")}
        end = f"{per_token(('bytes_end', 'residual')):.0f}" if side == "kvpress" else "0 (quantized on write)"
        jac = [r["jaccard16"] for r in rs if "jaccard16" in r]
        jaccard = f"{sum(jac) / len(jac):.3f}" if side == "kvpress" and jac else "1 (by design)"
        same = sum(r["tokens"] == ref.get((side, ratio, r["prompt"])) for r in rs)
        storage, group = LABELS[cache]
        lines.append(
            f"| {ratio} | {side} | {storage} | {group} | {sum(needle_found(r['text']) for r in rs)}/{len(rs)} | "
            f"{sum(needle_recall(r['text']) for r in rs) / len(rs):.2f} | {sum(parts.values()):.0f} | "
            f"{parts['codes']:.0f} | {parts['scales']:.0f} | {parts['residual']:.0f} | {end} | {jaccard} | "
            f"{same}/{len(rs)} |"
        )
    lines.append("")
    answers = {(r["side"], r["cache"], r["ratio"], r["prompt"]): r["tokens"] for r in rows}
    for press, policy in (("16", "16"), ("q4-g32", "4"), ("q4-g64", "4"), ("q2-g32", "2"), ("q2-g64", "2")):
        pairs = [
            v == answers[("kvpolicy", policy, *k[2:])]
            for k, v in answers.items()
            if k[:2] == ("kvpress", press) and ("kvpolicy", policy, *k[2:]) in answers
        ]
        lines.append(
            f"- kvpress {press} vs kvpolicy {policy}: answers token-identical {sum(pairs)}/{len(pairs)}"
        )
    text = "\n".join(lines)
    (args.out / "results.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
