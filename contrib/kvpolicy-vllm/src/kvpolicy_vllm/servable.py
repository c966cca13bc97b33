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

import functools
import os
from typing import Any

import torch
from kvpolicy.interfaces import CachePolicy, LayerView, PerHead, Policy
from kvpolicy.state import RequestState

#: The key of ``SamplingParams.extra_args`` (and of the server's ``vllm_xargs``) that names a policy.
EXTRA_ARGS_KEY = "kvpolicy"

#: The environment variable that gives a server-wide default spec (``KVPOLICY_DEFAULT=snapkv:kv_budget=0.25
#: vllm serve ...``): every vLLM process (API server, engine core, workers) inherits it, so the one
#: value reaches all of them; vLLM's own argument parser takes no options from plugins.
DEFAULT_ENV = "KVPOLICY_DEFAULT"

#: Specs that name no compression: a request that gives one opts out of a server-wide default.
NO_POLICY = frozenset({"", "none", "fullkv"})


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


@functools.lru_cache(maxsize=256)
def _cached_policy(spec: str) -> Policy:
    """:func:`servable_policy` once per spec: the engine asks for every request, and the check runs the
    policy on synthetic layers. Policies hold settings only (per-request state lives in the request's
    own object), so one instance serves every request that names the spec."""
    return servable_policy(spec)


def default_spec() -> str | None:
    """The server-wide default spec (environment variable :data:`DEFAULT_ENV`), ``None`` when unset."""
    spec = os.environ.get(DEFAULT_ENV)
    return spec if spec and spec.strip() else None


def request_spec(extra_args: dict[str, Any] | None, default: str | None = None) -> str | None:
    """The spec a request's ``extra_args`` names (a spec string, or offline a mapping
    ``{"policy": "snapkv", "kv_budget": 0.25}``), else ``default``, else :func:`default_spec`; ``None``
    when the request asks for no compression (no spec, or ``"fullkv"``/``"none"``).

    Raises :class:`NotServable` naming the setting and value when it is bad (checked once per spec)."""
    if extra_args and EXTRA_ARGS_KEY in extra_args:
        spec = extra_args[EXTRA_ARGS_KEY]
    else:
        spec = default if default is not None else default_spec()
    if isinstance(spec, dict):
        spec = _spec_from_mapping(spec)
    if spec is None or (isinstance(spec, str) and spec.strip().lower() in NO_POLICY):
        return None
    if not isinstance(spec, str):
        raise NotServable(
            f"{EXTRA_ARGS_KEY}={spec!r}: expected a policy spec string such as 'snapkv:kv_budget=0.25'"
        )
    _cached_policy(spec.strip())
    return spec.strip()


def _spec_from_mapping(setting: dict[str, Any]) -> str:
    """``{"policy": "snapkv", "kv_budget": 0.25}`` (offline ``extra_args`` may nest) -> ``"snapkv:kv_budget=0.25"``."""
    rest = {k: v for k, v in setting.items() if k != "policy"}
    name = setting.get("policy")
    if not isinstance(name, str) or not name.strip():
        raise NotServable(f"{EXTRA_ARGS_KEY}={setting!r}: a mapping names its policy under 'policy'")
    bad = {k: v for k, v in rest.items() if not isinstance(v, (str, int, float, bool)) or "," in str(v)}
    if bad:
        raise NotServable(f"{EXTRA_ARGS_KEY}={setting!r}: settings take single values, not {bad!r}")
    return name.strip() + (":" + ",".join(f"{k}={v}" for k, v in rest.items()) if rest else "")


def policy_for_request(extra_args: dict[str, Any] | None, default: str | None = None) -> Policy | None:
    """The policy a request asks for through its ``extra_args`` (or the server-wide default spec),
    ``None`` when none is named: such a request is served exactly as vLLM serves it."""
    spec = request_spec(extra_args, default)
    return None if spec is None else _cached_policy(spec)


@functools.lru_cache(maxsize=4096)
def kept_count(spec: str, prompt_len: int) -> int:
    """How many entries each layer keeps of a ``prompt_len``-token prompt under ``spec``.

    The scheduler frees a compressed request's tail blocks from this count before the worker's
    selection is known to it (they run in different places), and the worker checks its selection
    against it: a servable policy keeps the same count for every layer and KV head, and the count
    depends on the prompt's length only, so the policy's own selection on one synthetic layer gives it."""
    count = _kept_counts(_cached_policy(spec), 0, tokens=prompt_len, heads=1)
    if count is None:  # servable_policy ran the same selection: cannot happen for a servable spec
        raise NotServable(f"{EXTRA_ARGS_KEY}={spec!r}: its selection keeps a different number per KV head")
    return count


def why_not_servable(policy: Policy) -> str | None:
    """Why vLLM's paged cache cannot serve ``policy`` (``None``: it can)."""
    from kvpolicy.policies.full import AllTokens

    prop, cache = policy.propagation, policy.cache
    if policy.storage.quantized:
        return (
            f"kv_bits={policy.storage.label} sets how kvpolicy's own cache stores entries, but under vLLM the KV "
            f"cache and its dtype are vLLM's: start vLLM with kv_cache_dtype='fp8' for 8-bit entries (every "
            f"servable policy composes with it) and leave kv_bits out of the request"
        )
    if not isinstance(prop, AllTokens):
        return (
            f"its propagation policy {type(prop).__name__} ({prop.kind!r}) changes which tokens later layers "
            f"see, but vLLM runs every layer over the whole prompt; serve a cache policy alone"
        )
    if cache.selects_after_prefill or type(cache).scoring_suffix is not CachePolicy.scoring_suffix:
        return (
            f"{type(cache).__name__} ({cache.kind!r}) scores with a pass the engine appends to the prompt or "
            f"ranks every layer together once prefill ends (KVzip); the vLLM integration compresses each layer "
            f"from vLLM's own prefill of the prompt alone"
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


def _kept_counts(
    policy: Policy, layer: int, tokens: int = _TOKENS, heads: int = 2, dim: int = 16
) -> int | None:
    """How many entries the policy's prefill selection keeps per KV head at ``layer`` of a two-layer model,
    on a synthetic layer (random queries and keys, two KV heads of different spread, a budget-sized
    prompt); ``None`` when it keeps a different number per head (:class:`PerHead`) or cannot run on it."""
    gen = torch.Generator().manual_seed(0)
    key = torch.randn(1, heads, tokens, dim, generator=gen)
    key[:, heads - 1] *= 4.0  # heads that differ, so a head-adaptive policy splits its budget unevenly
    view = LayerView(
        layer=layer,
        num_layers=2,
        prompt_len=tokens,
        positions=torch.arange(tokens)[None],
        query=torch.randn(1, 2 * heads, tokens, dim, generator=gen),
        key=key,
        value=torch.randn(1, heads, tokens, dim, generator=gen),
        scaling=dim**-0.5,
    )
    try:
        keep = policy.cache.select(view, RequestState(prompt_len=tokens, num_layers=2))
    except Exception:  # a policy that needs more than a synthetic layer (a head map): not shown safe
        return None
    if isinstance(keep, PerHead):
        return None
    return tokens if keep is None else int(keep.shape[-1])
