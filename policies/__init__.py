"""Built-in policies. They register through the same hooks as third-party packages.

Compose them freely: ``kvpolicy.compose(propagation=TSP(layer=20, rate=0.1), cache=SnapKV(budget=512))``.
"""

from kvpolicy.hookspecs import hookimpl
from kvpolicy.policies.full import AllTokens, FullCache
from kvpolicy.policies.presets import FastKVPreset, FullKVPreset, SnapKVPreset
from kvpolicy.policies.snapkv import SnapKV
from kvpolicy.policies.tsp import TSP


@hookimpl
def kvpolicy_register_components() -> list[type]:
    return [AllTokens, FullCache, TSP, SnapKV]


@hookimpl
def kvpolicy_register_presets() -> list[type]:
    return [FullKVPreset, SnapKVPreset, FastKVPreset]


__all__ = ["TSP", "AllTokens", "FastKVPreset", "FullCache", "FullKVPreset", "SnapKV", "SnapKVPreset"]
