"""Correctness on CUDA before any timing (stage 0 of bench/gpu-h200.sh): for every built-in preset,
graph-replayed decode (``generate(..., graphs=True)``: real CUDA graphs here) gives the same greedy tokens
as eager decode on a tiny fp32 Llama, and replays; then the Triton decode kernel against the torch paged
attention at the 8B shape's head layout in bf16 (relative error of the output against an fp32 torch run).

Plain Python (the GPU machine has no pytest); prints one line per check as it goes and exits non-zero if
any failed. Run from the repository root: ``python bench/gpu_check.py``.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import kvpolicy
import kvpolicy.graphs
from kvpolicy.cache import PagedLayer, paged_attention
from kvpolicy.kernels import available

HEAD_MAP = str(Path(__file__).resolve().parent.parent / "tests" / "data" / "duo_tiny_head_map.json")
#: Settings that make each preset compress a 100-token prompt on the 4-layer tiny model (as the tests').
PRESETS: dict[str, dict[str, object]] = {
    "fullkv": {},
    "snapkv": {"kv_budget": 20},
    "fastkv": {"kv_budget": 20, "tsp_layer": 1, "tsp_rate": 0.5},
    "streamingllm": {"kv_budget": 20, "rolling": True},
    "h2o": {"kv_budget": 20, "evict_during_decode": True},
    "pyramidkv": {"kv_budget": 20},
    "gemfilter": {"kv_budget": 20},
    "pyramidinfer": {"kv_budget": 0.9},
    "ada-snapkv": {"kv_budget": 20},
    "expected_attention": {"kv_budget": 20},
    "tova": {"kv_budget": 20},
    "cake": {"kv_budget": 20, "window": 8},
    "duoattention": {"head_map_file": HEAD_MAP, "sink": 4, "recent": 16, "rolling": True},
}


def tiny_model(device: str) -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        attn_implementation="sdpa",
    )
    return LlamaForCausalLM(cfg).eval().to(device)


def check_graphs(device: str) -> bool:
    model = tiny_model(device)
    prompts = [
        torch.randint(0, 128, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (100, 71)
    ]
    ok = True
    for name, options in PRESETS.items():
        policy = kvpolicy.get_policy(name, **options)
        t0 = time.perf_counter()
        try:
            kwargs = {"input_ids": prompts, "policy": policy, "max_new_tokens": 40}
            eager = [o.token_ids for o in kvpolicy.generate(model, None, **kwargs)]
            seen = []
            original = kvpolicy.graphs.DecodeGraphs.__init__

            def spy(self, *args, _orig=original, _seen=seen):
                _orig(self, *args)
                _seen.append(self)

            kvpolicy.graphs.DecodeGraphs.__init__ = spy
            try:
                fast = [o.token_ids for o in kvpolicy.generate(model, None, graphs=True, **kwargs)]
            finally:
                kvpolicy.graphs.DecodeGraphs.__init__ = original
            stats = seen[-1].stats() if seen else {}
            same = fast == eager
            replayed = stats.get("replays", 0) > 0
            ok &= same and replayed
            verdict = "ok" if same and replayed else ("TOKENS DIFFER" if not same else "NOT REPLAYED")
            print(f"graphs {name}: {verdict} {stats} ({time.perf_counter() - t0:.1f} s)", flush=True)
        except Exception as exc:  # report and go on: one policy's failure must not hide the others'
            ok = False
            print(f"graphs {name}: FAILED {type(exc).__name__}: {str(exc)[:400]}", flush=True)
    return ok


def check_kernel(device: str) -> bool:
    if not available():
        print("kernel: Triton not available here: skipped", flush=True)
        return True
    from kvpolicy.kernels.paged_decode import paged_decode_attention

    ok = True
    g = torch.Generator().manual_seed(0)
    for n in (100, 4096, 32768):  # entries per row: 8 KV heads, 32 query heads, d 128 (Llama-3.1-8B)
        parts = []
        for _ in range(2):
            key, value = torch.randn(8, n, 128, generator=g), torch.randn(8, n, 128, generator=g)
            parts.append(
                (
                    key.to(device, torch.bfloat16),
                    value.to(device, torch.bfloat16),
                    torch.arange(n, device=device).expand(8, -1),
                    None,
                )
            )
        layer = PagedLayer()
        layer.store(parts, reserve=16)
        q = torch.randn(2, 32, 1, 128, generator=g).to(device, torch.bfloat16)
        exact, exact_p = paged_attention(q.float(), _as_float(layer), 128**-0.5, want_probs=True)
        out, probs = paged_decode_attention(q, layer, 128**-0.5, want_probs=True)
        err = ((out.float() - exact).norm() / exact.norm()).item()
        perr = ((probs - exact_p).abs().max()).item()
        good = err < 1e-2 and perr < 1e-3
        ok &= good
        print(
            f"kernel n={n}: output rel. error {err:.2e}, probs max abs error {perr:.1e}: {'ok' if good else 'FAILED'}",
            flush=True,
        )
    return ok


def _as_float(layer: PagedLayer) -> PagedLayer:
    """The same cache with fp32 pools (the reference the bf16 kernel is measured against)."""
    import copy

    twin = copy.copy(layer)
    twin.k_pool, twin.v_pool = layer.k_pool.float(), layer.v_pool.float()
    return twin


def main() -> int:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"gpu_check on {device}", flush=True)
    ok = check_graphs(device)
    if device == "cuda":
        ok &= check_kernel(device)
    print("gpu_check:", "all ok" if ok else "FAILURES above", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
