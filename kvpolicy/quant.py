"""The paged cache layer that stores its entries quantized (:class:`~kvpolicy.storage.KVStorage`; the
why of the layout is in :mod:`kvpolicy.storage`)."""

from __future__ import annotations

import math

import torch

from kvpolicy.cache import PagedLayer, Placed
from kvpolicy.storage import (
    KIVI_INDEX_BYTES,
    SCALE_DTYPE,
    KVStorage,
    _packed,
    _unpacked,
    dequantize,
    quantize,
)


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

    def _put(self, flat: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, at: Placed = None) -> None:
        self._put_per_token("k", flat, keys)
        self._put_per_token("v", flat, values)

    def _put_per_token(self, name: str, flat: torch.Tensor, data: torch.Tensor) -> None:
        """Quantize ``data`` ``(N, w)`` per token into the ``name`` (``"k"``/``"v"``) pools at ``flat``."""
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


class KiviLayer(QuantizedLayer):
    """A :class:`QuantizedLayer` in KIVI's layout (arXiv 2402.02750): keys per channel over groups of
    ``g = group_size`` entries, values per token, each row's recent entries in full precision.

    Slot-indexed, moved by eviction and compaction like any pool: ``k_codes``, ``v_codes``, ``v_scale``,
    ``v_zero``, positions, and ``k_rec (P + 1, block_size)`` ``int32``: the entry's key record (``>= 1``;
    ``0`` is the all-zero record of empty slots) or, negative, ``-(p + 1)`` for position ``p`` of its
    row's residual. Not slot-indexed: ``rec_scale``/``rec_zero`` ``(records, d)`` float16 (one record per
    group of ``g`` keys, per channel; the last record is a sink that masked writes go to), the residual
    ``res_k (R + 1, W, d)``/``res_v (R + 1, W, d_v)`` in the model's dtype (``W = residual``; the extra
    row answers the null page), ``res_slot (R + 1, W + 1)``: the slot holding each residual position
    (``-1``: evicted; the last column a sink), and ``res_n (R,)``: residual positions used.

    A full residual is quantized as a whole (:meth:`_flush`): its ``W / g`` groups of keys get a record
    each from the entries still held (evicted ones leave holes), its values their per-token codes, in the
    slots the entries hold now. Appends fill residual positions ``res_n, res_n + 1, ...``, evictions do not
    give them back, so when each row flushes is known on the host from its prefill count and the
    appends since (:meth:`prepare_append` grows the record pool ahead, no device read).

    Records of entries a decode-time policy evicts are dropped when the record pool would otherwise
    grow (:meth:`_compact_records`), so the pool stays proportional to the entries held.
    """

    def __init__(self, block_size: int, storage: KVStorage, shared_values: int | None = None) -> None:
        super().__init__(block_size, storage, shared_values)
        self.appends = 0
        self.records_base = 1
        self.rec_scale: torch.Tensor | None = None
        self.rec_zero: torch.Tensor | None = None

    def _pools(self) -> tuple[str, ...]:
        return ("k_codes", "k_rec", "v_codes", "v_scale", "v_zero", "pos_pool")

    def _new_pools(self, pages: int, k0: torch.Tensor, v0: torch.Tensor) -> None:
        super()._new_pools(pages, k0, v0)
        blk, device = self.block_size, k0.device
        self.k_rec = torch.zeros((pages + 1, blk), dtype=torch.int32, device=device)
        del self.k_scale, self.k_zero

    # -- the per-row state beyond the pools --------------------------------------------------------
    @property
    def _w(self) -> int:
        return self.storage.residual

    @property
    def _per_flush(self) -> int:
        """Key records one full residual makes."""
        return self._w // self.storage.group_size

    def _allocate(self, counts: list[int], reserve: int, k0: torch.Tensor, v0: torch.Tensor) -> None:
        super()._allocate(counts, reserve, k0, v0)
        rows, w, device = len(counts), self._w, k0.device
        self.res_k = k0.new_zeros((rows + 1, w, k0.shape[-1]))
        self.res_v = v0.new_zeros((rows + 1, w, v0.shape[-1]))
        self.res_slot = torch.full((rows + 1, w + 1), -1, dtype=torch.long, device=device)
        self.res_n = torch.tensor([c % w for c in counts], dtype=torch.long, device=device)
        self.records_base = 1 + sum(c // w for c in counts) * self._per_flush
        self.appends = 0
        self.rec_next = torch.full((), self.records_base, dtype=torch.long, device=device)
        self.rec_scale = self.rec_zero = None  # (a layer stored again starts afresh)
        self._new_records(self._records_needed(max(reserve, 0)), k0.shape[-1], device)

    def _records_needed(self, appends: int) -> int:
        """Records (plus the sink) enough for ``appends`` decode appends: a row flushes at most once
        every ``W`` appends after its prefill residual."""
        rows = self.num_seqs * self.num_heads if self.num_seqs else self.res_n.shape[0]
        return self.records_base + rows * self._per_flush * -(-appends // self._w) + 1

    def _new_records(self, n: int, d: int, device: torch.device) -> None:
        old = self.rec_scale
        for name in ("rec_scale", "rec_zero"):
            new = torch.zeros((n, d), dtype=SCALE_DTYPE, device=device)
            if old is not None:
                have = getattr(self, name)
                new[: have.shape[0] - 1] = have[:-1]  # (not the old sink)
            setattr(self, name, new)

    def prepare_append(self) -> None:
        """Host side of an append: pages, and records for any flush the step may make. Where the record
        pool would have to grow, the records no held entry points at (a decode-time policy evicted them)
        are dropped first; only then does it grow (reallocated: recorded decode graphs are recorded again)."""
        super().prepare_append()
        self.appends += 1
        if self._records_needed(self.appends) > self.rec_scale.shape[0]:
            self._compact_records()
            self.appends = 1  # (the append being prepared)
            need = self._records_needed(self.appends)
            if need > self.rec_scale.shape[0]:
                self._new_records(
                    max(need, 2 * self.rec_scale.shape[0]), self.rec_scale.shape[1], self.res_k.device
                )

    def _compact_records(self) -> None:
        """Keep only the records held entries point at, renumbered ``1..n`` in place (same tensors, so
        recorded graphs stay valid); a host read, as rare as the pool's doublings."""
        rec = self.k_rec.long()
        held = (self.pos_pool >= 0) & (rec > 0)  # (empty slots hold position -1)
        live = torch.unique(rec[held])
        n = live.numel()
        renumber = torch.zeros(self.rec_scale.shape[0], dtype=torch.long, device=rec.device)
        renumber[live] = torch.arange(1, n + 1, device=rec.device)
        self.k_rec.copy_(torch.where(rec > 0, torch.where(held, renumber[rec.clamp_min(0)], 0), rec))
        for name in ("rec_scale", "rec_zero"):
            pool = getattr(self, name)
            pool[1 : n + 1] = pool[live]
        self.records_base = n + 1
        self.rec_next.fill_(n + 1)

    # -- writing -----------------------------------------------------------------------------------
    def _put(self, flat: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, at: Placed = None) -> None:
        """Prefill: each row's first ``(n // W) * W`` entries quantized (keys in groups of ``g``
        consecutive slots, one record each), the rest into its residual (KIVI's prefill)."""
        assert at is not None  # decode appends go through write()
        rows, slots = at
        w, g, bits = self._w, self.storage.group_size, self.storage.bits
        n = self.lengths.view(-1)[rows]
        cut = n // w * w
        quant = slots < cut
        # record of each quantized entry: the row's first record plus its group within the row
        per_row = self.lengths.view(-1) // w * self._per_flush
        first = self.records_base - per_row.sum() + per_row.cumsum(0) - per_row
        rec = first[rows] + slots // g
        total = int(per_row.sum())
        d = keys.shape[-1]
        grouped = keys.new_zeros((total + 1, g, d), dtype=torch.float32)
        at = torch.where(quant, rec - 1, total)  # unquantized entries go to a spare group
        grouped[at, slots % g] = keys.float()
        scale, zero = _channel_record(grouped[:total], None, bits)
        self.rec_scale[1 : 1 + total] = scale
        self.rec_zero[1 : 1 + total] = zero
        safe = torch.where(quant, rec, 0)
        codes = _channel_codes(keys, self.rec_scale[safe], self.rec_zero[safe], bits)
        self.k_codes.view(-1, self.k_codes.shape[-1]).index_copy_(0, flat, codes)
        p = (slots - cut).clamp_min(0)
        self.k_rec.view(-1).index_copy_(0, flat, torch.where(quant, rec, -(p + 1)).to(torch.int32))
        self._put_per_token("v", flat, values)
        live = ~quant
        row_at = torch.where(live, rows, self.res_k.shape[0] - 1)  # the spare row takes the rest
        self.res_k[row_at, p] = keys.to(self.res_k.dtype)
        self.res_v[row_at, p] = values.to(self.res_v.dtype)
        self.res_slot[row_at, torch.where(live, p, w)] = slots
        self.res_slot[-1] = -1

    def write(self, key: torch.Tensor, value: torch.Tensor, positions: torch.Tensor) -> None:
        """A decode append: every row's entry into its residual (full precision) and its next slot;
        rows whose residual is then full quantize it (:meth:`_flush`). No host read."""
        rows = torch.arange(self.res_n.shape[0], device=self.res_n.device)
        slot = self.lengths.view(-1)
        flat = self._flat_each(slot)
        p = self.res_n
        self.res_k[rows, p] = key.reshape(rows.shape[0], -1).to(self.res_k.dtype)
        self.res_v[rows, p] = value.reshape(rows.shape[0], -1).to(self.res_v.dtype)
        self.res_slot[rows, p] = slot
        self.k_rec.view(-1).index_copy_(0, flat, (-(p + 1)).to(torch.int32))
        pos = positions.to(self.pos_pool.device)[:, None].expand(-1, self.num_heads).reshape(-1)
        self.pos_pool.view(-1).index_copy_(0, flat, pos)
        self.lengths += 1
        self.res_n += 1
        self._flush(self.res_n == self._w)

    def _flush(self, full: torch.Tensor) -> None:
        """Quantize the residual of the rows where ``full`` ``(R,)``: keys per channel in groups of ``g``
        residual positions (a record each, from the entries still held), values per token, written to
        the slots the entries hold now; their residual starts again. Static shapes, no host read: every
        row computes, the others write to the sinks."""
        r, w, g, bits = full.shape[0], self._w, self.storage.group_size, self.storage.bits
        per = self._per_flush
        slots = self.res_slot[:r, :w]
        held = (slots >= 0) & full[:, None]
        keys = self.res_k[:r].float()
        scale, zero = _channel_record(keys.view(r * per, g, -1), held.view(r * per, g), bits)
        rank = full.long().cumsum(0) - 1
        rec = self.rec_next + rank[:, None] * per + torch.arange(per, device=full.device)[None, :]  # (R, per)
        sink = self.rec_scale.shape[0] - 1
        rec = torch.where(full[:, None], rec, sink).reshape(-1)
        self.rec_scale.index_copy_(0, rec, scale)
        self.rec_zero.index_copy_(0, rec, zero)
        entry_rec = rec.view(r, per).repeat_interleave(g, dim=1)  # (R, W)
        rows = torch.arange(r, device=full.device)[:, None].expand(-1, w)
        null = self.pos_pool.numel() - 1  # a null-page slot: never read
        flat = torch.where(held, self._flat(rows, slots.clamp_min(0)), null).reshape(-1)
        codes = _channel_codes(
            keys, self.rec_scale[entry_rec].view(r, w, -1), self.rec_zero[entry_rec].view(r, w, -1), bits
        )
        self.k_codes.view(-1, self.k_codes.shape[-1]).index_copy_(0, flat, codes.reshape(r * w, -1))
        self.k_rec.view(-1).index_copy_(0, flat, torch.where(held, entry_rec, 0).reshape(-1).to(torch.int32))
        self._put_per_token("v", flat, self.res_v[:r].reshape(r * w, -1))
        self.res_slot[:r].masked_fill_(full[:, None], -1)
        self.res_n.masked_fill_(full, 0)
        self.rec_next += full.long().sum() * per

    # -- moves -------------------------------------------------------------------------------------
    def _moving(self, src: torch.Tensor, dst: torch.Tensor, do: torch.Tensor, slot: torch.Tensor) -> None:
        """A row's last entry moves into ``slot``: its residual position (if it has one) follows it;
        the evicted entry's residual position (if any) is now a hole."""
        rows = torch.arange(src.shape[0], device=src.device)
        sink = self._w
        rec = self.k_rec.view(-1)
        moved, gone = rec.index_select(0, src).long(), rec.index_select(0, dst).long()
        self.res_slot[rows, torch.where(do & (moved < 0), -moved - 1, sink)] = slot
        self.res_slot[rows, torch.where(do & (gone < 0), -gone - 1, sink)] = -1

    def keep(self, indices: torch.Tensor, counts: torch.Tensor | None = None, seq: int = 0) -> None:
        super().keep(indices, counts, seq)
        self._relink(
            torch.arange(seq * self.num_heads, (seq + 1) * self.num_heads, device=self.res_slot.device)
        )

    def clear(self, seqs: torch.Tensor) -> None:
        super().clear(seqs)
        rows = seqs.to(self.res_slot.device)[:, None].expand(self.num_seqs, self.num_heads).reshape(-1)
        self.res_slot[: rows.shape[0]].masked_fill_(rows[:, None], -1)

    def _relink(self, rows: torch.Tensor) -> None:
        """Rebuild ``res_slot`` of ``rows`` from the slots (after a compaction moved them)."""
        self.res_slot[rows] = -1
        sl = torch.arange(self.slots, device=rows.device)
        flat = self._flat(rows[:, None].expand(-1, self.slots), sl[None, :].expand(rows.shape[0], -1))
        rec = self.k_rec.view(-1)[flat].long()
        held = (rec < 0) & (sl[None, :] < self.lengths.view(-1)[rows][:, None])
        col = torch.where(held, -rec - 1, self._w)
        self.res_slot[rows[:, None].expand_as(col), col] = torch.where(held, sl[None, :], -1)
        self.res_slot[:, -1] = -1

    # -- reading -----------------------------------------------------------------------------------
    def _residual(self, res: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per slot of the pools: is it in its row's residual ``(P + 1, blk)``, and the residual's
        entry for it ``(P + 1, blk, w)`` from ``res`` (garbage where not)."""
        rec = self.k_rec.long()
        owner = self.page_owner.clamp_max(res.shape[0] - 1)[:, None].expand_as(rec)
        return rec < 0, res[owner, (-rec - 1).clamp(0, self._w - 1)]

    @property
    def k_pool(self) -> torch.Tensor:  # type: ignore[override]
        rec = self.k_rec.long().clamp_min(0)
        values = _unpacked(self.k_codes, self.storage.bits).float()
        keys = (values * self.rec_scale[rec].float() + self.rec_zero[rec].float()).to(self.dtype)
        fresh, res = self._residual(self.res_k)
        return torch.where(fresh[..., None], res, keys)

    @property
    def v_pool(self) -> torch.Tensor:  # type: ignore[override]
        values = dequantize(self.v_codes, self.v_scale, self.v_zero, self.storage, self.dtype)
        fresh, res = self._residual(self.res_v)
        return torch.where(fresh[..., None], res, values)

    def slot_bytes(self) -> float:
        """Bytes one kept entry takes: key codes and its share of its group's per-channel record,
        value codes and scales, and its record index (the residual is counted per row)."""
        d, dv = self.head_dims
        bits, scales = self.storage.bits, 2 * SCALE_DTYPE.itemsize
        key = d * bits / 8 + scales * d / self.storage.group_size
        value = dv * bits / 8 + scales * dv / self.storage.group(dv)
        return key + value + KIVI_INDEX_BYTES

    def nbytes(self, b: int = 0) -> int:
        d, dv = self.head_dims
        rows = self.num_heads
        return super().nbytes(b) + rows * self.storage.residual_bytes(d, dv, self.res_k.element_size())

    def allocated_bytes(self) -> int:
        extra = ("rec_scale", "rec_zero", "res_k", "res_v")
        return super().allocated_bytes() + sum(
            getattr(self, n).numel() * getattr(self, n).element_size() for n in extra
        )


def _channel_record(
    groups: torch.Tensor, held: torch.Tensor | None, bits: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel scale and zero point of ``groups`` ``(N, g, d)`` keys over their ``g`` entries (those
    where ``held`` ``(N, g)``; a group holding none gets zeros): ``(N, d)`` float16 each (KIVI's keys)."""
    qmax = (1 << bits) - 1
    x = groups.float()
    if held is None:
        lo, hi = x.amin(dim=1), x.amax(dim=1)
    else:
        mask = held[..., None]
        lo = x.masked_fill(~mask, float("inf")).amin(dim=1)
        hi = x.masked_fill(~mask, float("-inf")).amax(dim=1)
        anything = held.any(dim=1)[:, None]
        lo, hi = torch.where(anything, lo, 0.0), torch.where(anything, hi, 0.0)
    return ((hi - lo) / qmax).to(SCALE_DTYPE), lo.to(SCALE_DTYPE)


def _channel_codes(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes of keys ``x`` ``(..., d)`` under their records' per-channel ``scale`` and ``zero`` ``(..., d)``,
    packed along channels as :func:`~kvpolicy.storage.quantize` packs (``(..., d * bits / 8)`` uint8)."""
    qmax = (1 << bits) - 1
    safe = torch.where(scale > 0, scale.float(), 1.0)
    codes = ((x.float() - zero.float()) / safe).round().clamp(0, qmax).to(torch.uint8)
    return _packed(codes, bits)
