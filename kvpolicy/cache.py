"""The one KV cache: paged, ragged per (sequence, KV head), appended and evicted in place.

Why this layout (Design notes: "The cache: paged, ragged per (sequence, KV head)"):

* **Per-head lengths.** Head-adaptive methods (AdaKV, DuoAttention) keep a different number of entries
  per KV head; sequences of a batch keep different numbers too (budgets resolve against each prompt).
  Every ``(sequence, KV head)`` pair is therefore its own *row* with its own length, and owns its own
  pages of ``block_size`` slots in a per-layer pool. Memory is the entries kept plus less than one
  page per row (and the reserve), never the longest row times the number of rows.
* **In place, O(1).** A decode append writes one slot per row; eviction moves the row's last entry
  into the freed slot (each slot stores its entry's original position, so order is never needed).
  Nothing is concatenated or rebuilt per step.
* **No host syncs.** Lengths live on the device; the host only tracks a lower bound on the free room
  (known without reading the device: every step appends exactly one entry per row), so a decode step
  reads nothing back and keeps static shapes (``torch.compile``, CUDA graphs).
* **Kernels.** The pool is ``(pages, block_size, d)`` per layer and each row has a ``block_table`` and
  a length: exactly flash-attention's paged KV cache (``flash_attn_with_kvcache`` with ``block_table``
  and ``cache_seqlens``) once ``(sequence x KV head)`` is flattened into its batch (one KV head, the
  ``n_rep`` query heads of the group as its query heads). Elsewhere :func:`paged_attention` computes
  the same in torch, page by page (split-K, then an exact log-sum-exp merge), reading each entry once.

The same object is a transformers ``Cache`` whose reported length is the *logical* one (prompt length
plus tokens generated), so ``model.generate`` can continue from it when every row of a
layer holds the same number of entries (the dense view transformers attends to needs that).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

if TYPE_CHECKING:
    from kvpolicy.storage import KVStorage

#: Where stored entries sit in their rows: ``(rows, slots)``, or ``None`` for a decode append.
Placed = tuple[torch.Tensor, torch.Tensor] | None
#: Slots per page on the torch path. flash-attention's paged kernel needs a multiple of 256.
BLOCK_SIZE = 64
FLASH_BLOCK_SIZE = 256


class CacheLayoutError(ValueError):
    """The cache cannot be shown to transformers as one dense tensor (rows hold different lengths)."""


class _Layer(CacheLayerMixin):
    """What every layer of kvpolicy's cache answers transformers alike: its logical length (prompt plus
    tokens generated, not the entries held), and no reset or beam search."""

    next_position = 0

    def get_seq_length(self, *args: object) -> int:
        return self.next_position

    def get_max_length(self) -> int:
        return -1

    def get_max_cache_shape(self, *args: object) -> int:
        return -1

    def reset(self) -> None:
        raise CacheLayoutError("kvpolicy's cache cannot be reset; run kvpolicy.prefill again")

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise NotImplementedError("kvpolicy's cache does not support beam search (reorder_cache)")


class PagedLayer(_Layer):
    """One decoder layer's kept entries for a batch: ``B x H`` rows of pages in one pool.

    Attributes (device tensors, ``R = B * H`` rows, ``P`` pages plus one all-empty *null* page last):
        k_pool, v_pool: ``(P + 1, block_size, d)``.
        pos_pool: ``(P + 1, block_size)`` original position of each slot's entry.
        block_table: ``(R, M)`` pages of each row, padded with the null page.
        page_owner: ``(P + 1,)`` row owning each page (``R`` for the null page).
        page_rank: ``(P + 1,)`` index of each page within its row.
        lengths: ``(B, H)`` entries held per row; a row's entries sit in its slots ``0..length-1``.

    ``shared_values=n``: each entry's value is its key's first ``n`` columns (latent attention caches
    the latent as both), so ``v_pool`` is a view of ``k_pool`` and values are stored once.
    """

    is_sliding = False
    is_compileable = False

    def __init__(self, block_size: int = BLOCK_SIZE, shared_values: int | None = None) -> None:
        super().__init__()
        self.block_size = block_size
        self.shared_values = shared_values
        self.num_seqs = 0
        self.num_heads = 0
        #: free slots every row is guaranteed to have (host-side lower bound; no device read needed).
        self.room = 0
        #: entries per row when all rows hold the same number (host-side), else ``None``.
        self.uniform: int | None = None
        self.pages_per_row: list[int] = []
        #: logical position of the next token (transformers' view of the sequence length).
        self.next_position = 0

    # -- building ----------------------------------------------------------------------------------
    def store(
        self,
        parts: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]],
        reserve: int = 0,
    ) -> None:
        """Replace the contents, one part per sequence, leaving room for ``reserve`` appends per row.

        A part is ``(key (H, n, d), value (H, n, d_v), positions (H, n), counts)``; ``counts`` is
        ``None`` when every head keeps all ``n`` entries, else ``(H,)`` entries per head (head ``h``
        keeps its first ``counts[h]``). Runs once per layer at prefill: it may read counts back.
        """
        k0, v0 = parts[0][0], parts[0][1]
        self.num_seqs, self.num_heads = len(parts), k0.shape[0]
        counts = []
        for key, _v, _p, cnt in parts:
            counts += [key.shape[1]] * key.shape[0] if cnt is None else [int(c) for c in cnt.tolist()]
        self._allocate(counts, reserve, k0, v0)
        rows, slots, picks = [], [], []
        offset = 0
        for b, (key, _v, _p, cnt) in enumerate(parts):
            h, n = key.shape[0], key.shape[1]
            j = torch.arange(n, device=key.device)
            limit = (
                cnt.to(key.device)[:, None] if cnt is not None else torch.full((h, 1), n, device=key.device)
            )
            valid = j[None, :] < limit
            hh, jj = valid.nonzero(as_tuple=True)
            rows.append(hh + b * self.num_heads)
            slots.append(jj)
            picks.append(hh * n + jj + offset)
            offset += h * n
        row_of, slot_of = torch.cat(rows), torch.cat(slots)
        flat = self._flat(row_of, slot_of)
        pick = torch.cat(picks)
        keys, values, positions = (
            torch.cat([p[j].reshape(-1, *p[j].shape[2:]) for p in parts])[pick] for j in range(3)
        )
        self.dtype = k0.dtype
        self.lengths = torch.tensor(counts, device=k0.device, dtype=torch.long).view(
            self.num_seqs, self.num_heads
        )
        self._put(flat, keys, values, (row_of, slot_of))
        self.pos_pool.view(-1).index_copy_(0, flat, positions.to(self.pos_pool.dtype))
        self.room = min(p * self.block_size - c for p, c in zip(self.pages_per_row, counts, strict=True))
        self.uniform = counts[0] if len(set(counts)) == 1 else None
        self.dtype, self.device = k0.dtype, k0.device
        self.is_initialized = True

    def _allocate(self, counts: list[int], reserve: int, k0: torch.Tensor, v0: torch.Tensor) -> None:
        blk = self.block_size
        self.pages_per_row = [max(1, math.ceil((c + max(reserve, 0)) / blk)) for c in counts]
        pages = sum(self.pages_per_row)
        width = max(self.pages_per_row)
        device = k0.device
        self._new_pools(pages, k0, v0)
        self.pos_pool = torch.full((pages + 1, blk), -1, dtype=torch.long, device=device)
        table = torch.full((len(counts), width), pages, dtype=torch.long)
        owner = torch.full((pages + 1,), len(counts), dtype=torch.long)
        rank = torch.zeros((pages + 1,), dtype=torch.long)
        start = 0
        for row, n in enumerate(self.pages_per_row):
            table[row, :n] = torch.arange(start, start + n)
            owner[start : start + n] = row
            rank[start : start + n] = torch.arange(n)
            start += n
        self.block_table, self.page_owner, self.page_rank = (
            table.to(device),
            owner.to(device),
            rank.to(device),
        )
        self._index_slots()

    def _new_pools(self, pages: int, k0: torch.Tensor, v0: torch.Tensor) -> None:
        """Allocate the key and value pools of ``pages`` pages plus the null page (zeros), like ``k0``/``v0``."""
        blk = self.block_size
        self.k_pool = k0.new_zeros((pages + 1, blk, k0.shape[-1]))
        if not self.shared_values:
            self.v_pool = v0.new_zeros((pages + 1, blk, v0.shape[-1]))

    def _put(self, flat: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, at: Placed = None) -> None:
        """Write entries ``keys (N, d)``, ``values (N, d_v)`` at flat pool indices ``flat (N,)`` (where
        a storage that quantizes does so: entries are scored before, stored here); ``at`` is
        ``(rows, slots)`` ``(N,)`` each, where they are in their rows (at prefill; ``None`` for a decode
        append, one entry per row in its next slot)."""
        self.k_pool.view(-1, self.k_pool.shape[-1]).index_copy_(0, flat, keys.to(self.k_pool.dtype))
        if not self.shared_values:
            pool = self.v_pool
            pool.view(-1, pool.shape[-1]).index_copy_(0, flat, values.to(pool.dtype))

    def _index_slots(self) -> None:
        """Flat pool index of every (row, slot), so addressing a slot is one gather (decode steps
        address one slot per row per layer; fewer ops is what a CPU or an uncompiled GPU step pays)."""
        blk = self.block_size
        within = torch.arange(blk, device=self.block_table.device)
        self._slot_flat = (self.block_table[:, :, None] * blk + within).reshape(-1)  # (R * slots,)
        rows = self.block_table.shape[0]
        self._row_start = torch.arange(rows, device=self.block_table.device) * self.slots  # (R,)

    def _grow(self, extra: int) -> None:
        """Give every row ``extra`` more pages (host-triggered: ``room`` is known without a sync)."""
        blk, rows = self.block_size, self.num_seqs * self.num_heads
        old_pages = self.pos_pool.shape[0] - 1
        new_pages = old_pages + extra * rows
        for name in self._pools():
            old = getattr(self, name)
            new = old.new_full((new_pages + 1, *old.shape[1:]), -1 if name == "pos_pool" else 0)
            new[:old_pages] = old[:old_pages]
            setattr(self, name, new)
        device = self.pos_pool.device
        width = self.block_table.shape[1]
        table = torch.full((rows, width + extra), new_pages, dtype=torch.long, device=device)
        table[:, :width] = torch.where(self.block_table == old_pages, new_pages, self.block_table)
        fresh = torch.arange(old_pages, new_pages, device=device).view(rows, extra)
        counts = torch.tensor(self.pages_per_row, device=device)
        cols = counts[:, None] + torch.arange(extra, device=device)[None, :]
        table.scatter_(1, cols, fresh)
        owner = torch.full((new_pages + 1,), rows, dtype=torch.long, device=device)
        owner[:old_pages] = self.page_owner[:old_pages]
        owner[old_pages:new_pages] = torch.arange(rows, device=device).repeat_interleave(extra)
        rank = torch.zeros((new_pages + 1,), dtype=torch.long, device=device)
        rank[:old_pages] = self.page_rank[:old_pages]
        rank[old_pages:new_pages] = cols.reshape(-1)
        self.block_table, self.page_owner, self.page_rank = table, owner, rank
        self.pages_per_row = [p + extra for p in self.pages_per_row]
        self.room += extra * blk
        self._index_slots()

    def _pools(self) -> tuple[str, ...]:
        """The pools that hold data of their own (not ``v_pool`` when it is a view of ``k_pool``)."""
        return ("k_pool", "pos_pool") if self.shared_values else ("k_pool", "v_pool", "pos_pool")

    @property
    def v_pool(self) -> torch.Tensor:
        """``(P + 1, block_size, d_v)`` values: a view of ``k_pool``'s first columns with shared values
        (taken afresh on each access, so no view outlives the grad mode it was made in)."""
        return self.k_pool[..., : self.shared_values] if self.shared_values else self._v_pool

    @v_pool.setter
    def v_pool(self, pool: torch.Tensor) -> None:
        self._v_pool = pool

    # -- addressing --------------------------------------------------------------------------------
    def _flat(self, rows: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        """Flat pool index (into ``pool.view(-1, ...)``) of ``slots`` of ``rows`` (same shapes)."""
        return self._slot_flat[self._row_start[rows] + slots]

    def _flat_each(self, slots: torch.Tensor) -> torch.Tensor:
        """Flat pool index of one slot per row, ``slots`` ``(R,)``."""
        return self._slot_flat[self._row_start + slots]

    @property
    def slots(self) -> int:
        """Slots each row can address in :meth:`dense` views (``M * block_size``)."""
        return self.block_table.shape[1] * self.block_size

    @property
    def capacity(self) -> int:
        return min(self.pages_per_row) * self.block_size if self.pages_per_row else 0

    # -- decode ------------------------------------------------------------------------------------
    def prepare_append(self) -> None:
        """Host-side part of an append: make sure every row has a free slot (no device read)."""
        if self.room < 1:
            self._grow(max(1, max(self.pages_per_row)))
        self.room -= 1
        if self.uniform is not None:
            self.uniform += 1

    def write(self, key: torch.Tensor, value: torch.Tensor, positions: torch.Tensor) -> None:
        """Device-side part of an append (after :meth:`prepare_append`): one entry per row, written
        in its row's next slot. ``key``/``value`` ``(B, H, 1, d)``, ``positions`` ``(B,)``."""
        flat = self._flat_each(self.lengths.view(-1))
        self._put(flat, key.reshape(flat.shape[0], -1), value.reshape(flat.shape[0], -1))
        pos = positions.to(self.pos_pool.device)[:, None].expand(-1, self.num_heads).reshape(-1)
        self.pos_pool.view(-1).index_copy_(0, flat, pos)
        self.lengths += 1

    def append(self, key: torch.Tensor, value: torch.Tensor, positions: torch.Tensor) -> None:
        """Append one entry to every row: ``key``/``value`` ``(B, H, 1, d)``, ``positions`` ``(B,)``."""
        self.prepare_append()
        self.write(key, value, positions)

    def evict(self, slots: torch.Tensor) -> torch.Tensor:
        """Free ``slots`` ``(B, H, k)`` of each row in place (``-1``: nothing); no host sync.

        Each freed slot takes the row's last entry, so a row's entries stay in slots ``0..length-1``,
        and the vacated slot's position becomes ``-1`` (empty slots always read ``-1``).
        Policies mirror the same moves on their own slot-indexed state with :func:`evict_rows`.

        Returns ``(B, H)`` bool: rows given a slot outside ``[-1, length)`` (ignored here; the engine
        reports them when the generation ends).
        """
        lengths = self.lengths.view(-1)
        ordered = slots.reshape(lengths.shape[0], -1)
        if ordered.shape[1] > 1:  # highest first, so a later move never takes an already freed slot
            ordered = ordered.sort(dim=-1, descending=True).values
        bad = None
        positions = self.pos_pool.view(-1)
        null = self._slot_flat.new_full((), self.pos_pool.numel() - 1)  # a null-page slot: always -1
        for j in range(ordered.shape[1]):
            slot = ordered[:, j]
            do = (slot >= 0) & (slot < lengths)
            if j:  # a slot given twice is freed once (after the first move it holds another entry)
                do = do & (slot != ordered[:, j - 1])
            wrong = (slot != -1) & ~do
            bad = wrong if bad is None else bad | wrong
            last = (lengths - 1).clamp_min(0)
            src = self._flat_each(last)
            dst = self._flat_each(torch.where(do, slot, last))
            self._moving(src, dst, do, slot)
            for pool in (getattr(self, name) for name in self._pools()):
                flat = pool.view(-1, *pool.shape[2:])
                flat.index_copy_(0, dst, flat.index_select(0, src))
            positions.index_fill_(0, torch.where(do, src, null), -1)
            lengths -= do.long()
        self.uniform = None
        return (bad if bad is not None else torch.zeros_like(lengths, dtype=torch.bool)).view(
            self.num_seqs, self.num_heads
        )

    def _moving(self, src: torch.Tensor, dst: torch.Tensor, do: torch.Tensor, slot: torch.Tensor) -> None:
        """Called by :meth:`evict` before each move of a row's last entry (flat index ``src`` ``(R,)``)
        into the freed slot (flat ``dst``; ``slot`` in the row) where ``do``: a layer keeping state
        about its entries beyond the slot-indexed pools updates it here (nothing to do for a plain one)."""

    def clear(self, seqs: torch.Tensor) -> None:
        """Empty every head's row of the sequences where ``seqs`` ``(B,)`` is true, in place; no host
        sync, static shapes (a chunked-attention layer's token that starts a new chunk sees none of
        the earlier entries)."""
        rows = seqs.to(self.lengths.device)[:, None].expand(self.num_seqs, self.num_heads)
        self.lengths.masked_fill_(rows, 0)
        every = rows.reshape(-1, 1).expand(-1, self.slots).reshape(-1)
        null = self._slot_flat.new_full((), self.pos_pool.numel() - 1)  # a null-page slot: always -1
        self.pos_pool.view(-1).index_fill_(0, torch.where(every, self._slot_flat, null), -1)
        self.uniform = None

    def keep(self, indices: torch.Tensor, counts: torch.Tensor | None = None, seq: int = 0) -> None:
        """Keep only the entries at slot ``indices`` ``(1, H, C)`` of sequence ``seq`` (its first
        ``counts`` ``(1, H)`` per head when given), compacted to slots ``0..C-1``. O(C) copies: the
        in-place :meth:`evict` is the fast path."""
        h, c = indices.shape[1], indices.shape[2]
        # out-of-range indices are clamped (the engine reports them when the generation ends)
        indices = indices.clamp(0, self.slots - 1)
        rows = (torch.arange(h, device=indices.device) + seq * self.num_heads)[:, None].expand(-1, c)
        src = self._flat(rows.reshape(-1), indices.reshape(-1).to(rows.device))
        dst = self._flat(rows.reshape(-1), torch.arange(c, device=rows.device).repeat(h))
        pools = [getattr(self, name) for name in self._pools()]
        picked = [pool.view(-1, *pool.shape[2:])[src] for pool in pools]
        row_slots = torch.arange(self.slots, device=rows.device)
        all_rows = rows[:, :1].expand(-1, self.slots).reshape(-1)
        self.pos_pool.view(-1).index_fill_(0, self._flat(all_rows, row_slots.repeat(h)), -1)
        for pool, data in zip(pools, picked, strict=True):
            pool.view(-1, *pool.shape[2:]).index_copy_(0, dst, data)
        new = counts[0] if counts is not None else torch.full((h,), c, device=rows.device)
        if counts is not None:  # a head keeping fewer than C: its slots from its count on are empty
            beyond = torch.arange(c, device=rows.device)[None, :] >= new.to(rows.device)[:, None]
            every = self._flat(rows.reshape(-1), torch.arange(c, device=rows.device).repeat(h))
            null = every.new_full((), self.pos_pool.numel() - 1)  # a null-page slot: always -1
            self.pos_pool.view(-1).index_fill_(0, torch.where(beyond.reshape(-1), every, null), -1)
        self.lengths[seq] = new.to(self.lengths)
        self.uniform = None

    # -- views -------------------------------------------------------------------------------------
    def dense(self, pool: torch.Tensor) -> torch.Tensor:
        """``(B, H, slots, ...)`` view of ``pool`` through the block table (a gather: a copy)."""
        out = pool[self.block_table]  # (R, M, blk, ...)
        return out.reshape(self.num_seqs, self.num_heads, self.slots, *pool.shape[2:])

    def valid(self) -> torch.Tensor:
        """``(B, H, slots)`` bool: which slots hold an entry."""
        return torch.arange(self.slots, device=self.lengths.device) < self.lengths[..., None]

    def slot_positions(self) -> torch.Tensor:
        """``(B, H, slots)`` original position of each slot's entry, ``-1`` on empty slots (an
        invariant every write, eviction and compaction keeps, so no mask is needed)."""
        return self.dense(self.pos_pool)

    def _ordered(self, pool: torch.Tensor) -> torch.Tensor:
        """``pool`` per row in position order, ``(B, H, n, ...)`` with ``n`` the longest row; shorter
        rows are padded at the end. For inspection and tests: slot order is arbitrary after evictions."""
        n = self.uniform if self.uniform is not None else int(self.lengths.max())
        pos = self.slot_positions()
        pos = pos.masked_fill(pos < 0, torch.iinfo(torch.long).max)
        order = pos.argsort(dim=-1, stable=True)[:, :, :n]
        if pool is self.pos_pool:
            out = pos.gather(2, order)
            return out.masked_fill(out == torch.iinfo(torch.long).max, -1)
        data = self.dense(pool)
        return data.gather(2, order[..., None].expand(-1, -1, -1, data.shape[-1]))

    @property
    def keys(self) -> torch.Tensor:  # type: ignore[override]
        """``(B, H, n, d)`` in position order, ``n`` the longest row (shorter rows padded at the end)."""
        return self._ordered(self.k_pool)

    @keys.setter
    def keys(self, value: object) -> None:  # CacheLayerMixin.__init__ assigns None
        pass

    @property
    def values(self) -> torch.Tensor:  # type: ignore[override]
        return self._ordered(self.v_pool)

    @values.setter
    def values(self, value: object) -> None:
        pass

    @property
    def positions(self) -> torch.Tensor:
        """``(B, H, n)`` original positions in ascending order, ``-1`` on padding."""
        return self._ordered(self.pos_pool)

    def row_lengths(self, b: int = 0) -> list[int]:
        """Entries each KV head of sequence ``b`` holds (reads the device)."""
        return [int(n) for n in self.lengths[b].tolist()]

    def entries(self, b: int = 0) -> int:
        """Entries of sequence ``b`` per KV head: an int when its heads agree, else their mean."""
        counts = self.row_lengths(b)
        return counts[0] if len(set(counts)) == 1 else sum(counts) / len(counts)  # type: ignore[return-value]

    def nbytes(self, b: int = 0) -> int:
        """Bytes of sequence ``b``'s entries (keys and values), not of spare slots."""
        values = 0 if self.shared_values else self.v_pool.shape[-1]
        per_entry = (self.k_pool.shape[-1] + values) * self.k_pool.element_size()
        return sum(self.row_lengths(b)) * per_entry

    def allocated_bytes(self) -> int:
        """Bytes of the pages allocated for the whole batch (entries, reserve and page slack)."""
        values = 0 if self.shared_values else self.v_pool.numel()
        return (self.k_pool.numel() + values) * self.k_pool.element_size()

    # -- transformers' CacheLayerMixin -------------------------------------------------------------
    def lazy_initialization(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: object
    ) -> None:
        raise CacheLayoutError("kvpolicy's cache is filled by kvpolicy.prefill, not by a model forward")

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: object, **kwargs: object
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Append the new entries (transformers' own decode loop) and return the layer densely."""
        if self.uniform is None:
            raise CacheLayoutError(
                "this layer's rows (sequence x KV head) hold different numbers of entries, which "
                "transformers' attention cannot take as one tensor; decode with kvpolicy.generate instead"
            )
        b = key_states.shape[0]
        start = self.next_position
        for t in range(key_states.shape[2]):
            pos = torch.full((b,), start + t, dtype=torch.long, device=self.lengths.device)
            self.append(key_states[:, :, t : t + 1], value_states[:, :, t : t + 1], pos)
        self.next_position = start + key_states.shape[2]
        n = self.uniform
        return self.dense(self.k_pool)[:, :, :n], self.dense(self.v_pool)[:, :, :n]

    def get_mask_sizes(self, *args: object, **kwargs: object) -> tuple[int, int]:
        query = args[0] if args else kwargs.get("cache_position", kwargs.get("query_length", 1))
        q = query if isinstance(query, int) else int(query.shape[0])  # type: ignore[union-attr]
        return (self.uniform or 0) + q, 0


class StateLayer(_Layer):
    """A decoder layer that keeps no keys and values: a recurrent, linear-attention, convolution or
    MLP-only layer of a hybrid model (Qwen3-Next, Jamba, Bamba, LFM2, ...).

    Why a placeholder: the KV cache of the attention layers is what grows with the context, so that is
    what cache policies compress; these layers carry a fixed-size state between tokens instead, and
    that state stays in the model's own cache object for it (:attr:`KVPolicyCache.states`, untouched
    by any policy). The placeholder keeps one cache layer per decoder layer, so layer indices mean the
    same everywhere, and holds no entries."""

    is_sliding = False
    is_compileable = False

    def __init__(self) -> None:
        super().__init__()
        self.num_seqs = 0
        self.num_heads = 0
        self.uniform: int | None = 0
        self.next_position = 0

    def prepare_append(self) -> None:
        """Nothing to make room for: the state is updated in place by the layer itself."""

    def row_lengths(self, b: int = 0) -> list[int]:
        return []

    def entries(self, b: int = 0) -> int:
        return 0

    def nbytes(self, b: int = 0) -> int:
        return 0

    def allocated_bytes(self) -> int:
        return 0

    def lazy_initialization(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: object
    ) -> None:
        raise CacheLayoutError("this layer holds no keys and values (a recurrent or convolution layer)")

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: object, **kwargs: object
    ) -> tuple[torch.Tensor, torch.Tensor]:
        raise CacheLayoutError("this layer holds no keys and values (a recurrent or convolution layer)")

    def get_mask_sizes(self, *args: object, **kwargs: object) -> tuple[int, int]:
        return 0, 0


def state_tensors(states: Cache | None) -> Iterator[tuple[int, str, torch.Tensor]]:
    """``(layer, name, tensor)`` for every tensor of a transformers cache's recurrent and convolution
    states (its linear-attention layers' ``conv_states`` / ``recurrent_states`` and token counter)."""
    if states is None:
        return
    for i, layer in enumerate(states.layers):
        for kind in ("conv_states", "recurrent_states"):
            for j, t in (getattr(layer, kind, None) or {}).items():
                if isinstance(t, torch.Tensor):
                    yield i, f"{kind}[{j}]", t
        count = getattr(layer, "cumulative_length_linear", None)
        if isinstance(count, torch.Tensor):
            yield i, "cumulative_length_linear", count


def evict_rows(state: torch.Tensor, slots: torch.Tensor, lengths: torch.Tensor) -> None:
    """Mirror :meth:`PagedLayer.evict` on a policy's slot-indexed tensor ``(B, H, S, ...)``, in place.

    ``lengths`` are the rows' lengths *before* the eviction. Sync-free, static shapes.
    """
    b, h, s = state.shape[:3]
    flat = state.view(b * h, s, -1)
    length = lengths.reshape(-1)
    ordered = slots.reshape(b * h, -1)
    if ordered.shape[1] > 1:
        ordered = ordered.sort(dim=-1, descending=True).values
    for j in range(ordered.shape[1]):
        slot = ordered[:, j]
        last = (length - 1).clamp_min(0)
        do = (slot >= 0) & (slot < length)
        if j:
            do = do & (slot != ordered[:, j - 1])
        src = last[:, None, None].expand(-1, 1, flat.shape[-1])
        dst = torch.where(do, slot, last)[:, None, None].expand(-1, 1, flat.shape[-1])
        flat.scatter_(1, dst, flat.gather(1, src))
        length = length - do.long()


def paged_attention(
    query: torch.Tensor,
    layer: PagedLayer,
    scaling: float,
    want_probs: bool = False,
    softcap: float | None = None,
    sinks: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Attention of one new query per sequence over each row's entries, page by page.

    Args:
        query: ``(B, H_q, 1, d)``; the ``n_rep = H_q / H`` query heads of a group share a row.
        layer: the layer's cache (the new entry already appended).
        scaling: softmax scale.
        want_probs: also return the attention probabilities per slot (decode-time policies).
        softcap: soft-cap the scores, ``cap * tanh(score / cap)`` (Gemma 2).
        sinks: ``(H_q,)`` learned logit per query head that joins each softmax and takes no value
            (GPT-OSS's attention sinks).

    Returns:
        ``(B, 1, H_q * d_v)`` in the query's dtype, and ``(B, H, n_rep, slots)`` float32 probabilities
        (zero on empty slots) or ``None``. Reads each stored entry once; scores in float32.
    """
    b, h_q, _, d = query.shape
    rows = layer.num_seqs * layer.num_heads
    n_rep = h_q // layer.num_heads
    q = query.reshape(rows, n_rep, d)
    q_pages = torch.cat([q, q.new_zeros((1, n_rep, d))])[layer.page_owner]  # (P+1, n_rep, d)
    scores = torch.bmm(q_pages, layer.k_pool.transpose(1, 2)).float() * scaling  # (P+1, n_rep, blk)
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    empty = (layer.pos_pool < 0)[:, None, :]  # (P+1, 1, blk): empty slots hold position -1
    scores = scores.masked_fill(empty, float("-inf"))
    owner = layer.page_owner[:, None].expand(-1, n_rep)
    page_max = scores.amax(dim=-1)  # (P+1, n_rep)
    row_max = scores.new_full((rows + 1, n_rep), float("-inf")).scatter_reduce(
        0, owner, page_max, reduce="amax", include_self=True
    )
    sink = None
    if sinks is not None:  # (R, n_rep): each row's query heads' sink logits take part in the max
        sink = sinks.float().view(1, layer.num_heads, n_rep).expand(b, -1, -1).reshape(rows, n_rep)
        row_max = torch.cat([torch.maximum(row_max[:rows], sink), row_max[rows:]])
    row_max = row_max.nan_to_num(neginf=0.0)  # rows without entries (the null row)
    weights = torch.exp(scores - row_max[layer.page_owner][..., None])  # (P+1, n_rep, blk)
    denom = scores.new_zeros((rows + 1, n_rep)).index_add_(0, layer.page_owner, weights.sum(dim=-1))
    part = torch.bmm(weights.to(layer.v_pool.dtype), layer.v_pool)  # (P+1, n_rep, d_v)
    # page partials summed in float32: bf16 sums over thousands of pages lose ~1 % (measured against fp64)
    out = scores.new_zeros((rows + 1, n_rep, part.shape[-1])).index_add_(0, layer.page_owner, part.float())
    if sink is not None:  # the sink's share of the softmax: in the denominator, no value
        denom = torch.cat([denom[:rows] + torch.exp(sink - row_max[:rows]), denom[rows:]])
    denom = denom.clamp_min(torch.finfo(torch.float32).tiny)
    out = (out[:rows] / denom[:rows, :, None]).to(query.dtype)
    probs = None
    if want_probs:
        per_row = weights[layer.block_table].permute(0, 2, 1, 3).reshape(rows, n_rep, layer.slots)
        probs = (per_row / denom[:rows, :, None]).view(b, layer.num_heads, n_rep, layer.slots)
    return out.reshape(b, 1, h_q * out.shape[-1]), probs


def flash_paged_attention(query: torch.Tensor, layer: PagedLayer, scaling: float) -> torch.Tensor:
    """:func:`paged_attention` through flash-attention's paged KV kernel (CUDA, flash-attn installed).

    ``(sequence x KV head)`` rows are the kernel's batch, each with one KV head and ``n_rep`` query
    heads; the pool is ``(pages, block_size, 1, d)``. Needs ``block_size % 256 == 0``.
    """
    from flash_attn import flash_attn_with_kvcache  # type: ignore[import-not-found]

    b, h_q, _, d = query.shape
    rows = layer.num_seqs * layer.num_heads
    q = query.reshape(rows, 1, h_q // layer.num_heads, d)
    out = flash_attn_with_kvcache(
        q,
        layer.k_pool.unsqueeze(2),
        layer.v_pool.unsqueeze(2),
        cache_seqlens=layer.lengths.view(-1).to(torch.int32),
        block_table=layer.block_table.to(torch.int32),
        softmax_scale=scaling,
        causal=False,
    )
    return out.reshape(b, 1, -1)


def paged_layer(
    block_size: int = BLOCK_SIZE, storage: KVStorage | None = None, shared_values: int | None = None
) -> PagedLayer:
    """An empty paged layer storing entries as ``storage`` says: the model's dtype (``None`` or 16
    bits), else quantized (:class:`kvpolicy.quant.QuantizedLayer`)."""
    if storage is None or not storage.quantized:
        return PagedLayer(block_size, shared_values)
    from kvpolicy.quant import KiviLayer, QuantizedLayer  # they build on this module

    kind = KiviLayer if storage.layout == "kivi" else QuantizedLayer
    return kind(block_size, storage, shared_values)


def layer_storage(layer: PagedLayer) -> KVStorage | None:
    """How ``layer`` stores its entries (``None``: the model's dtype)."""
    return getattr(layer, "storage", None)


class KVPolicyCache(Cache):
    """A :class:`PagedLayer` per decoder layer, plus each sequence's next (logical) position.

    ``get_seq_length()`` is the logical length, so ``model.generate`` continues positions at the
    original prompt length even though fewer entries are stored.
    """

    def __init__(
        self,
        num_layers: int,
        block_size: int = BLOCK_SIZE,
        attn_implementation: str = "sdpa",
        without_kv: Sequence[int] = (),
        states: Cache | None = None,
        shared_values: int | None = None,
        storage: KVStorage | None = None,
    ) -> None:
        skip = set(without_kv)
        super().__init__(
            layers=[
                StateLayer() if i in skip else paged_layer(block_size, storage, shared_values)
                for i in range(num_layers)
            ]
        )
        #: the attention backend of the model that filled the cache (what ``model.generate`` will use)
        self.attn_implementation = attn_implementation
        #: the cache object the model's layers are called with on hybrid and latent-attention models:
        #: transformers' own, whose linear-attention layers hold each recurrent and convolution state
        #: (updated in place by the layers themselves) and whose attention slots pass through (MLA's
        #: record the latent for the paged layer); ``None`` for other models. Policies never touch it.
        self.states = states

    def update(
        self,
        key_states: torch.Tensor,
        value_states: torch.Tensor,
        layer_idx: int,
        *args: object,
        **kwargs: object,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """transformers' decode step: refuse, with a clear error, what its one shared mask cannot
        express; then append to layer ``layer_idx``."""
        if layer_idx == 0:
            self._check_dense_decoding()
        return self.layers[layer_idx].update(key_states, value_states, *args, **kwargs)

    def _check_dense_decoding(self) -> None:
        if self.states is not None:
            raise CacheLayoutError(
                "this model's layers keep state in kvpolicy's layer cache (a hybrid's recurrent state, or "
                "latent attention's compressed entries), which model.generate does not read; decode with "
                "kvpolicy.generate"
            )
        lengths = {layer.uniform for layer in self.layers}
        if None in lengths:
            raise CacheLayoutError(
                "the cache's rows (sequence x KV head) hold different numbers of entries, which "
                "transformers' attention cannot take as one tensor; decode with kvpolicy.generate instead"
            )
        masked = self.attn_implementation not in ("sdpa", "flash_attention_2", "flash_attention_3")
        if len(lengths) > 1 and (masked or self.layers[0].num_seqs > 1):
            raise CacheLayoutError(
                f"the cache's layers hold different numbers of entries ({min(lengths)}..{max(lengths)}: "
                f"PyramidKV, PyramidInfer, ...), but model.generate builds one attention mask for all "
                f"layers ({self.attn_implementation!r} attention"
                f"{', padded batch' if self.layers[0].num_seqs > 1 else ''}); decode with kvpolicy.generate, "
                f"or load the model with attn_implementation='sdpa' for a single prompt"
            )

    def prepare_append(self) -> None:
        """Host-side bookkeeping before a decode step appends one entry per row to every layer."""
        for layer in self.layers:
            layer.prepare_append()
            layer.next_position += 1

    def set_next_position(self, position: int) -> None:
        for layer in self.layers:
            layer.next_position = position

    @property
    def kv_lengths(self) -> list[int]:
        """Entries per KV head of sequence 0 in each layer (an int per layer when its heads agree)."""
        return self.kv_lengths_of(0)

    def kv_lengths_of(self, b: int) -> list[int]:
        return [layer.entries(b) for layer in self.layers]

    def kv_head_lengths(self, b: int = 0) -> list[list[int]]:
        """Entries per layer and KV head of sequence ``b``."""
        return [layer.row_lengths(b) for layer in self.layers]

    @property
    def kv_bytes(self) -> list[int]:
        """Bytes held per layer by sequence 0."""
        return self.kv_bytes_of(0)

    def kv_bytes_of(self, b: int) -> list[int]:
        """Bytes sequence ``b`` holds per layer: its keys and values, plus its share of a hybrid
        layer's recurrent and convolution state (constant-size, whatever the context)."""
        held = [layer.nbytes(b) for layer in self.layers]
        for i, _name, t in state_tensors(self.states):
            if t.dim() > 0:  # per-sequence state: the batch is its first dimension
                held[i] += t[0].numel() * t.element_size()
        return held

    def allocated_bytes(self) -> int:
        states = sum(t.numel() * t.element_size() for _i, _n, t in state_tensors(self.states))
        return sum(layer.allocated_bytes() for layer in self.layers) + states
