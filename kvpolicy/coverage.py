"""Which architectures kvpolicy drives: a check per entry of transformers' causal-LM mapping.

Why (issue 13): "supports any decoder-only model" is a claim; this makes it a measured list. For each
``model_type`` in ``MODEL_FOR_CAUSAL_LM_MAPPING_NAMES`` a tiny random model is built offline (no
download) and run three ways on a 40-token prompt, longer than the 16-token sliding window every
sliding layer is given:

1. kvpolicy with full KV must reproduce plain transformers' greedy output, 16 new tokens, token for token;
2. keep-all settings (SnapKV with a budget above the prompt, FastKV with ``tsp_rate=1``) must reproduce it too;
3. SnapKV and FastKV with a 12-entry budget hold it on every full-attention layer and KV head, and
   sliding layers keep exactly their window.

Architectures kvpolicy cannot drive get the reason ``get_adapter`` gives. ``tests/test_coverage.py``
runs the check for every architecture and compares with the recorded results (``coverage.json``,
shipped with the package: ``kvpolicy list`` reads it); ``python -m kvpolicy.coverage --write``
re-records them and regenerates the table in ``docs/adapters.md``.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

#: The results recorded by the last ``python -m kvpolicy.coverage --write``.
RESULTS_PATH = Path(__file__).with_name("coverage.json")
#: The docs page whose table is generated from them, between these markers.
DOCS_PATH = Path(__file__).resolve().parent.parent / "docs" / "adapters.md"
BEGIN, END = "<!-- coverage:begin -->", "<!-- coverage:end -->"

TINY: dict[str, Any] = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "vocab_size": 128,
    "max_position_embeddings": 256,
    "pad_token_id": 0,
}
#: Latent-attention (MLA) sizes: the rotary part of each query and key is ``head_dim`` wide.
MLA: dict[str, Any] = {
    "kv_lora_rank": 32,
    "q_lora_rank": 32,
    "qk_rope_head_dim": 8,
    "qk_nope_head_dim": 8,
    "v_head_dim": 16,
    "head_dim": 8,
    # DeepSeek V3's grouped expert routing: one group of the tiny experts
    "n_group": 1,
    "topk_group": 1,
}
#: Mixture-of-experts sizes under the names the families use (unused names are ignored).
MOE: dict[str, Any] = {
    "num_experts": 4,
    "num_local_experts": 4,
    "n_routed_experts": 4,
    "num_experts_per_tok": 2,
    "moe_intermediate_size": 32,
    "shared_expert_intermediate_size": 32,
}
#: Hybrid families whose tiny default has no attention layer, or whose config computes its layer
#: pattern from other settings: these give a tiny model recurrent layers 0 and 2 and attention layers
#: 1 and 3 (other hybrids get ``layer_types`` in that pattern).
HYBRID: dict[str, dict[str, Any]] = {
    "jamba": {"attn_layer_period": 2, "attn_layer_offset": 1},
    "granitemoehybrid": {"layer_types": ["linear_attention", "full_attention"] * 2},
    "kimi_linear": {"layer_types": ["linear_attention", "full_attention"] * 2},
    "bailing_hybrid": {"layer_types": ["linear_attention", "full_attention"] * 2},
    "bamba": {"attn_layer_indices": [1, 3]},
    "lfm2": {"layer_types": ["conv", "full_attention"] * 2},
    "lfm2_moe": {"layer_types": ["conv", "full_attention"] * 2},
    # an MLP-only layer too: a layer that keeps nothing at all
    "nemotron_h": {"layer_types": ["linear_attention", "full_attention", "mlp", "full_attention"]},
}
WINDOW = 16
PROMPT, NEW, BUDGET = 40, 16, 12
#: Above this many parameters the "tiny" config did not take (a composite config): not built.
MAX_PARAMS = 25_000_000


@dataclass(frozen=True)
class Result:
    """One architecture's outcome: ``status`` is ``covered``, ``refused``, ``differs`` or ``not built``."""

    model_type: str
    architecture: str
    status: str
    detail: str = ""
    sliding: bool = False
    adapter: str = ""


def tiny_config(model_type: str) -> Any:
    """A tiny config of ``model_type``, every sliding window set to :data:`WINDOW`."""
    from transformers import AutoConfig

    extra: dict[str, Any] = {**TINY, **MOE}
    try:
        config = AutoConfig.for_model(model_type, **extra)
    except AttributeError as exc:  # head_dim derived from the widths, not settable (Falcon)
        if "head_dim" not in str(exc):
            raise
        extra.pop("head_dim")
        config = AutoConfig.for_model(model_type, **extra)
    if isinstance(getattr(config, "kv_lora_rank", None), int):  # latent attention (MLA): tiny latent sizes
        extra.update(MLA)
        config = AutoConfig.for_model(model_type, **extra)
    if isinstance(getattr(config, "attention_chunk_size", None), int):  # Llama 4: chunks the prompt passes
        extra["attention_chunk_size"] = WINDOW
        config = AutoConfig.for_model(model_type, **extra)
    if isinstance(getattr(config, "rotary_dim", None), int):  # GPT-J, CodeGen: rotate part of each head
        extra["rotary_dim"] = TINY["head_dim"] // 2
        config = AutoConfig.for_model(model_type, **extra)
    if isinstance(getattr(config, "sliding_window", None), int) or getattr(config, "layer_types", None):
        extra["sliding_window"] = WINDOW
        if model_type == "gemma3_text":
            extra["query_pre_attn_scalar"] = TINY["head_dim"]
        if "use_sliding_window" in config.to_dict():
            extra.update(use_sliding_window=True, max_window_layers=2)
        if getattr(config, "layer_types", None) and "sliding_attention" in config.layer_types:
            extra["layer_types"] = ["sliding_attention", "full_attention"] * (TINY["num_hidden_layers"] // 2)
        config = AutoConfig.for_model(model_type, **extra)
    types = set(getattr(config, "layer_types", None) or [])
    attention = {"full_attention", "sliding_attention", "chunked_attention"}
    recurrent = sorted(types & {"linear_attention", "conv", "mamba"})
    if model_type in HYBRID or (recurrent and types & attention):  # hybrids: recurrent and attention layers
        extra.update(
            HYBRID[model_type]
            if model_type in HYBRID
            else {"layer_types": [recurrent[0], "full_attention"] * 2}
        )
        config = AutoConfig.for_model(model_type, **extra)
    config.eos_token_id = None  # random weights: generate the full length
    return config


def _build(model_type: str) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    config = tiny_config(model_type)
    for attn in ("sdpa", "eager"):  # families without SDPA (Gemma 2, GPT-OSS) run eager
        config._attn_implementation = attn
        try:
            with torch.device("meta"):
                probe = AutoModelForCausalLM.from_config(config)
        except ValueError as exc:
            if attn == "sdpa" and "does not support an attention implementation" in str(exc):
                continue
            raise
        n = sum(p.numel() for p in probe.parameters())
        if n > MAX_PARAMS:
            raise ValueError(
                f"the tiny settings did not apply ({n / 1e6:.0f}M parameters; a composite config?)"
            )
        torch.manual_seed(0)
        return AutoModelForCausalLM.from_config(config).eval()
    raise AssertionError("unreachable")


def check(model_type: str) -> Result:
    """Run the three checks on a tiny ``model_type`` (see the module docstring)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    import kvpolicy

    arch = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(model_type, "?")
    if isinstance(arch, tuple | list):
        arch = arch[0]
    try:
        model = _build(model_type)
    except Exception as exc:
        return Result(model_type, arch, "not built", _short(exc))
    arch = type(model).__name__
    try:
        adapter = kvpolicy.get_adapter(model)
    except Exception as exc:
        from kvpolicy.adapters.generic import why_unsupported

        why = why_unsupported(model) or str(exc).removeprefix(f"{arch}: ").split(" (generic adapter)")[0]
        return Result(model_type, arch, "refused", why.removeprefix(f"{arch} ").removeprefix(f"{arch}'s "))
    windows = list(getattr(adapter, "windows", [None] * adapter.num_layers))
    chunks = list(getattr(adapter, "chunks", [None] * adapter.num_layers))
    sliding = any(w is not None for w in windows) or any(c is not None for c in chunks)
    row = {"model_type": model_type, "architecture": arch, "sliding": sliding, "adapter": adapter.name}
    ids = torch.randint(1, 128, (1, PROMPT), generator=torch.Generator().manual_seed(3))
    try:
        with torch.no_grad():
            want = model.generate(ids, max_new_tokens=NEW, do_sample=False, pad_token_id=0)[
                0, PROMPT:
            ].tolist()
        # the TSP layer: layer 1, or on a hybrid the first attention layer with a layer after it
        tsp = next((i for i in adapter.attention_layers if 1 <= i < adapter.num_layers - 1), 1)
        settings = {
            "full KV": kvpolicy.get_policy("fullkv"),
            "keep-all SnapKV": kvpolicy.get_policy("snapkv", kv_budget=4 * PROMPT),
            "keep-all FastKV": kvpolicy.get_policy(
                "fastkv", kv_budget=4 * PROMPT, tsp_layer=tsp, tsp_rate=1.0
            ),
        }
        for what, policy in settings.items():
            got = kvpolicy.generate(model, None, input_ids=ids, policy=policy, max_new_tokens=NEW).token_ids
            if got != want:
                first = next(i for i, (a, b) in enumerate(zip(got, want, strict=False)) if a != b)
                return Result(
                    **row, status="differs", detail=f"{what}: token {first} differs from transformers"
                )
        for name, extra in (("snapkv", {}), ("fastkv", {"tsp_layer": tsp, "tsp_rate": 0.5})):
            pre = kvpolicy.prefill(model, ids, kvpolicy.get_policy(name, kv_budget=BUDGET, **extra))
            tokens = pre.states[0].tokens_per_layer
            for i, (lengths, window, chunk, n) in enumerate(
                zip(pre.cache.kv_head_lengths(), windows, chunks, tokens, strict=True)
            ):
                if not adapter.attends[i]:  # a recurrent layer: its state, no entries
                    if lengths:
                        return Result(
                            **row, status="differs", detail=f"{name}: recurrent layer {i} keeps {lengths}"
                        )
                    continue
                # sliding layers keep the last window - 1 positions, chunked layers the last prompt
                # token's chunk: all of those without TSP, those of the propagated tokens with TSP
                local = window is not None or chunk is not None
                expect = (
                    BUDGET
                    if not local
                    else min(n, window - 1)
                    if window is not None
                    else (PROMPT - 1) % chunk + 1
                )
                held = set(lengths) == {expect} if not local or name == "snapkv" else max(lengths) <= expect
                if not held:
                    return Result(
                        **row, status="differs", detail=f"{name}: layer {i} keeps {lengths}, not {expect}"
                    )
    except Exception as exc:
        return Result(**row, status="differs", detail=_short(exc))
    return Result(**row, status="covered")


def _short(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".splitlines()[0]
    return text if len(text) <= 160 else text[:157] + "..."


def model_types() -> list[str]:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


def recorded() -> dict[str, Result]:
    """The recorded results, by ``model_type`` (empty if none were recorded)."""
    if not RESULTS_PATH.is_file():
        return {}
    data = json.loads(RESULTS_PATH.read_text())
    return {r["model_type"]: Result(**r) for r in data["results"]}


def render(results: list[Result]) -> str:
    """The markdown table of ``docs/adapters.md`` (between the coverage markers)."""
    covered = [r for r in results if r.status == "covered"]
    lines = [
        f"{len(covered)} of {len(results)} architectures in transformers' causal-LM mapping pass every check "
        f"(equal to transformers with full KV and with keep-all settings, {NEW} new tokens on a {PROMPT}-token "
        f"prompt past {WINDOW}-token windows; SnapKV and FastKV budgets held per layer and KV head).",
        "",
        "| model_type | class | result | adapter | sliding layers | why |",
        "|---|---|---|---|---|---|",
    ]
    order = {"covered": 0, "differs": 1, "refused": 2, "not built": 3}
    for r in sorted(results, key=lambda r: (order.get(r.status, 9), r.model_type)):
        detail = r.detail.replace("|", "\\|")
        slides = "yes" if r.sliding else ""
        lines.append(
            f"| `{r.model_type}` | {r.architecture} | {r.status} | {r.adapter} | {slides} | {detail} |"
        )
    return "\n".join(lines)


def write(results: list[Result]) -> None:
    """Record ``results`` and regenerate the table in ``docs/adapters.md``."""
    import transformers

    payload = {"transformers": transformers.__version__, "results": [asdict(r) for r in results]}
    RESULTS_PATH.write_text(json.dumps(payload, indent=1) + "\n")
    if DOCS_PATH.is_file():
        text = DOCS_PATH.read_text()
        head, _, rest = text.partition(BEGIN)
        _, _, tail = rest.partition(END)
        DOCS_PATH.write_text(f"{head}{BEGIN}\n{render(results)}\n{END}{tail}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m kvpolicy.coverage", description=__doc__.splitlines()[0])
    parser.add_argument("model_types", nargs="*", help="only these (default: the whole mapping)")
    parser.add_argument(
        "--write", action="store_true", help="record the results and regenerate the docs table"
    )
    args = parser.parse_args(argv)
    results = []
    for model_type in args.model_types or model_types():
        start = time.perf_counter()
        result = check(model_type)
        results.append(result)
        print(
            f"{model_type:28s} {result.status:9s} {time.perf_counter() - start:5.1f}s {result.detail}",
            flush=True,
        )
    if args.write:
        write(results)


if __name__ == "__main__":
    main()
