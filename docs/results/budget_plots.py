"""Score against KV budget, one line per policy, for docs/results.md (run by reproduce.sh compare).

Groups the runs under a results folder by their label with ``kv_budget=N`` taken out (the grid's
labels are ``<preset> kv_budget=N <other options>``), draws mean score per budget for each benchmark,
full KV as a dashed line, and prints the Markdown table of the same numbers.

    python docs/results/budget_plots.py results/eval-smollm2 docs/results
"""

from __future__ import annotations

import re
import sys
from collections import defaultdict
from pathlib import Path

from kvpolicy.eval.report import load_runs

_BUDGET = re.compile(r"\s*kv_budget=(\d+)")
_NAMES = {
    "needle": "needle recall (0-1)",
    "ruler": "RULER score (0-100)",
    "longbench": "multi_news ROUGE-L (0-100)",
}


def main(results: Path, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = load_runs([results])
    for bench, title in _NAMES.items():
        lines: dict[str, dict[int, float]] = defaultdict(dict)
        full = None
        for run in runs:
            if run.benchmark != bench or not run.complete:
                continue
            match = _BUDGET.search(run.label)
            if match is None:
                full = run.summary["score"] if run.label == "fullkv" else full
                continue
            name = _BUDGET.sub("", run.label).strip()
            lines[name][int(match[1])] = run.summary["score"]
        if not lines:
            continue
        budgets = sorted({b for line in lines.values() for b in line})
        print(f"\n### {bench}\n")
        print("| policy | " + " | ".join(f"KV {b}" for b in budgets) + " |")
        print("|---|" + "---|" * len(budgets))
        if full is not None:
            print("| fullkv | " + " | ".join(f"{full:.2f}" for _ in budgets) + " |")
        for name in sorted(lines):
            print(
                f"| {name} | " + " | ".join(f"{lines[name].get(b, float('nan')):.2f}" for b in budgets) + " |"
            )
        fig, ax = plt.subplots(figsize=(7, 4))
        for name in sorted(lines):
            xs = sorted(lines[name])
            ax.plot(xs, [lines[name][x] for x in xs], marker="o", label=name)
        if full is not None:
            ax.axhline(full, color="black", ls="--", lw=1, label="fullkv")
        ax.set_xscale("log", base=2)
        ax.set_xticks(budgets, [str(b) for b in budgets])
        ax.set_xlabel("KV budget (entries per layer and KV head)")
        ax.set_ylabel(title)
        ax.set_title(f"{bench}: SmolLM2-135M-Instruct")
        ax.legend(fontsize=7, loc="lower right")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(out / f"{bench}-by-budget.png", dpi=110)
        plt.close(fig)


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
