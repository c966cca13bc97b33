"""kvpolicy: pluggable KV-cache compression and token propagation for Hugging Face transformers.

Quick use::

    import kvpolicy
    from kvpolicy.policies import TSP, SnapKV

    model, tokenizer = kvpolicy.load_model()
    fastkv = kvpolicy.compose(propagation=TSP(layer=20, rate=0.1), cache=SnapKV(budget=512))
    out = kvpolicy.generate(model, tokenizer, prompt, policy=fastkv, max_new_tokens=64)
"""

from __future__ import annotations

from kvpolicy.config import Budget, Settings, resolve_budget
from kvpolicy.generation import GenerationOutput, GenerationStats, Prefill, encode_prompt, generate, prefill
from kvpolicy.interfaces import (
    CachePolicy,
    DecodeView,
    LayerView,
    Policy,
    Propagate,
    PropagationPolicy,
    Restart,
)
from kvpolicy.models import ModelLoadError, load_model
from kvpolicy.registry import (
    PolicyConfigError,
    RegistryError,
    get_adapter,
    get_policy,
    get_registry,
    load_policy_config,
    policy_from_dict,
)

__version__ = "0.1.0"


def compose(propagation: PropagationPolicy | None = None, cache: CachePolicy | None = None) -> Policy:
    """A policy from one propagation and one cache policy; either defaults to keeping everything."""
    from kvpolicy.policies.full import AllTokens, FullCache

    return Policy(propagation=propagation or AllTokens(), cache=cache or FullCache())


__all__ = [
    "Budget",
    "CachePolicy",
    "DecodeView",
    "GenerationOutput",
    "GenerationStats",
    "LayerView",
    "ModelLoadError",
    "Policy",
    "PolicyConfigError",
    "Prefill",
    "Propagate",
    "PropagationPolicy",
    "RegistryError",
    "Restart",
    "Settings",
    "compose",
    "encode_prompt",
    "generate",
    "get_adapter",
    "get_policy",
    "get_registry",
    "load_model",
    "load_policy_config",
    "policy_from_dict",
    "prefill",
    "resolve_budget",
]
