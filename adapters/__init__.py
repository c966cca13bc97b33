"""Model adapters: one per model family, each driving the model's own modules.

Built-in adapters register through the same ``kvpolicy_register_adapters`` hook as third-party ones.
"""

from kvpolicy.adapters.base import AdapterError, DecoderAdapter
from kvpolicy.adapters.llama import LlamaAdapter
from kvpolicy.adapters.qwen import Qwen2Adapter, Qwen3Adapter
from kvpolicy.hookspecs import hookimpl


@hookimpl
def kvpolicy_register_adapters() -> list[type[DecoderAdapter]]:
    return [LlamaAdapter, Qwen2Adapter, Qwen3Adapter]


__all__ = ["AdapterError", "DecoderAdapter", "LlamaAdapter", "Qwen2Adapter", "Qwen3Adapter"]
