"""Requests that fit and tokens/s at a fixed KV memory, full KV beside kvpolicy's policies, in one vLLM
engine (``python -m kvpolicy_vllm.bench``; ``docs/serving.md`` has the figures it gave).

One engine serves every setting in turn (the policy is per request), so each sees the same model,
the same KV pool (``--blocks`` blocks: ``num_gpu_blocks_override``) and the same requests (needle
prompts of ``--length`` tokens). For each setting it reports, side by side:

* **peak running**: the most requests vLLM's scheduler ran at once, and the **bound** beside it: the
  pool's blocks over the blocks one request holds right after its prefill (its kept entries and the
  first new token), the most that could run at once;
* **preempted**: requests the scheduler preempted for want of blocks (each is prefilled again);
* **tokens/s**: generated tokens over the wall time of the whole set, and the ratio to full KV.

A prompt is admitted only when its whole prompt fits (vLLM writes it before the policy compresses), and
the running requests grow as they answer (preempting others when the pool runs out), so the peak trails
the bound. Runs on vLLM's CPU build here;
the same script runs wherever vLLM runs (on CUDA the plugin refuses compressed requests so far:
``docs/serving.md``).
"""

from __future__ import annotations

import argparse
import os
import time
from typing import Any

DEFAULT_SETTINGS = ("fullkv", "snapkv:kv_budget=0.5", "snapkv:kv_budget=0.25", "snapkv:kv_budget=0.1")


def run_setting(llm: Any, prompts: list[list[int]], spec: str, new_tokens: int) -> dict[str, Any]:
    """Serve ``prompts`` under ``spec`` to completion, stepping the engine to watch its scheduler."""
    import vllm

    engine = llm.llm_engine
    scheduler = engine.engine_core.engine_core.scheduler
    params = vllm.SamplingParams(
        max_tokens=new_tokens, temperature=0.0, ignore_eos=True, extra_args={"kvpolicy": spec}
    )
    ids = [f"{spec}-{i}" for i in range(len(prompts))]
    start = time.perf_counter()
    for rid, prompt in zip(ids, prompts, strict=True):
        engine.add_request(rid, vllm.TokensPrompt(prompt_token_ids=prompt), params)
    peak, generated, preempted = 0, 0, set()
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                generated += len(out.outputs[0].token_ids)
        peak = max(peak, len(scheduler.running))
        preempted |= {rid for rid, r in scheduler.requests.items() if r.num_preemptions}
    seconds = time.perf_counter() - start
    return {"peak": peak, "preempted": len(preempted), "generated": generated, "seconds": seconds}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m kvpolicy_vllm.bench", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--model", default=None, help="model folder (default: kvpolicy's embedded model)")
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--length", type=int, default=1000, help="prompt tokens per request")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--blocks", type=int, default=64, help="the KV pool, in vLLM blocks")
    parser.add_argument("--settings", nargs="+", default=list(DEFAULT_SETTINGS))
    parser.add_argument("--dtype", default="float32")
    args = parser.parse_args(argv)

    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the scheduler in this process, to watch
    import vllm
    from kvpolicy.eval import needle
    from kvpolicy.models import embedded_model_dir
    from transformers import AutoTokenizer

    from kvpolicy_vllm.paged import blocks_for
    from kvpolicy_vllm.servable import kept_count, request_spec

    for spec in args.settings:
        request_spec({"kvpolicy": spec})  # a bad setting is named before the engine starts
    path = args.model or str(embedded_model_dir())
    tokenizer = AutoTokenizer.from_pretrained(path)
    haystack = needle.load_haystack(needle.find_haystack_dir())
    prompts = [
        needle.build_sample(tokenizer, args.length, (i + 0.5) / args.requests, haystack).input_ids
        for i in range(args.requests)
    ]
    llm = vllm.LLM(
        model=path,
        dtype=args.dtype,
        max_model_len=max(len(p) for p in prompts) + args.new_tokens,
        enable_chunked_prefill=False,
        max_num_batched_tokens=max(16384, max(len(p) for p in prompts)),
        enable_prefix_caching=False,
        enforce_eager=True,
        num_gpu_blocks_override=args.blocks,
        seed=0,
    )
    scheduler = llm.llm_engine.engine_core.engine_core.scheduler
    block = scheduler.kv_cache_manager.coordinator.single_type_managers[0].block_size
    run_setting(llm, prompts[:2], "fullkv", 4)  # warm-up: first-call costs out of the figures
    print(
        f"vLLM {vllm.__version__}, {path}, {args.requests} requests of {args.length} tokens, "
        f"{args.new_tokens} new each, KV pool {args.blocks} blocks of {block} tokens"
    )
    print(
        f"{'setting':<24} {'kept':>5} {'peak running':>12} {'bound':>5} {'preempted':>9} {'tok/s':>7} {'x full':>6}"
    )
    base = None
    for spec in args.settings:
        kept = args.length if request_spec({"kvpolicy": spec}) is None else kept_count(spec, args.length)
        bound = min(args.requests, args.blocks // blocks_for(kept + 1, block))
        got = run_setting(llm, prompts, spec, args.new_tokens)
        rate = got["generated"] / got["seconds"]
        base = base or rate
        print(
            f"{spec:<24} {kept:>5} {got['peak']:>12} {bound:>5} {got['preempted']:>9} {rate:>7.1f} {rate / base:>6.2f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
