"""Correctness on CUDA before any timing (stage 0 of bench/gpu-h200.sh): for every built-in preset,
graph-replayed decode (``generate(..., graphs=True)``: real CUDA graphs here) gives the same logits as
eager decode on a tiny fp32 Llama, within a tolerance, and the same greedy tokens except at a near tie
(a top-2 gap below that tolerance, where random weights may flip a pick without any bug; the smallest
gap and the largest logit difference are printed), and replays; then the Triton decode kernel against
the torch paged attention at the 8B shape's head layout in bf16 (relative error of the output against
an fp32 torch run). On a CPU only the first part runs (graphs through kvpolicy.graphs' traced stand-in).

Plain Python (the GPU machine has no pytest); prints one line per check as it goes and exits non-zero if
any failed. Run from the repository root with the installed package, not the source folder:
``PYTHONSAFEPATH=1 python bench/gpu_check.py`` (its data file is found beside this file's folder)."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import kvpolicy
import kvpolicy.generation
import kvpolicy.graphs
from kvpolicy.cache import PagedLayer, paged_attention
from kvpolicy.kernels import available

#: Tolerance on graph-replayed decode's logits against eager decode's, relative to the largest logit
#: at that step (the tiny random model's are ~0.4, its top-2 gaps down to ~1e-4; fp32 rounding across
#: different reduction orders is ~1e-6 relative, and a replay of the same kernels is exact): the max
#: absolute difference at any compared step, and the top-2 gap below which a flipped greedy token is
#: a near tie rather than a bug.
RTOL = 1e-4
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


class _Recorder:
    """Records the logits every greedy pick sees (``kvpolicy.generation._Sampler``, the one sampler of
    the decode loop), as fp32 host copies: one ``(B, V)`` tensor per step, the prefill's logits first.
    A copy is taken at each call, before the next step (a replayed graph rewrites its output buffer)."""

    def __init__(self) -> None:
        self.steps: list[torch.Tensor] = []

    def __enter__(self) -> _Recorder:
        self._original = original = kvpolicy.generation._Sampler.__call__

        def call(sampler, logits, _steps=self.steps):
            _steps.append(logits.detach().float().clone())
            return original(sampler, logits)

        kvpolicy.generation._Sampler.__call__ = call
        return self

    def __exit__(self, *exc: object) -> None:
        kvpolicy.generation._Sampler.__call__ = self._original


def compare(
    eager: list[list[int]],
    fast: list[list[int]],
    eager_logits: list[torch.Tensor],
    fast_logits: list[torch.Tensor],
) -> tuple[bool, str]:
    """Whether graph-replayed decode agrees with eager decode, and one line saying how closely.

    Per sequence, step by step while both have tokens: the logits must agree within :data:`RTOL` of
    the step's largest eager logit (max absolute difference), and the greedy tokens must be equal,
    except at a step where eager's top-2 gap is itself below that tolerance: there a difference within
    tolerance may flip the pick (a near tie of random weights, not a bug), and the two sequences are not
    compared past it."""
    ok, margin, worst, scale, ties = True, float("inf"), 0.0, 0.0, []
    for b, (e_ids, f_ids) in enumerate(zip(eager, fast, strict=True)):
        for t in range(min(len(e_ids), len(f_ids), len(eager_logits), len(fast_logits))):
            e, f = eager_logits[t][b], fast_logits[t][b]
            tol = RTOL * e.abs().max().item()
            top2 = e.topk(2).values
            gap = (top2[0] - top2[1]).item()
            diff = (e - f).abs().max().item()
            margin, scale = min(margin, gap), max(scale, e.abs().max().item())
            worst = max(worst, diff)
            ok &= diff <= tol
            if e_ids[t] != f_ids[t]:
                near = gap < tol
                ok &= near
                ties.append(f"seq {b} step {t} ({'near tie' if near else 'DIFFERS'}, gap {gap:.1e})")
                break
        else:
            if len(e_ids) != len(f_ids):
                ok = False
                ties.append(f"seq {b} lengths {len(e_ids)} vs {len(f_ids)}")
    line = (
        f"smallest top-2 margin {margin:.1e}, max |logit diff| {worst:.1e} "
        f"(tolerance {RTOL:.0e} of the largest logit, up to {scale:.2f})"
    )
    if ties:
        line += "; tokens split at " + ", ".join(ties)
    return ok, line


def check_graphs(device: str) -> bool:
    model = tiny_model(device)
    # Longest first: generate() batches in that order, so the recorded rows are the prompts' order.
    prompts = [
        torch.randint(0, 128, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (100, 71)
    ]
    ok = True
    for name, options in PRESETS.items():
        policy = kvpolicy.get_policy(name, **options)
        t0 = time.perf_counter()
        try:
            kwargs = {"input_ids": prompts, "policy": policy, "max_new_tokens": 40}
            with _Recorder() as eager_rec:
                eager = [o.token_ids for o in kvpolicy.generate(model, None, **kwargs)]
            seen = []
            original = kvpolicy.graphs.DecodeGraphs.__init__

            def spy(self, *args, _orig=original, _seen=seen):
                _orig(self, *args)
                _seen.append(self)

            kvpolicy.graphs.DecodeGraphs.__init__ = spy
            try:
                with _Recorder() as fast_rec:
                    fast = [o.token_ids for o in kvpolicy.generate(model, None, graphs=True, **kwargs)]
            finally:
                kvpolicy.graphs.DecodeGraphs.__init__ = original
            stats = seen[-1].stats() if seen else {}
            same, how = compare(eager, fast, eager_rec.steps, fast_rec.steps)
            replayed = stats.get("replays", 0) > 0
            ok &= same and replayed
            verdict = "ok" if same and replayed else ("DIFFER" if not same else "NOT REPLAYED")
            print(f"graphs {name}: {verdict}: {how} {stats} ({time.perf_counter() - t0:.1f} s)", flush=True)
        except Exception as exc:  # report and go on: one policy's failure must not hide the others'
            ok = False
            print(f"graphs {name}: FAILED {type(exc).__name__}: {str(exc)[:400]}", flush=True)
    return ok


def check_kernel(device: str) -> bool:
    if not available():
        print("kernel: Triton not available here: skipped", flush=True)
        return True

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
        ok &= _kernel_matches(q, layer, f"kernel n={n}")
    return ok


def check_quantized_kernel(
    device: str, sizes: tuple[int, ...] = (100, 4096), dtype: torch.dtype = torch.bfloat16
) -> bool:
    """The compiled kernel over quantized pages (per token and KIVI's layout) against the torch path over
    the same layer (its pages dequantized): after prefill, decode appends (KIVI's residual fills and
    flushes) and an eviction that moves entries. Llama-3.1-8B's heads, bf16 (``dtype``: Triton's
    interpreter rounds to bf16 otherwise than a GPU does, so a CPU dry run passes float16)."""
    if not available():
        print("quantized kernel: Triton not available here: skipped", flush=True)
        return True
    from kvpolicy.cache import paged_layer
    from kvpolicy.storage import KVStorage

    ok = True
    g = torch.Generator().manual_seed(1)
    for name in ("int8", "fp8", "int4", "kivi4", "kivi2"):
        for n in sizes:
            parts = [
                (
                    torch.randn(8, n, 128, generator=g).to(device, dtype),
                    torch.randn(8, n, 128, generator=g).to(device, dtype),
                    torch.arange(n, device=device).expand(8, -1),
                    None,
                )
            ]
            layer = paged_layer(64, KVStorage.parse(name))
            layer.store(parts, reserve=48)
            for t in range(40):  # KIVI's residual of 32 fills and flushes
                kv = torch.randn(2, 1, 8, 1, 128, generator=g).to(device, dtype)
                layer.append(kv[0], kv[1], torch.tensor([n + t], device=device))
            layer.evict(torch.tensor([[[3]] * 8], device=device))
            q = torch.randn(1, 32, 1, 128, generator=g).to(device, dtype)
            ok &= _kernel_matches(q, layer, f"kernel {name} n={n}")
    return ok


def _kernel_matches(q: torch.Tensor, layer: PagedLayer, label: str) -> bool:
    """The kernel's output and probabilities against fp32 attention over what ``layer`` stores (output
    relative error < 1e-2, probabilities < 1e-3), printed under ``label``."""
    from kvpolicy.kernels.paged_decode import paged_decode_attention

    exact, exact_p = paged_attention(q.float(), _as_float(layer), 128**-0.5, want_probs=True)
    out, probs = paged_decode_attention(q, layer, 128**-0.5, want_probs=True)
    err = ((out.float() - exact).norm() / exact.norm()).item()
    perr = ((probs - exact_p).abs().max()).item()
    good = err < 1e-2 and perr < 1e-3
    print(
        f"{label}: output rel. error {err:.2e}, probs max abs error {perr:.1e} (vs fp32 over the stored "
        f"cache): {'ok' if good else 'FAILED'}",
        flush=True,
    )
    return good


def _as_float(layer: PagedLayer) -> PagedLayer:
    """A plain layer holding ``layer``'s entries in fp32 pools (a quantized one's dequantized): the
    reference the bf16 kernel is measured against."""
    import copy

    twin = copy.copy(layer)
    twin.__class__ = PagedLayer
    twin.k_pool, twin.v_pool = layer.k_pool.float(), layer.v_pool.float()
    return twin


def main() -> int:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"gpu_check on {device}", flush=True)
    ok = check_graphs(device)
    if device == "cuda":
        ok &= check_kernel(device)
        ok &= check_quantized_kernel(device)
    print("gpu_check:", "all ok" if ok else "FAILURES above", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
