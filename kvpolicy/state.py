"""Per-request state: everything that belongs to one generation, and nothing else.

Policies are immutable; what they need to remember between layers or decode steps (H2O's running
scores, a decode counter, ...) goes in :meth:`RequestState.scratch`, created fresh for each request
(design-notes §5). Sharing a policy object across threads or interleaved requests is therefore safe.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from kvpolicy.cache import KVPolicyCache


@dataclass
class RequestState:
    """State of one request through prefill and decode.

    Attributes:
        prompt_len: original prompt length ``L``.
        num_layers: decoder layers in the model.
        cache: the request's KV cache.
        tokens_per_layer: tokens each layer processed during prefill (filled by the adapter).
        discarded_tokens_per_layer: tokens per layer of passes whose cache a ``Restart`` discarded
            (GemFilter's filter pass): prefill compute spent that ``tokens_per_layer`` omits.
    """

    prompt_len: int
    num_layers: int
    cache: KVPolicyCache
    tokens_per_layer: list[int] = field(default_factory=list)
    discarded_tokens_per_layer: list[int] = field(default_factory=list)
    _scratch: dict[int, dict[str, Any]] = field(default_factory=dict, repr=False)

    def scratch(self, owner: object) -> dict[str, Any]:
        """A dict private to ``owner`` (a policy object) for this request."""
        return self._scratch.setdefault(id(owner), {})
