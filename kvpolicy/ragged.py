"""Batched, left-padded state for generating several prompts of different lengths at once.

Why left padding with per-sequence policy calls: every prompt's newest token sits in the last column,
so one decode step serves the whole batch, while each sequence keeps its own number of tokens per
layer (TSP keeps a share of *its* prompt) and of KV entries (budgets resolve against *its* length).
Policies never see padding: the adapter calls their hooks once per sequence with a view of that
sequence's valid tokens only, and that sequence's own :class:`~kvpolicy.state.RequestState`. A
policy therefore behaves in a batch exactly as it does alone, and third-party policies need no
batch awareness.

Layout of a :class:`RaggedLayer`: ``(B, H_kv, capacity, d)`` buffers; the ``n_b`` entries of
sequence ``b`` occupy columns ``[length - n_b, length)``, padding before them is masked out of
attention. Decode appends one column for every sequence, so the alignment holds; a decode-time
eviction rebuilds the layer.
"""

from __future__ import annotations

import torch


class RaggedLayer:
    """One layer's kept keys/values for a batch, right-aligned (left-padded) per sequence."""

    def __init__(self) -> None:
        self.keys_buf: torch.Tensor | None = None
        self.values_buf: torch.Tensor | None = None
        self.positions_buf: torch.Tensor | None = None
        self.length = 0
        self.counts: list[int] = []

    def store(self, parts: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], reserve: int = 0) -> None:
        """Replace the contents with one ``(key (1, H, n_b, d), value, positions (1, H, n_b))`` per sequence."""
        k0, v0, p0 = parts[0]
        n = max(p[0].shape[2] for p in parts)
        cap = n + max(reserve, 0)
        b, h = len(parts), k0.shape[1]
        self.keys_buf = k0.new_zeros((b, h, cap, k0.shape[-1]))
        self.values_buf = v0.new_zeros((b, h, cap, v0.shape[-1]))
        self.positions_buf = p0.new_zeros((b, h, cap))
        for i, (k, v, p) in enumerate(parts):
            m = k.shape[2]
            self.keys_buf[i, :, n - m : n] = k[0]
            self.values_buf[i, :, n - m : n] = v[0]
            self.positions_buf[i, :, n - m : n] = p[0]
        self.length = n
        self.counts = [p[0].shape[2] for p in parts]

    def append(self, key: torch.Tensor, value: torch.Tensor, positions: torch.Tensor) -> None:
        """Append one entry per sequence: ``key``/``value`` ``(B, H, 1, d)``, ``positions`` ``(B,)``."""
        if self.length == self.capacity:
            self._grow(max(self.length + 1, 2 * self.length))
        assert self.keys_buf is not None and self.values_buf is not None and self.positions_buf is not None
        t = self.length
        self.keys_buf[:, :, t] = key[:, :, 0]
        self.values_buf[:, :, t] = value[:, :, 0]
        self.positions_buf[:, :, t] = positions.to(self.positions_buf.device)[:, None]
        self.length += 1
        self.counts = [c + 1 for c in self.counts]

    def _grow(self, cap: int) -> None:
        for name in ("keys_buf", "values_buf", "positions_buf"):
            old = getattr(self, name)
            new = old.new_zeros((*old.shape[:2], cap, *old.shape[3:]))
            new[:, :, : self.length] = old[:, :, : self.length]
            setattr(self, name, new)

    @property
    def capacity(self) -> int:
        return 0 if self.keys_buf is None else self.keys_buf.shape[2]

    @property
    def keys(self) -> torch.Tensor:
        assert self.keys_buf is not None
        return self.keys_buf[:, :, : self.length]

    @property
    def values(self) -> torch.Tensor:
        assert self.values_buf is not None
        return self.values_buf[:, :, : self.length]

    def sequence(self, b: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Sequence ``b``'s entries: keys, values ``(1, H, n_b, d)`` and positions ``(1, H, n_b)``."""
        assert self.keys_buf is not None and self.values_buf is not None and self.positions_buf is not None
        lo = self.length - self.counts[b]
        sl = slice(lo, self.length)
        return (
            self.keys_buf[b : b + 1, :, sl],
            self.values_buf[b : b + 1, :, sl],
            self.positions_buf[b : b + 1, :, sl],
        )

    def attention_mask(self, dtype: torch.dtype) -> torch.Tensor:
        """Additive mask ``(B, 1, 1, length)``: 0 for entries, the dtype's minimum for the padding
        before each sequence's ``counts[b]`` entries (derived: entries always end at ``length``)."""
        assert self.keys_buf is not None
        device = self.keys_buf.device
        start = torch.tensor([self.length - c for c in self.counts], device=device)
        padding = torch.arange(self.length, device=device)[None, :] < start[:, None]
        mask = torch.zeros(padding.shape, dtype=dtype, device=device)
        return mask.masked_fill(padding, torch.finfo(dtype).min)[:, None, None, :]

    def nbytes(self, b: int) -> int:
        """Bytes of sequence ``b``'s entries."""
        assert self.keys_buf is not None and self.values_buf is not None
        per_entry = self.keys_buf.shape[1] * (self.keys_buf.shape[3] + self.values_buf.shape[3])
        return self.counts[b] * per_entry * self.keys_buf.element_size()


class RaggedCache:
    """A :class:`RaggedLayer` per decoder layer, plus each sequence's next position."""

    def __init__(self, num_layers: int, next_positions: list[int]) -> None:
        self.layers = [RaggedLayer() for _ in range(num_layers)]
        self.next_positions = list(next_positions)

    def kv_lengths(self, b: int) -> list[int]:
        """Entries sequence ``b`` holds per layer (per KV head)."""
        return [layer.counts[b] for layer in self.layers]

    def kv_bytes(self, b: int) -> list[int]:
        return [layer.nbytes(b) for layer in self.layers]
