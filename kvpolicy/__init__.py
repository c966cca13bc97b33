"""kvpolicy: pluggable KV-cache compression and token propagation for Hugging Face transformers.

Quick use::

    import kvpolicy
    from kvpolicy.policies import TSP, SnapKV

    model, tokenizer = kvpolicy.load_model()
    fastkv = kvpolicy.compose(propagation=TSP(layer=20, rate=0.1), cache=SnapKV(budget=512))
    out = kvpolicy.generate(model, tokenizer, prompt, policy=fastkv, max_new_tokens=64)
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from kvpolicy.config import Budget, Settings, resolve_budget
    from kvpolicy.generation import (
        GenerationOutput,
        GenerationStats,
        Prefill,
        encode_prompt,
        generate,
        prefill,
    )
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
    from kvpolicy.storage import KVStorage

__version__ = "0.1.0"

#: Where each public name lives. They load on first use (PEP 562), so ``import kvpolicy`` costs no
#: torch import: the CLI's ``--help`` and ``list`` answer at once.
_EXPORTS: dict[str, str] = {
    **dict.fromkeys(("Budget", "Settings", "resolve_budget"), "kvpolicy.config"),
    **dict.fromkeys(
        ("GenerationOutput", "GenerationStats", "Prefill", "encode_prompt", "generate", "prefill"),
        "kvpolicy.generation",
    ),
    **dict.fromkeys(
        ("CachePolicy", "DecodeView", "LayerView", "Policy", "Propagate", "PropagationPolicy", "Restart"),
        "kvpolicy.interfaces",
    ),
    **dict.fromkeys(("ModelLoadError", "load_model"), "kvpolicy.models"),
    "KVStorage": "kvpolicy.storage",
    **dict.fromkeys(
        (
            "PolicyConfigError",
            "RegistryError",
            "get_adapter",
            "get_policy",
            "get_registry",
            "load_policy_config",
            "policy_from_dict",
        ),
        "kvpolicy.registry",
    ),
}


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'kvpolicy' has no attribute {name!r}")
    value = getattr(import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})


def compose(
    propagation: PropagationPolicy | None = None,
    cache: CachePolicy | None = None,
    storage: KVStorage | int | str | None = None,
) -> Policy:
    """A policy from one propagation and one cache policy; either defaults to keeping everything.
    ``storage`` is how kept entries are stored: ``None``/``16`` (the model's dtype), ``8``, ``"fp8"``,
    ``4``, ``2`` or a :class:`~kvpolicy.storage.KVStorage`."""
    from kvpolicy.interfaces import Policy
    from kvpolicy.policies.full import AllTokens, FullCache
    from kvpolicy.storage import KVStorage

    return Policy(
        propagation=propagation or AllTokens(), cache=cache or FullCache(), storage=KVStorage.parse(storage)
    )


__all__ = [
    "Budget",
    "CachePolicy",
    "DecodeView",
    "GenerationOutput",
    "GenerationStats",
    "KVStorage",
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
