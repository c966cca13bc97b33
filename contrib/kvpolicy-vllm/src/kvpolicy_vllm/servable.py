"""Which kvpolicy policies vLLM can serve, and the per-request setting that names one.

vLLM's paged KV cache gives each layer one block table per request: a block holds ``block_size``
token slots for *every* KV head of the layer. So a policy can be served when, after a request's
prefill, each layer keeps the same number of entries for every KV head (each head may keep different
tokens in the same slots: the slots are compacted per head), and when every layer sees every prompt
token (vLLM runs each layer over the whole prompt). That rules out:

* propagation policies (TSP, GemFilter, PyramidInfer): they change which tokens later layers see;
* per-head budgets (AdaKV, DuoAttention): a different count per KV head needs per-head block tables,
  which vLLM's blocks do not have;
* per-layer budgets (PyramidKV, CAKE): vLLM's layers share one block table and length per request;
* decode-time eviction (H2O, TOVA's decode, PyramidInfer's squeeze): the integration compresses once,
  after prefill; running a policy's prefill selection alone would be a different method.

Per-head and per-layer counts are found by running the policy's own selection on synthetic layers
(random keys, two KV heads, two layers): the core knows no policy by name, and neither does this check.

The setting travels as vLLM carries per-request extras: ``SamplingParams(extra_args={"kvpolicy":
"snapkv:kv_budget=0.25"})`` offline, and in the OpenAI-compatible server the request body's
``vllm_xargs`` (flat values only, so the same string). The string is kvpolicy's policy spec
(``name:key=value,...``, as ``kvpolicy bench --policies`` takes it).
"""

from __future__ import annotations

from typing import Any

import torch
from kvpolicy.interfaces import LayerView, PerHead, Policy
from kvpolicy.state import RequestState

#: The key of ``SamplingParams.extra_args`` (and of the server's ``vllm_xargs``) that names a policy.
EXTRA_ARGS_KEY = "kvpolicy"


class NotServable(ValueError):
    """A policy vLLM cannot serve, or a bad per-request setting; the message names which and why."""


def servable_policy(spec: str, common: dict[str, Any] | None = None) -> Policy:
    """The policy a spec names (``"snapkv:kv_budget=0.25"``), checked servable by vLLM.

    Raises :class:`NotServable` naming the spec, the setting or the reason: an unknown preset, a bad
    setting (the preset's own validation message), or a policy whose shape vLLM's cache cannot hold."""
    from kvpolicy.bench.cli import parse_policy_spec

    if not isinstance(spec, str) or not spec.strip():
        raise NotServable(
            f"{EXTRA_ARGS_KEY}={spec!r}: expected a policy spec such as 'snapkv:kv_budget=0.25'"
        )
    try:
        _, policy = parse_policy_spec(spec.strip(), dict(common or {}))
    except Exception as exc:  # unknown preset, bad setting: kvpolicy's own message names it
        raise NotServable(f"{EXTRA_ARGS_KEY}={spec!r}: {exc}") from None
    why = why_not_servable(policy)
    if why:
        raise NotServable(f"{EXTRA_ARGS_KEY}={spec!r}: {why}")
    return policy


def policy_for_request(extra_args: dict[str, Any] | None, default: str | None = None) -> Policy | None:
    """The policy a request asks for through its ``extra_args`` (or the server-wide ``default`` spec),
    ``None`` when neither names one: such a request is served exactly as vLLM serves it."""
    spec = (extra_args or {}).get(EXTRA_ARGS_KEY, default)
    return None if spec is None else servable_policy(spec)


def why_not_servable(policy: Policy) -> str | None:
    """Why vLLM's paged cache cannot serve ``policy`` (``None``: it can)."""
    from kvpolicy.policies.full import AllTokens

    prop, cache = policy.propagation, policy.cache
    if not isinstance(prop, AllTokens):
        return (
            f"its propagation policy {type(prop).__name__} ({prop.kind!r}) changes which tokens later layers "
            f"see, but vLLM runs every layer over the whole prompt; serve a cache policy alone"
        )
    if cache.evicts_during_decode:
        return (
            f"{type(cache).__name__} ({cache.kind!r}) evicts during decode; the vLLM integration compresses once, "
            f"after prefill, and its prefill selection alone would be another method"
        )
    counts = [_kept_counts(policy, layer) for layer in (0, 1)]
    if any(c is None for c in counts):
        return (
            f"{type(cache).__name__} ({cache.kind!r}) keeps a different number of entries per KV head, but a vLLM "
            f"block holds every KV head of a layer: per-head counts would need per-head block tables"
        )
    if counts[0] != counts[1]:
        return (
            f"{type(cache).__name__} ({cache.kind!r}) keeps a different number of entries per layer "
            f"({counts[0]} and {counts[1]} of a {_TOKENS}-token prompt), but vLLM's layers share one length per request"
        )
    return None


_TOKENS = 1024


def _kept_counts(policy: Policy, layer: int, heads: int = 2, dim: int = 16) -> int | None:
    """How many entries the policy's prefill selection keeps per KV head at ``layer`` of a two-layer model,
    on a synthetic layer (random queries and keys, two KV heads of different spread, a budget-sized
    prompt); ``None`` when it keeps a different number per head (:class:`PerHead`) or cannot run on it."""
    gen = torch.Generator().manual_seed(0)
    key = torch.randn(1, heads, _TOKENS, dim, generator=gen)
    key[:, 1] *= 4.0  # heads that differ, so a head-adaptive policy splits its budget unevenly
    view = LayerView(
        layer=layer,
        num_layers=2,
        prompt_len=_TOKENS,
        positions=torch.arange(_TOKENS)[None],
        query=torch.randn(1, 2 * heads, _TOKENS, dim, generator=gen),
        key=key,
        value=torch.randn(1, heads, _TOKENS, dim, generator=gen),
        scaling=dim**-0.5,
    )
    try:
        keep = policy.cache.select(view, RequestState(prompt_len=_TOKENS, num_layers=2))
    except Exception:  # a policy that needs more than a synthetic layer (a head map): not shown safe
        return None
    if isinstance(keep, PerHead):
        return None
    return _TOKENS if keep is None else int(keep.shape[-1])
