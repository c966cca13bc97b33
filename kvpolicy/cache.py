"""A transformers ``Cache`` holding each layer's compressed KV at KV-head granularity.

Why not ``DynamicCache``: its ``update`` concatenates, copying the whole cache every decode step,
and it reports the number of *stored* entries as the sequence length. Here each layer keeps a
buffer with spare capacity (reserved from the prompt and ``max_new_tokens``, grown geometrically if
exceeded), so an append is amortised O(1); and the cache reports the *logical* length (prompt length
plus tokens generated), which is the next token's position, however few entries it stores
(design-notes §3-4). Lengths may differ across layers.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, CacheLayerMixin


class CompressedLayer(CacheLayerMixin):
    """One layer's kept keys/values ``(B, H_kv, n, d)`` with the original position of each entry."""

    is_sliding = False
    is_compileable = False

    def __init__(self) -> None:
        super().__init__()
        self._k: torch.Tensor | None = None
        self._v: torch.Tensor | None = None
        self._pos: torch.Tensor | None = None
        self.length = 0
        #: logical position of the next token (prompt length + tokens appended since).
        self.next_position = 0

    # -- filled by the adapter -------------------------------------------------------------------
    def store(
        self,
        key: torch.Tensor,
        value: torch.Tensor,
        positions: torch.Tensor,
        next_position: int,
        reserve: int = 0,
    ) -> None:
        """Replace the contents with ``key``/``value`` ``(B, H_kv, n, d)`` and ``positions``
        ``(B, H_kv, n)``, leaving room for ``reserve`` appends."""
        b, h, n, d = key.shape
        cap = n + max(reserve, 0)
        self._k = key.new_empty((b, h, cap, d))
        self._v = value.new_empty((b, h, cap, value.shape[-1]))
        self._pos = positions.new_empty((b, h, cap))
        self._k[:, :, :n] = key
        self._v[:, :, :n] = value
        self._pos[:, :, :n] = positions
        self.length = n
        self.next_position = next_position
        self.dtype, self.device = key.dtype, key.device
        self.is_initialized = True
        self._sync()

    def compact(self, indices: torch.Tensor) -> None:
        """Keep only the entries at ``indices`` ``(B, H_kv, C)`` (C <= current length), in place."""
        assert self._k is not None and self._v is not None and self._pos is not None
        c = indices.shape[-1]
        idx = indices.unsqueeze(-1)
        k = self.keys.gather(2, idx.expand(-1, -1, -1, self._k.shape[-1]))
        v = self.values.gather(2, idx.expand(-1, -1, -1, self._v.shape[-1]))
        p = self.positions.gather(2, indices)
        self._k[:, :, :c] = k
        self._v[:, :, :c] = v
        self._pos[:, :, :c] = p
        self.length = c
        self._sync()

    @property
    def positions(self) -> torch.Tensor:
        assert self._pos is not None
        return self._pos[:, :, : self.length]

    @property
    def capacity(self) -> int:
        return 0 if self._k is None else self._k.shape[2]

    def nbytes(self) -> int:
        """Bytes of the entries held (not the spare capacity)."""
        if self._k is None or self._v is None:
            return 0
        per_entry = self._k.shape[0] * self._k.shape[1] * (self._k.shape[3] + self._v.shape[3])
        return self.length * per_entry * self._k.element_size()

    def _sync(self) -> None:
        assert self._k is not None and self._v is not None
        self.keys = self._k[:, :, : self.length]
        self.values = self._v[:, :, : self.length]

    def _grow(self, needed: int) -> None:
        assert self._k is not None and self._v is not None and self._pos is not None
        cap = max(needed, 2 * self.capacity)
        for name in ("_k", "_v", "_pos"):
            old = getattr(self, name)
            new = old.new_empty((*old.shape[:2], cap, *old.shape[3:]))
            new[:, :, : self.length] = old[:, :, : self.length]
            setattr(self, name, new)

    # -- transformers' CacheLayerMixin -----------------------------------------------------------
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        b, h, _, _d = key_states.shape
        self.store(
            key_states[:, :, :0],
            value_states[:, :, :0],
            torch.zeros((b, h, 0), dtype=torch.long, device=key_states.device),
            next_position=0,
        )

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: object, **kwargs: object
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Append new entries (decode) and return all entries of the layer."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        assert self._k is not None and self._v is not None and self._pos is not None
        new = key_states.shape[-2]
        if self.length + new > self.capacity:
            self._grow(self.length + new)
        end = self.length + new
        self._k[:, :, self.length : end] = key_states
        self._v[:, :, self.length : end] = value_states
        self._pos[:, :, self.length : end] = torch.arange(
            self.next_position, self.next_position + new, device=self._pos.device
        )
        self.length = end
        self.next_position += new
        self._sync()
        return self.keys, self.values

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.length + query_length, 0

    def get_seq_length(self) -> int:
        return self.next_position

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.__init__()

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise NotImplementedError("kvpolicy's cache does not support beam search (reorder_cache)")


class KVPolicyCache(Cache):
    """A ``Cache`` of :class:`CompressedLayer`, one per decoder layer.

    ``get_seq_length()`` is the logical length (next position), so ``model.generate`` continues
    positions at the original prompt length even though fewer entries are stored.
    """

    def __init__(self, num_layers: int) -> None:
        super().__init__(layers=[CompressedLayer() for _ in range(num_layers)])

    @property
    def kv_lengths(self) -> list[int]:
        """Entries held per layer (per KV head)."""
        return [layer.length for layer in self.layers]

    @property
    def kv_bytes(self) -> list[int]:
        """Bytes held per layer."""
        return [layer.nbytes() for layer in self.layers]
