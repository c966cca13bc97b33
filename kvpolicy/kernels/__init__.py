"""Optional Triton kernels for kvpolicy's paged cache (``pip install triton``; it ships with torch's CUDA wheels).

Importing this package imports neither Triton nor a kernel module, so it works where Triton is absent:
callers ask :func:`available` first and only then use :func:`paged_decode_attention` (loaded on first
access), falling back to :func:`kvpolicy.cache.paged_attention` otherwise.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable
from typing import Any

import torch

__all__ = ["DECODE_ATTENTION_ENV", "available", "decode_attention_for", "paged_decode_attention"]

#: Environment variable that picks the decode attention: ``torch`` or ``triton`` (default: ``triton`` on
#: CUDA where Triton imports, else ``torch``).
DECODE_ATTENTION_ENV = "KVPOLICY_DECODE_ATTENTION"


def available() -> bool:
    """Whether the Triton kernels can run here: Triton imports, and either CUDA is present or
    ``TRITON_INTERPRET=1`` asks for Triton's interpreter (CPU tensors; slow, for tests and tiny shapes).

    Imports Triton when called (not when this package is imported): a broken install counts as absent.
    """
    try:
        importlib.import_module("triton")
    except Exception:  # ImportError, or a Triton build that fails on import (missing driver libraries)
        return False
    return torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET", "0") == "1"


def decode_attention_for(device: torch.device) -> Callable[..., Any]:
    """The decode attention over the paged cache for tensors on ``device`` (the contract of
    :func:`kvpolicy.cache.paged_attention`): the split-K Triton kernel on CUDA where Triton imports
    (each kept entry read once, fp32 accumulation), else the torch implementation,
    which stays the CPU path and the reference. ``KVPOLICY_DECODE_ATTENTION=torch|triton`` overrides
    (``triton`` on a CPU runs Triton's interpreter: set ``TRITON_INTERPRET=1``; tests only)."""
    from kvpolicy.cache import paged_attention

    choice = os.environ.get(DECODE_ATTENTION_ENV, "").strip().lower()
    if choice not in ("", "torch", "triton"):
        raise ValueError(f"{DECODE_ATTENTION_ENV}={choice!r}: use 'torch' or 'triton'")
    if choice == "torch":
        return paged_attention
    if choice == "triton" or (device.type == "cuda" and available()):
        if not available():
            raise RuntimeError(
                f"{DECODE_ATTENTION_ENV}=triton but Triton cannot run here: install it (pip install triton) "
                f"and, without a GPU, set TRITON_INTERPRET=1"
            )
        from kvpolicy.kernels.paged_decode import paged_decode_attention

        return paged_decode_attention
    return paged_attention


def __getattr__(name: str) -> Any:
    # the kernel module only on first use, so importing kvpolicy.kernels stays free of Triton
    if name == "paged_decode_attention":
        from kvpolicy.kernels.paged_decode import paged_decode_attention

        return paged_decode_attention
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
