"""Half (a) of the kvpress parity harness, run by ``.venv-kvpress/bin/python`` (kvpress 0.5.5 and
the transformers it pins); imports nothing of kvpolicy.

For each method x ratio x length of ``methods.METHODS`` it runs the press over the context's token
ids (prefill only, fp32, SDPA, one thread) and records, per layer and KV head, which of the ``T``
prompt positions the press keeps:

* pruning presses (``ScorerPress`` and friends) gather the kept keys: each kept key is found again
  among the keys the press was given (exact float match of a random projection of each key row);
* head-wise presses (AdaKV, DuoAttention) keep every key and set ``module.masked_key_indices``: the
  kept positions are those not masked.

Writes ``OUT/kept_kvpress.npz``: key ``"method|ratio|length"``, a ``(layers, kv_heads, ceil(T/8))``
``np.packbits`` mask.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import kvpress
import numpy as np
import torch
from kvpress import DuoAttentionPress, QFilterPress
from methods import METHODS, RATIOS


@dataclass
class InjectedDuoAttentionPress(DuoAttentionPress):
    """kvpress's DuoAttentionPress with kvpolicy's calibrated head map instead of the hub download
    (the official patterns cover 7-8B models only; SmolLM2 has none)."""

    head_map: str = ""

    def load_attention_pattern(self, model):  # type: ignore[override]
        data = json.loads(Path(self.head_map).read_text())
        scores = np.clip(np.asarray(data["head_map"], dtype=float), 0, 1)
        return int(data.get("sink", 64)), int(data.get("recent", 256)), scores


@dataclass
class InjectedQFilterPress(QFilterPress):
    """kvpress's QFilterPress with the filters kvpolicy measured (``kvpolicy calibrate --qfilters``)
    instead of the hub's ``nthngdy/<model>_qfilt`` (none exists for SmolLM2)."""

    filters: str = ""

    def post_init_from_model(self, model):  # type: ignore[override]
        data = json.loads(Path(self.filters).read_text())["filters"]
        self.q_filters = torch.tensor(data, dtype=model.dtype)


def qfilter_press(compression_ratio: float, filters: str) -> InjectedQFilterPress:
    return InjectedQFilterPress(compression_ratio=compression_ratio, filters=filters)


def duo_press(head_compression_ratio: float, head_map: str) -> InjectedDuoAttentionPress:
    return InjectedDuoAttentionPress(head_compression_ratio=head_compression_ratio, head_map=head_map)


def _row_hash(keys: torch.Tensor, probe: torch.Tensor) -> torch.Tensor:
    """An exact hash of each key row: its float32 bit patterns times random int64 coefficients, summed
    with int64 wrap-around (integer sums do not depend on the order a float matmul would take)."""
    return (keys.float().contiguous().view(torch.int32).long() * probe).sum(-1)


def capture(press, record: dict[int, torch.Tensor]):
    """Wrap ``press.compress`` so each layer's kept mask ``(H_kv, T)`` lands in ``record``."""
    original = press.compress

    def compress(module, hidden_states, keys, values, attentions, kwargs):
        if hasattr(module, "masked_key_indices"):
            del module.masked_key_indices
        b, h, t, d = keys.shape
        assert b == 1
        probe = torch.randint(1, 2**62, (d,), dtype=torch.int64, generator=torch.Generator().manual_seed(0))
        before = _row_hash(keys[0], probe)  # (H, T)
        new_keys, new_values = original(module, hidden_states, keys, values, attentions, kwargs)
        kept = torch.zeros(h, t, dtype=torch.bool)
        if new_keys.shape[2] < t:
            after = _row_hash(new_keys[0], probe)  # (H, n)
            for head in range(h):
                order = torch.argsort(before[head])
                at = torch.searchsorted(before[head][order], after[head]).clamp(max=t - 1)
                found = order[at]
                assert torch.equal(before[head][found], after[head]), (
                    f"layer {module.layer_idx}: a kept key is not an input key"
                )
                kept[head, found] = True
        else:
            kept[:] = True
            masked = getattr(module, "masked_key_indices", None)
            if masked is not None:
                if isinstance(masked, tuple):
                    _, heads, seqs = (x.cpu() for x in masked)
                    kept[heads, seqs] = False
                else:
                    kept &= ~masked[0].cpu()
        record[module.layer_idx] = kept
        return new_keys, new_values

    press.compress = compress


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--methods", nargs="*", default=None)
    ap.add_argument("--ratios", type=float, nargs="*", default=list(RATIOS))
    ap.add_argument("--lengths", type=int, nargs="*", default=None)
    ap.add_argument(
        "--file",
        default="kept_kvpress.npz",
        help="output file under --out (compare.py reads kept_kvpress*.npz)",
    )
    args = ap.parse_args()
    torch.set_num_threads(1)
    context = json.loads((args.out / "context.json").read_text())
    from transformers import AutoModelForCausalLM, DynamicCache

    model = AutoModelForCausalLM.from_pretrained(
        context["model_dir"], dtype=torch.float32, attn_implementation="sdpa"
    ).eval()
    names = {k: getattr(kvpress, k) for k in dir(kvpress) if k.endswith("Press")}
    names.update(duo_press=duo_press, qfilter_press=qfilter_press)
    path = args.out / args.file
    results = dict(np.load(path)) if path.exists() else {}
    language_model = model.model
    for _length, plain_ids in context["ids"].items():
        T = len(plain_ids)
        if args.lengths and T not in args.lengths:
            continue
        inputs = None  # each layer's hook arguments, recorded by one plain prefill (see replay)
        for method, row in METHODS.items():
            if args.methods and method not in args.methods:
                continue
            ids = context["chat_prefix"] + plain_ids if row.get("context") == "chat" else plain_ids
            for r in args.ratios:
                n = max(1, int(T * (1 - r)))
                env = {
                    "r": r,
                    "n": n,
                    "T": T,
                    "head_map": context["head_map"],
                    "qfilters": context["qfilters"],
                }
                try:
                    press = eval(row["press"], dict(names), env)
                except Exception as exc:  # a press this kvpress lacks
                    print(f"{method}: skipped ({exc})", file=sys.stderr)
                    break
                record: dict[int, torch.Tensor] = {}
                capture(press, record)
                t0 = time.perf_counter()
                if not replayable(press):
                    for layer in language_model.layers:
                        if hasattr(layer.self_attn, "masked_key_indices"):
                            del layer.self_attn.masked_key_indices
                if replayable(press):
                    if inputs is None:
                        inputs = record_inputs(model, ids)
                    press.post_init_from_model(model)
                    with torch.no_grad():
                        for layer, (hidden, keys, values, kwargs) in zip(
                            language_model.layers, inputs, strict=True
                        ):
                            layer.self_attn.rotary_emb = language_model.rotary_emb
                            press.compress(
                                layer.self_attn, hidden, keys.clone(), values.clone(), None, kwargs
                            )
                else:
                    with torch.no_grad(), press(model):
                        model(
                            input_ids=torch.tensor([ids]),
                            past_key_values=DynamicCache(config=model.config),
                            use_cache=True,
                            logits_to_keep=1,
                        )
                    if not record:  # KVzip: masks every layer after its reconstruction pass
                        for layer in language_model.layers:
                            kept = torch.ones(model.config.num_key_value_heads, len(ids), dtype=torch.bool)
                            masked = getattr(layer.self_attn, "masked_key_indices", None)
                            if masked is not None:
                                kept[masked[1].cpu(), masked[2].cpu()] = False
                            record[layer.self_attn.layer_idx] = kept
                kept = torch.stack([record[i] for i in range(len(record))]).numpy()
                results[f"{method}|{r}|{T}"] = np.packbits(kept, axis=-1)
                took = time.perf_counter() - t0
                print(
                    f"kvpress {method} r={r} T={T}: mean kept {kept.sum(-1).mean():.1f} ({took:.1f} s)",
                    flush=True,
                )
                np.savez_compressed(path, **results)


def replayable(press) -> bool:
    """Whether the press compresses through ``BasePress.forward_hook`` alone (then ``compress`` can be
    replayed on recorded layer inputs: the hook runs after the layer's attention, so the hidden states
    of a prefill never depend on the press, and one plain prefill serves every press and ratio).
    Presses with their own hook or context manager (KVzip's reconstruction pass, ...) run a real
    prefill under the press."""
    from kvpress.presses.base_press import BasePress

    cls = type(press)
    return cls.forward_hook is BasePress.forward_hook and cls.__call__ is BasePress.__call__


def record_inputs(model, ids: list[int]) -> list[tuple]:
    """Per layer: what ``BasePress.forward_hook`` hands ``compress`` (hidden states, the layer's keys
    and values from the cache, the attention's keyword arguments), from one plain prefill."""
    from transformers import DynamicCache

    inputs: list[tuple] = []

    def hook(module, args, kwargs, output):
        layer = kwargs["past_key_values"].layers[module.layer_idx]
        inputs.append((kwargs["hidden_states"], layer.keys.clone(), layer.values.clone(), dict(kwargs)))

    handles = [layer.self_attn.register_forward_hook(hook, with_kwargs=True) for layer in model.model.layers]
    try:
        with torch.no_grad():
            model(
                input_ids=torch.tensor([ids]),
                past_key_values=DynamicCache(config=model.config),
                use_cache=True,
                logits_to_keep=1,
            )
    finally:
        for handle in handles:
            handle.remove()
    return inputs


if __name__ == "__main__":
    main()
