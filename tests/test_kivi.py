"""KIVI's layout (``layout="kivi"``, ``kv_bits="kivi4"``/``"kivi2"``): keys per channel in groups of
entries, values per token, a full-precision residual quantized when it fills. The layer is checked
against a reference written here from the paper's description, one row at a time in plain Python,
through prefill, appends, flushes, evictions (holes in the residual included) and compaction."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import TINY_OPTIONS
from test_batch import _options, _presets, _prompts
from test_storage import _composes, _parts

import kvpolicy
from kvpolicy.cache import PagedLayer, paged_attention, paged_layer
from kvpolicy.quant import KiviLayer
from kvpolicy.storage import KVStorage, dequantize, quantize

#: Small groups and residual, so the tiny model's short rows flush several times in a few tokens.
TINY_KIVI = {"layout": "kivi", "group_size": 8, "residual": 8}


def _per_channel(keys: list[torch.Tensor], bits: int) -> list[torch.Tensor]:
    """KIVI's key quantization of one group: per channel over the group's entries (float16 scale and
    zero point, asymmetric, round to nearest), dequantized."""
    x = torch.stack(keys).float()
    lo, hi = x.amin(0), x.amax(0)
    scale, zero = ((hi - lo) / ((1 << bits) - 1)).half().float(), lo.half().float()
    safe = torch.where(scale > 0, scale, 1.0)
    codes = ((x - zero) / safe).round().clamp(0, (1 << bits) - 1)
    return list(codes * scale + zero)


def _per_token(value: torch.Tensor, storage: KVStorage) -> torch.Tensor:
    return dequantize(*quantize(value, storage), storage, torch.float32)


class Row:
    """One (sequence, KV head) row as KIVI keeps it: ``entries[slot] = [key, value, residual position
    or None, stored key, stored value]``, in the slots the paged cache keeps them in."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, storage: KVStorage) -> None:
        self.storage, w, g = storage, storage.residual, storage.group_size
        n = keys.shape[0]
        cut = n // w * w
        self.entries = [
            [k, v, j - cut if j >= cut else None, k, v]
            for j, (k, v) in enumerate(zip(keys, values, strict=True))
        ]
        for start in range(0, cut, g):
            self._quantize(self.entries[start : start + g])
        self.used = n - cut

    def _quantize(self, group: list[list]) -> None:
        for entry, key in zip(group, _per_channel([e[0] for e in group], self.storage.bits), strict=True):
            entry[2:] = [None, key, _per_token(entry[1], self.storage)]

    def append(self, key: torch.Tensor, value: torch.Tensor) -> None:
        self.entries.append([key, value, self.used, key, value])
        self.used += 1
        if self.used == self.storage.residual:  # full: its held entries, group by group
            for start in range(0, self.used, self.storage.group_size):
                group = [
                    e
                    for e in self.entries
                    if e[2] is not None and start <= e[2] < start + self.storage.group_size
                ]
                if group:
                    self._quantize(group)
            self.used = 0

    def evict(self, slots: list[int]) -> None:
        done = set()
        for s in sorted(slots, reverse=True):
            if 0 <= s < len(self.entries) and s not in done:
                done.add(s)
                self.entries[s] = self.entries[-1]
                self.entries.pop()


def _check(layer: PagedLayer, rows: list[Row]) -> None:
    keys, values = layer.dense(layer.k_pool), layer.dense(layer.v_pool)
    heads = layer.num_heads
    for i, row in enumerate(rows):
        b, h = divmod(i, heads)
        assert int(layer.lengths[b, h]) == len(row.entries)
        for slot, entry in enumerate(row.entries):
            assert torch.equal(keys[b, h, slot], entry[3]), (i, slot)
            assert torch.equal(values[b, h, slot], entry[4]), (i, slot)


@pytest.mark.parametrize("bits", [4, 2])
def test_the_layer_keeps_what_kivi_keeps(bits):
    """Prefill (whole residuals quantized, the rest in full precision), appends that flush, evictions
    that leave holes in a residual and move its entries, compaction: every slot holds exactly the key and
    value KIVI's reference keeps, and moves never re-round an entry."""
    storage = KVStorage(bits=bits, **TINY_KIVI)
    parts = _parts([[19, 5], [12, 16]])
    layer = paged_layer(4, storage)
    assert isinstance(layer, KiviLayer) and storage.label == f"kivi{bits}"
    layer.store(parts, reserve=1)
    rows = [
        Row(k[h, : int(c[h])], v[h, : int(c[h])], storage) for k, v, _p, c in parts for h in range(k.shape[0])
    ]
    _check(layer, rows)
    g = torch.Generator().manual_seed(5)

    def append(steps: int, at: int) -> None:
        for step in range(steps):  # appends past the reserve grow pages and the record pool
            key, value = torch.randn(2, 2, 1, 16, generator=g), torch.randn(2, 2, 1, 16, generator=g)
            layer.append(key, value, torch.tensor([at + step] * 2))
            for i, row in enumerate(rows):
                row.append(key.view(4, 16)[i], value.view(4, 16)[i])
            _check(layer, rows)

    append(11, 20)
    slots = torch.tensor([[[0, 25], [2, -1]], [[5, 5], [22, 0]]])  # 25, 22: entries still in a residual
    layer.evict(slots)
    for row, s in zip(rows, slots.view(4, 2).tolist(), strict=True):
        row.evict(s)
    _check(layer, rows)
    append(9, 40)  # a residual with holes flushes; moved residual entries are quantized where they are
    pick = [[0, 2, 4, 21, 23], [1, 3, 0, 24, 20]]
    layer.keep(torch.tensor([pick]), seq=1)
    for row, idx in zip(rows[2:], pick, strict=True):
        row.entries = [row.entries[j] for j in idx]
    _check(layer, rows)
    append(9, 60)


def test_records_of_evicted_entries_are_reclaimed():
    """A decode-time policy evicting as fast as decoding appends keeps the record pool proportional to the
    entries held (records no entry points at are dropped before the pool grows), and every slot still
    holds what KIVI's reference keeps."""
    storage = KVStorage(bits=4, group_size=4, residual=8)
    parts = _parts([[16, 16]])
    layer = paged_layer(4, storage)
    layer.store(parts)
    rows = [Row(k[h], v[h], storage) for k, v, _p, _c in parts for h in range(2)]
    g = torch.Generator().manual_seed(2)
    for step in range(300):
        key, value = torch.randn(1, 2, 1, 16, generator=g), torch.randn(1, 2, 1, 16, generator=g)
        layer.append(key, value, torch.tensor([16 + step]))
        slots = torch.tensor([[[step % 16], [(3 * step) % 17]]])
        layer.evict(slots)
        for i, row in enumerate(rows):
            row.append(key.view(2, 16)[i], value.view(2, 16)[i])
            row.evict(slots[0, i].tolist())
        if step % 50 == 49:
            _check(layer, rows)
    # without reclaiming: 1 + 8 prefill records + 2 rows x 2 records per flush x 38 flushes, and the sink
    assert layer.rec_scale.shape[0] < 64 < 1 + 8 + 2 * 2 * 38 + 1


def test_parse_and_settings():
    assert KVStorage.parse("kivi4") == KVStorage(bits=4, layout="kivi")
    assert KVStorage.parse("KIVI2").label == "kivi2"
    assert kvpolicy.get_policy("snapkv", kv_bits="kivi2").describe().endswith("@ kivi2 KV")
    policy = kvpolicy.get_policy("snapkv", kv_bits="kivi4")
    assert kvpolicy.policy_from_dict(policy.to_dict()) == policy
    assert "layout" not in kvpolicy.get_policy("snapkv", kv_bits=8).to_dict()["storage"]  # keys as before
    assert kvpolicy.get_policy("snapkv", kv_bits=4).storage == KVStorage.parse("kivi4")  # the default at 4
    per_token = kvpolicy.get_policy("snapkv", kv_bits="int4")
    assert per_token.storage.layout == "token" and kvpolicy.policy_from_dict(per_token.to_dict()) == per_token
    with pytest.raises(ValueError, match=r"layout='kivi' quantizes integers.*fp8"):
        KVStorage(bits=8, format="fp8", layout="kivi")
    with pytest.raises(ValueError, match="residual=40 must be a multiple of group_size=32"):
        KVStorage(bits=4, layout="kivi", residual=40)


def test_bytes_are_codes_records_index_and_residual():
    """``nbytes``: per kept entry key and value codes, the value's per-token scales, the key's share of
    its group's per-channel record and its int32 record index; per row, the full-precision residual."""
    storage = KVStorage(bits=2, layout="kivi")
    layer = paged_layer(4, storage)
    layer.store(_parts([[70, 40]], d=64, dv=64))
    per_entry = 2 * 64 * 2 / 8 + 2 * (64 * 4 / 32) + 4
    assert layer.nbytes(0) == math.ceil(110 * per_entry) + 2 * 32 * 128 * 4  # fp32 residual per row
    assert storage.bytes_per_element(64) * 128 == per_entry


def test_kivi_errs_less_than_per_token_keys_on_outlier_channels():
    """Why the layout: keys with a few large channels (as real keys have) lose more under per-token
    groups than under per-channel ones, at the same bits."""
    g = torch.Generator().manual_seed(0)
    keys = torch.randn(1, 2, 96, 32, generator=g) * torch.linspace(0.2, 1, 32)
    keys[..., 3] += 12  # an outlier channel
    parts = [(keys[0], torch.randn(2, 96, 32, generator=g), torch.arange(96).expand(2, -1), None)]
    query = torch.randn(1, 4, 1, 32, generator=torch.Generator().manual_seed(3))
    plain = PagedLayer(8)
    plain.store(parts)
    want, _ = paged_attention(query, plain, 32**-0.5)
    errors = {}
    for name, storage in (("int2", KVStorage(bits=2, layout="token")), ("kivi2", KVStorage(bits=2))):
        layer = paged_layer(8, storage)
        layer.store(parts)
        errors[name] = float((paged_attention(query, layer, 32**-0.5)[0] - want).abs().max())
    assert errors["kivi2"] < errors["int2"] / 2


@pytest.mark.parametrize("preset", _presets())
def test_every_preset_composes_with_kivi(model, preset):
    """Every registered preset in KIVI's layout: a batch decodes as each prompt alone, graph-replayed
    decode equals eager, the same entries are kept as at 16 bits (:func:`test_storage._composes`), over
    enough tokens that residuals flush and decode-time policies evict flushed and residual entries."""
    options = _options(preset, TINY_OPTIONS)
    plain = kvpolicy.get_policy(preset, **options)
    storage = KVStorage(bits=2, **TINY_KIVI)  # (widths differ only in packing: the layer test has both)
    _composes(model, plain.with_storage(storage), plain, _prompts((90, 40, 7)), new_tokens=20)


@pytest.mark.parametrize("bits", [4, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_kernel_reads_records_and_residual_as_fp64_reads_the_dequantized_cache(monkeypatch, bits, dtype):
    """The Triton kernel (interpreted) in KIVI's layout: keys dequantized with each slot's record, values
    with their own scales, residual entries read as stored; equal to fp64 attention over the dequantized
    cache and to the torch path, after prefill, appends that flush, and evictions that move residual
    entries and leave holes (ragged rows, splits, soft-cap)."""
    pytest.importorskip("triton")
    from test_paged_kernel import check

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    from kvpolicy.kernels.paged_decode import paged_decode_attention as kernel

    parts = [(k.to(dtype), v.to(dtype), p, c) for k, v, p, c in _parts([[19, 5], [12, 16]], d=32, dv=16)]
    layer = paged_layer(4, KVStorage(bits=bits, layout="kivi", group_size=8, residual=8))
    layer.store(parts, reserve=2)
    check(kernel, layer, 2)
    g = torch.Generator().manual_seed(1)
    for step in range(5):
        key = torch.randn(2, 2, 1, 32, generator=g).to(dtype)
        layer.append(key, torch.randn(2, 2, 1, 16, generator=g).to(dtype), torch.tensor([30 + step] * 2))
    layer.evict(torch.tensor([[[0, 22], [1, -1]], [[3, 3], [17, 2]]]))
    assert int((layer.k_rec < 0).sum()) > 0  # entries in residuals, some moved by the evictions
    check(kernel, layer, 3, splits=2, softcap=5.0)
