"""Quantized KV storage: fewer bytes per kept entry, under any cache and propagation policy.

Eviction decides *which* entries a layer keeps; storage decides *how many bytes* each kept entry takes.
The two are independent, so storage is a setting of the composed :class:`~kvpolicy.interfaces.Policy`
(``kvpolicy.compose(..., storage=KVStorage(bits=4))``, ``get_policy("snapkv", kv_bits=4)``), never of a
cache policy: every policy composes with every width.

Why this layout (per token, groups of channels, scales stored beside the codes, one set per slot):

* **Where quantization happens.** Policies score on full-precision keys and values at prefill: entries
  are quantized when they are *stored* (``PagedLayer.store`` / ``write``), after selection. Decode
  attention reads the stored (quantized) entries, so decode-time policies (H2O, TOVA, R-KV) score
  what decode attention sees.
* **Exact moves.** The paged cache evicts in place by moving a row's last entry into the freed slot
  (:meth:`kvpolicy.cache.PagedLayer.evict`). With every scale stored per slot, a move copies codes and
  scales and changes nothing: a decode-time eviction never re-rounds an entry.
* **KIVI's layout** (the default at 4 and 2 bits: ``kv_bits=4``, ``"kivi4"``; ``"int4"`` is per token;
  arXiv 2402.02750, official
  ``models/llama_kivi.py``): keys quantized *per channel* over groups of ``group_size`` entries (key
  outliers sit in fixed channels, so a channel's range across tokens is narrow where a token's range
  across channels is not), values per token as above, and the most recent entries of each row kept in
  full precision in a *residual* of ``residual`` entries that is quantized as a whole when it fills.
  Per-channel groups share one scale across tokens, which a move into another group would have to
  re-round; so each slot stores the index of its key group's scale record instead
  (:class:`kvpolicy.quant.KiviLayer`), and a move copies codes and index: still exact.
* **Asymmetric integers** (``bits`` 8, 4, 2; KIVI's quantizer, arXiv 2402.02750, ``quant/new_pack.py``):
  per group of ``group_size`` channels of one entry, ``scale = (max - min) / (2^bits - 1)`` and
  ``zero = min``, codes ``round((x - zero) / scale)`` packed ``8 / bits`` to a byte (code ``j`` of a byte
  in bits ``j * bits ...``). Scale and zero are float16, as KIVI's: at 32 channels a group that is one
  bit per element, which the byte counts include.
* **fp8 e4m3** (``format="fp8"``): per group, ``scale = amax / 448`` (float16) and codes
  ``x / scale`` in ``torch.float8_e4m3fn``: vLLM's ``fp8`` KV cache with a per-group scale instead of
  an uncalibrated per-tensor one. The Triton kernel decodes e4m3 by moving its bits into a float16
  (exact, any GPU), so it needs no fp8 hardware.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from kvpolicy.listing import STORAGE_WIDTHS, storage_problem

#: Largest magnitude float8 e4m3 (``torch.float8_e4m3fn``) holds.
FP8_MAX = 448.0
#: Dtype of the stored scales and zero points (KIVI's).
SCALE_DTYPE = torch.float16
#: Bytes of the per-slot key-record index of KIVI's layout (``int32``).
KIVI_INDEX_BYTES = 4


class KVStorage(BaseModel):
    """How each kept KV entry is stored: ``bits`` per element (16: the model's own dtype, unchanged).

    Attributes:
        bits: 16 (no quantization), 8, 4 or 2 bits per key and value element.
        format: ``"int"`` (asymmetric integers with a float16 scale and zero point per group) or
            ``"fp8"`` (float8 e4m3 with a float16 scale per group; ``bits=8`` only).
        group_size: channels of one entry sharing a scale (KIVI's 32); a head narrower than it is one
            group, a wider one must be a multiple of it. With ``layout="kivi"``, also the entries a key
            scale record covers.
        layout: ``"token"`` (every entry's scales its own) or ``"kivi"`` (keys per channel in groups of
            ``group_size`` entries, values per token, a full-precision residual; ``format="int"``).
            Default: ``"kivi"`` at 4 and 2 bits (measured: it keeps Gemma 3's needles where per-token
            int4 loses 3 in 10 and int2 all; ``docs/storage.md``), ``"token"`` at 8.
        residual: with ``layout="kivi"``, recent entries per row kept in full precision before they are
            quantized together (KIVI's ``residual_length``: 32 in its ``example.py``, 128 in its
            long-context runs; a multiple of ``group_size``; default the larger of 32 and it).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    bits: Literal[16, 8, 4, 2] = 16
    format: Literal["int", "fp8"] = "int"
    group_size: int = Field(32, ge=1)
    layout: Literal["token", "kivi"] = "token"
    residual: int = Field(32, ge=1)

    @model_validator(mode="before")
    @classmethod
    def _default_layout(cls, data: Any) -> Any:
        """KIVI's layout unless told otherwise at 4 and 2 integer bits, with a residual of whole groups."""
        if not isinstance(data, dict):
            return data
        if data.get("layout") is None:
            kivi = data.get("bits", 16) in (4, 2) and data.get("format", "int") == "int"
            data = {**data, "layout": "kivi" if kivi else "token"}
        if data.get("residual") is None:
            data = {**data, "residual": max(32, int(data.get("group_size", 32)))}
        return data

    @model_validator(mode="after")
    def _fp8_is_eight_bits(self) -> KVStorage:
        if self.format == "fp8" and self.bits != 8:
            raise ValueError(f"format='fp8' stores 8 bits per element, got bits={self.bits}; use bits=8")
        if self.format == "fp8" and not hasattr(torch, "float8_e4m3fn"):
            raise ValueError(
                f"fp8 storage needs torch's float8_e4m3fn (torch >= 2.1), which torch {torch.__version__} lacks; "
                f"use kv_bits=8 (int8) or upgrade torch"
            )
        if self.group_size & (self.group_size - 1):
            raise ValueError(f"group_size must be a power of two (the kernel's tiles), got {self.group_size}")
        if self.layout == "kivi" and (self.format != "int" or not self.quantized):
            raise ValueError(
                f"layout='kivi' quantizes integers (bits 8, 4 or 2, format='int'), got bits={self.bits}, "
                f"format={self.format!r}; "
                f"use kv_bits='kivi4' or 'kivi2'"
            )
        if self.layout == "kivi" and self.residual % self.group_size:
            raise ValueError(
                f"residual={self.residual} must be a multiple of group_size={self.group_size} (a full "
                f"residual is quantized as whole groups of keys)"
            )
        return self

    @classmethod
    def parse(cls, value: Any) -> KVStorage:
        """A storage from what a user writes: ``16``, ``8``, ``4``, ``2``, ``"int8"``, ``"int4"``,
        ``"int2"``, ``"kivi4"``, ``"kivi2"``, ``"fp8"``, ``"16"``, a dict of the fields, or a
        :class:`KVStorage`; ``None`` is 16. ``4`` and ``2`` take the default layout (KIVI's)."""
        if value is None or isinstance(value, KVStorage):
            return value or cls()
        if isinstance(value, dict):
            return cls(**value)
        problem = storage_problem(value)
        if problem is not None:
            raise ValueError(problem)
        text = str(value).strip().lower()
        if text == "fp8":
            return cls(bits=8, format="fp8")
        # "4", "2": the default layout (KIVI's); "int4", "int2": per token; "kivi4", "kivi2": KIVI's
        layout = "kivi" if text.startswith("kivi") else "token" if text.startswith("int") else None
        return cls(bits=STORAGE_WIDTHS[text], layout=layout)

    @property
    def quantized(self) -> bool:
        return self.bits < 16

    @property
    def label(self) -> str:
        """``"fp16"``-free short name: ``"16-bit"``, ``"int8"``, ``"fp8"``, ``"kivi4"``, ``"kivi2"``, and
        ``"int4"``, ``"int2"`` for the per-token layout at 4 and 2 bits (what :meth:`parse` reads back)."""
        if not self.quantized:
            return "16-bit"
        if self.layout == "kivi":
            return f"kivi{self.bits}"
        return "fp8" if self.format == "fp8" else f"int{self.bits}"

    def group(self, width: int) -> int:
        """Channels per group for a head ``width`` wide (the whole head when narrower than
        ``group_size``); a width that does not split into groups is a clear error."""
        g = min(self.group_size, width)
        if width % g or (8 // self.bits if self.format == "int" else 1) > g:
            raise ValueError(
                f"{self.label} storage in groups of {self.group_size} channels does not fit a {width}-wide "
                f"head; use a group_size dividing {width}"
            )
        return g

    def bytes_per_element(self, width: int) -> float:
        """Bytes one element of a ``width``-wide head takes stored: its code plus its share of the
        group's float16 scale (and zero point for integers)."""
        if not self.quantized:
            raise ValueError("16-bit storage is the model's dtype: its bytes are the dtype's")
        scales = 1 if self.format == "fp8" else 2
        per = self.bits / 8 + scales * SCALE_DTYPE.itemsize / self.group(width)
        if self.layout == "kivi":  # plus each entry's int32 key-record index, shared by key and value
            per += KIVI_INDEX_BYTES / (2 * width)
        return per

    def residual_bytes(self, d: int, dv: int, element_size: int) -> int:
        """Bytes of one row's full-precision residual (``layout="kivi"``; else 0): ``residual`` keys
        and values at the model's ``element_size``, held whether or not the residual is full."""
        return self.residual * (d + dv) * element_size if self.layout == "kivi" else 0

    def to_dict(self) -> dict[str, Any]:
        out = self.model_dump(mode="json")
        if self.layout == "token":  # no residual; at 8 bits the form (and result keys) it always had
            del out["residual"]
            if self.bits not in (4, 2):
                del out["layout"]
        return out


def _unpacked(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """``(..., n / k)`` bytes of ``k = 8 / bits`` codes each → ``(..., n)`` codes (``uint8``)."""
    per = 8 // bits
    if per == 1:
        return codes
    mask = (1 << bits) - 1
    parts = [(codes >> (j * bits)) & mask for j in range(per)]
    return torch.stack(parts, dim=-1).flatten(-2)


def _packed(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """``(..., n)`` codes below ``2^bits`` → ``(..., n / k)`` bytes, code ``j`` of byte ``m`` being element
    ``m * k + j`` in bits ``j * bits ...`` (what :func:`_unpacked` and the Triton kernel read)."""
    per = 8 // bits
    if per == 1:
        return codes
    grouped = codes.view(*codes.shape[:-1], -1, per)
    out = grouped[..., 0].clone()
    for j in range(1, per):
        out |= grouped[..., j] << (j * bits)
    return out


def quantize(x: torch.Tensor, storage: KVStorage) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Quantize entries ``x (..., w)`` per group of channels.

    Returns:
        ``codes`` ``(..., w * bits / 8)`` ``uint8`` (fp8: the e4m3 bytes), ``scale`` ``(..., w / g)``
        float16, and ``zero`` ``(..., w / g)`` float16 (``None`` for fp8, which is symmetric).
    """
    w = x.shape[-1]
    g = storage.group(w)
    groups = x.float().reshape(*x.shape[:-1], w // g, g)
    if storage.format == "fp8":
        amax = groups.abs().amax(dim=-1)
        scale = (amax / FP8_MAX).to(SCALE_DTYPE)
        tiny = torch.finfo(SCALE_DTYPE).tiny
        safe = torch.where(scale > 0, scale.float(), 1.0)
        scaled = (groups / safe[..., None]).clamp(-FP8_MAX, FP8_MAX)
        scale = torch.where(amax > 0, scale.clamp_min(tiny), 0.0).to(SCALE_DTYPE)
        codes = scaled.reshape(x.shape).to(torch.float8_e4m3fn).view(torch.uint8)
        return codes, scale, None
    qmax = (1 << storage.bits) - 1
    lo, hi = groups.amin(dim=-1), groups.amax(dim=-1)
    scale, zero = ((hi - lo) / qmax).to(SCALE_DTYPE), lo.to(SCALE_DTYPE)
    safe = torch.where(scale > 0, scale.float(), 1.0)
    codes = ((groups - zero.float()[..., None]) / safe[..., None]).round().clamp(0, qmax)
    return _packed(codes.to(torch.uint8).reshape(x.shape), storage.bits), scale, zero


def dequantize(
    codes: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor | None,
    storage: KVStorage,
    dtype: torch.dtype,
) -> torch.Tensor:
    """The entries :func:`quantize` stored, ``(..., w)`` in ``dtype`` (computed in float32)."""
    if storage.format == "fp8":
        values = codes.view(torch.float8_e4m3fn).float()
    else:
        values = _unpacked(codes, storage.bits).float()
    groups = values.view(*values.shape[:-1], scale.shape[-1], -1) * scale.float()[..., None]
    if zero is not None:
        groups = groups + zero.float()[..., None]
    return groups.flatten(-2).to(dtype)
