"""Where one decode step's time goes, by kind of op (torch profiler), on the embedded model.

Answers the engine issue's question "find where the rest goes": a decode step must read every weight
and the kept KV once, so its floor is bytes / read bandwidth; this splits the measured step into
weight matrix-vector products (``aten::mm``/``addmm``/``linear``), paged attention (``aten::bmm``) and
everything else (small per-layer ops: norms, RoPE, cache writes, policy scoring, eviction), with
op counts. Run on a quiet machine:

    python bench/decode_breakdown.py --length 4096 --policy fullkv --policy snapkv \
        --policy "h2o:evict_during_decode=true" --out docs/images/performance/decode-breakdown.json
"""

from __future__ import annotations

import argparse
import json
import time
from collections import Counter
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from kvpolicy.bench.cli import parse_policy_spec
from kvpolicy.bench.machine import measure_machine
from kvpolicy.generation import prefill
from kvpolicy.models import load_model
from kvpolicy.registry import get_adapter

WEIGHTS = {"aten::mm", "aten::addmm"}
ATTENTION = {"aten::bmm"}


def breakdown(model, ids: torch.Tensor, spec: str, steps: int) -> dict:
    _, policy = parse_policy_spec(spec, {})
    adapter = get_adapter(model)
    pre = prefill(model, ids, policy, reserve=steps + 8)
    token, batch = pre.next_token.view(1, 1), pre.batch
    for step in range(4):  # warm-up
        adapter.decode_step(token, policy, batch, step)
    t0 = time.perf_counter()
    for step in range(4, 4 + steps):
        adapter.decode_step(token, policy, batch, step)
    wall = (time.perf_counter() - t0) / steps
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for step in range(4 + steps, 4 + 2 * steps):
            adapter.decode_step(token, policy, batch, step)
    ms: Counter[str] = Counter()
    calls: Counter[str] = Counter()
    for event in prof.key_averages():
        kind = "weights" if event.key in WEIGHTS else "attention" if event.key in ATTENTION else "other"
        ms[kind] += event.self_cpu_time_total / 1000 / steps
        calls[kind] += event.count / steps
    return {
        "policy": spec,
        "wall_ms": 1000 * wall,
        "profiled_ms": dict(ms),
        "ops_per_step": dict(calls),
        "kv_bytes": sum(pre.cache.kv_bytes),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--length", type=int, default=4096)
    p.add_argument("--policy", action="append", default=[])
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    model, _ = load_model()
    ids = torch.randint(100, 40000, (1, args.length), generator=torch.Generator().manual_seed(0))
    machine = measure_machine(torch.device("cpu"), torch.float32)
    weight_bytes = sum(t.numel() * t.element_size() for t in model.parameters())
    rows = [breakdown(model, ids, spec, args.steps) for spec in args.policy or ["fullkv"]]
    for row in rows:
        row["bound_ms"] = 1000 * (weight_bytes + row["kv_bytes"]) / machine.read_bytes_per_s
        row["weights_at_gemv_ms"] = 1000 * weight_bytes / machine.gemv_bytes_per_s
        parts = ", ".join(
            f"{k} {v:.1f} ms ({row['ops_per_step'][k]:.0f} ops)" for k, v in row["profiled_ms"].items()
        )
        print(f"{row['policy']}: {row['wall_ms']:.1f} ms/step, bound {row['bound_ms']:.1f} ms; {parts}")
    if args.out:
        machine_info = {
            k: getattr(machine, k) for k in ("read_bytes_per_s", "gemv_bytes_per_s", "matmul_flops_per_s")
        }
        args.out.write_text(
            json.dumps({"machine": machine_info, "weight_bytes": weight_bytes, "rows": rows}, indent=1)
        )


if __name__ == "__main__":
    main()
