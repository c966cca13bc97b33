"""Latency and memory benchmarks (``kvpolicy bench``) and the cost model that bounds them."""

from kvpolicy.bench.costmodel import ModelShape, decode_bytes_per_token, prefill_flops, speedup_bound
from kvpolicy.bench.runner import benchmark

__all__ = ["ModelShape", "benchmark", "decode_bytes_per_token", "prefill_flops", "speedup_bound"]
