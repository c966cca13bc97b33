"""The paged cache layer that stores its entries quantized (:class:`~kvpolicy.storage.KVStorage`; the
why of the layout is in :mod:`kvpolicy.storage`)."""

from __future__ import annotations

import math

import torch

from kvpolicy.cache import PagedLayer
from kvpolicy.storage import SCALE_DTYPE, KVStorage, dequantize, quantize


class QuantizedLayer(PagedLayer):
    """A :class:`~kvpolicy.cache.PagedLayer` whose keys and values are stored quantized.

    Same pages, slots, block table, lengths and moves; instead of ``k_pool``/``v_pool`` it holds, per
    slot, codes and scales: ``k_codes (P + 1, block_size, d * bits / 8)`` ``uint8``, ``k_scale`` and
    ``k_zero`` ``(P + 1, block_size, d / g)`` float16 (no zero for fp8), and the same for values.
    Every one is slot-indexed, so eviction, compaction and growth move them like any pool.
    ``k_pool`` and ``v_pool`` are the dequantized pools (computed on access, in the model's dtype): the
    torch decode attention and every reader of the cache see exactly what is stored.
    """

    def __init__(self, block_size: int, storage: KVStorage, shared_values: int | None = None) -> None:
        if shared_values:
            raise ValueError(
                f"{storage.label} KV storage is not built for latent attention (its values are a view of "
                f"its keys); use kv_bits=16 on this model"
            )
        if not storage.quantized:
            raise ValueError("QuantizedLayer stores fewer than 16 bits; 16-bit storage is PagedLayer")
        super().__init__(block_size)
        self.storage = storage

    def _pools(self) -> tuple[str, ...]:
        zeros = () if self.storage.format == "fp8" else ("k_zero", "v_zero")
        return ("k_codes", "k_scale", "v_codes", "v_scale", *zeros, "pos_pool")

    def _new_pools(self, pages: int, k0: torch.Tensor, v0: torch.Tensor) -> None:
        blk, device = self.block_size, k0.device
        for name, width in (("k", k0.shape[-1]), ("v", v0.shape[-1])):
            g = self.storage.group(width)
            codes = width * self.storage.bits // 8
            setattr(
                self, f"{name}_codes", torch.zeros((pages + 1, blk, codes), dtype=torch.uint8, device=device)
            )
            setattr(
                self,
                f"{name}_scale",
                torch.zeros((pages + 1, blk, width // g), dtype=SCALE_DTYPE, device=device),
            )
            if self.storage.format != "fp8":
                setattr(
                    self,
                    f"{name}_zero",
                    torch.zeros((pages + 1, blk, width // g), dtype=SCALE_DTYPE, device=device),
                )
        self.head_dims = (k0.shape[-1], v0.shape[-1])

    def _put(self, flat: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> None:
        for name, data in (("k", keys), ("v", values)):
            codes, scale, zero = quantize(data, self.storage)
            for part, src in (("codes", codes), ("scale", scale), ("zero", zero)):
                if src is not None:
                    pool = getattr(self, f"{name}_{part}")
                    pool.view(-1, pool.shape[-1]).index_copy_(0, flat, src)

    def _dequantized(self, name: str) -> torch.Tensor:
        zero = getattr(self, f"{name}_zero", None) if self.storage.format != "fp8" else None
        return dequantize(
            getattr(self, f"{name}_codes"), getattr(self, f"{name}_scale"), zero, self.storage, self.dtype
        )

    @property
    def k_pool(self) -> torch.Tensor:  # type: ignore[override]
        """``(P + 1, block_size, d)`` the stored keys, dequantized (a new tensor on each access)."""
        return self._dequantized("k")

    @property
    def v_pool(self) -> torch.Tensor:  # type: ignore[override]
        """``(P + 1, block_size, d_v)`` the stored values, dequantized (a new tensor on each access)."""
        return self._dequantized("v")

    def slot_bytes(self) -> float:
        """Bytes one kept entry (key and value of one KV head) takes: codes plus scales."""
        d, dv = self.head_dims
        return self.storage.bytes_per_element(d) * d + self.storage.bytes_per_element(dv) * dv

    def nbytes(self, b: int = 0) -> int:
        return math.ceil(sum(self.row_lengths(b)) * self.slot_bytes())

    def allocated_bytes(self) -> int:
        return sum(
            getattr(self, name).numel() * getattr(self, name).element_size()
            for name in self._pools()
            if name != "pos_pool"
        )
