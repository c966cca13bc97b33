"""``kvpolicy demo``: needle-in-a-haystack on the embedded model, full KV vs SnapKV vs FastKV.

The settings are the ones measured to keep the needle on SmolLM2-135M-Instruct, not the paper's 8B
defaults (TSP at layer 14, the ``N/2 - 1`` rule, loses the needle on this model): FastKV uses the
configuration ``kvpolicy calibrate`` recommended for this model (``kvpolicy/configs/``, see
docs/calibration.md), SnapKV the smallest budget a sweep found to keep the needle at 2K tokens.
The calibrated FastKV keeps every KV entry (on this model the cache cut costs accuracy), so a second
FastKV row cuts the cache to SnapKV's budget too: FastKV's two halves, propagation and cache
compression, side by side with what each saves. Budgets are fractions of the prompt, so ``--length``
keeps them meaningful.
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from kvpolicy import threads
from kvpolicy.eval import needle
from kvpolicy.generation import generate


def demo_policies(model: Any = None) -> list[tuple[str, Any]]:
    """Full KV, SnapKV and FastKV, each with the settings measured for ``model`` where they ship
    (``kvpolicy/configs/<model>/``; the embedded model's: SnapKV at half the prompt, FastKV as
    ``kvpolicy calibrate`` recommended), else the presets' defaults."""
    from kvpolicy.calibrated import resolve_preset

    return [(label, resolve_preset(name, dict(overrides), model)) for label, name, overrides in DEMO_PRESETS]


#: The demo's rows: its label, the preset it runs and the settings it gives (measured ones fill the rest).
DEMO_PRESETS: tuple[tuple[str, str, tuple[tuple[str, Any], ...]], ...] = (
    ("full KV", "fullkv", ()),
    ("SnapKV", "snapkv", ()),
    ("FastKV (calibrated)", "fastkv", ()),
    ("FastKV (KV 0.5)", "fastkv", (("kv_budget", 0.5),)),
)


def run_demo(
    model: Any, tokenizer: Any, length: int = 2000, n_depths: int = 5, haystack_dir: Path | None = None
) -> int:
    from rich.console import Console
    from rich.table import Table

    from kvpolicy.progress import track

    console = Console()
    haystack = needle.load_haystack(needle.find_haystack_dir(haystack_dir))
    samples = [needle.build_sample(tokenizer, length, d, haystack) for d in needle.depths(n_depths)]
    resolved = demo_policies(model)
    policies = [(label, r.policy) for label, r in resolved]
    results: dict[str, list[Any]] = {label: [] for label, _ in policies}
    with track("needle-in-a-haystack", len(samples) * len(policies), console=console) as progress:
        for sample in samples:
            for label, policy in policies:
                progress.describe(f"{label} @ depth {sample.depth:.0%}")
                out = generate(model, tokenizer, input_ids=sample.input_ids, policy=policy, max_new_tokens=30)
                results[label].append(out)
                progress.advance()

    n_layers = model.config.num_hidden_layers
    table = Table(title=f"needle-in-a-haystack, {len(samples[0].input_ids)} tokens, {len(samples)} depths")
    columns = ("policy", "found", "recall", "prefill s", "decode ms/tok", "KV MiB", "KV", "prefill tokens")
    for col in columns:
        table.add_column(col, justify="right" if col != "policy" else "left")
    full_tokens = full_kv = None
    for label, outs in results.items():
        stats = [o.stats for o in outs]
        found = sum(needle.needle_found(o.text) for o in outs)
        recall = statistics.mean(needle.needle_recall(o.text) for o in outs)
        processed = statistics.mean(sum(s.tokens_per_layer) for s in stats)
        kv = statistics.mean(s.kv_bytes for s in stats)
        full_tokens, full_kv = full_tokens or processed, full_kv or kv
        table.add_row(
            label,
            f"{found}/{len(outs)}",
            f"{recall:.2f}",
            f"{statistics.median(s.prefill_seconds for s in stats):.2f}",
            f"{1000 * statistics.median(s.decode_seconds_per_token for s in stats):.1f}",
            f"{kv / 2**20:.1f}",
            f"{kv / full_kv:.0%}",
            f"{processed / full_tokens:.0%}",
        )
    console.print(table)
    threads.report(console)
    settings = "; ".join(f"{label} = {r.label}" for label, r in resolved[1:])
    measured = list(dict.fromkeys(r.note for _, r in resolved if r.note))  # each note once
    console.print(
        f"settings on this {n_layers}-layer model: {settings}"
        + (
            f" ({'; '.join(measured)})"
            if measured
            else " (the presets' defaults: none measured for this model)"
        )
        + ". 'found' = the answer names the sandwich and Dolores Park; 'recall' = share of the needle's "
        "words in the answer; 'KV' = KV cache relative to full KV; 'prefill tokens' = token-layers "
        "processed relative to full KV.",
        markup=False,
    )
    for label, outs in results.items():
        console.print(f"[bold]{label}[/bold] @ depth {samples[-1].depth:.0%}: {outs[-1].text!r}")
    return 0
