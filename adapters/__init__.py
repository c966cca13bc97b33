"""Model adapters: one per model family, each driving the model's own modules.

Built-in adapters register through the same ``kvpolicy_register_adapters`` hook as third-party ones.
"""

from kvpolicy.adapters.base import AdapterError, DecoderAdapter
from kvpolicy.adapters.generic import GenericAdapter
from kvpolicy.adapters.llama import LlamaAdapter
from kvpolicy.adapters.qwen import Qwen2Adapter, Qwen3Adapter
from kvpolicy.hookspecs import hookimpl


@hookimpl
def kvpolicy_register_adapters() -> list[type[DecoderAdapter]]:
    # Family adapters first; the generic one serves every other decoder-only model it can drive.
    return [LlamaAdapter, Qwen2Adapter, Qwen3Adapter, GenericAdapter]


__all__ = ["AdapterError", "DecoderAdapter", "GenericAdapter", "LlamaAdapter", "Qwen2Adapter", "Qwen3Adapter"]
