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
        found: dict[str, dict[int, str]] = defaultdict(dict)
        full, full_found = None, ""
        for run in runs:
            if run.benchmark != bench or not run.complete:
                continue
            match = _BUDGET.search(run.label)
            if match is None:
                if run.label == "fullkv":
                    full = run.summary["score"]
                    if bench == "needle":
                        full_found = f" ({round(run.summary['found'] * run.summary['n'])}/{run.summary['n']})"
                continue
            name = _BUDGET.sub("", run.label).strip()
            lines[name][int(match[1])] = run.summary["score"]
            if bench == "needle":
                found[name][int(match[1])] = (
                    f"{round(run.summary['found'] * run.summary['n'])}/{run.summary['n']}"
                )
        if not lines:
            continue
        budgets = sorted({b for line in lines.values() for b in line})
        print(f"\n### {bench}\n")
        print("| policy | " + " | ".join(f"KV {b}" for b in budgets) + " |")
        print("|---|" + "---|" * len(budgets))
        if full is not None:
            print("| fullkv | " + " | ".join(f"{full:.2f}{full_found}" for _ in budgets) + " |")
        for name in sorted(lines):
            cells = [f"{lines[name][b]:.2f}" if b in lines[name] else "-" for b in budgets]
            cells = [
                f"{c} ({found[name][b]})" if b in found[name] else c
                for c, b in zip(cells, budgets, strict=True)
            ]
            print(f"| {name} | " + " | ".join(cells) + " |")
        fig, ax = plt.subplots(figsize=(9, 4))
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
        ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(out / f"{bench}-by-budget.png", dpi=110)
        plt.close(fig)


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
