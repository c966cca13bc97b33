"""Built-in policies. They register through the same hooks as third-party packages.

Compose them freely: ``kvpolicy.compose(propagation=TSP(layer=20, rate=0.1), cache=SnapKV(budget=512))``.
Every propagation policy (``all``, ``tsp``, ``gemfilter``, ``pyramidinfer``) composes with every cache
policy (``full``, ``snapkv``, ``streamingllm``, ``h2o``, ``pyramidkv``, ``pyramidinfer_squeeze``,
``ada`` (head-adaptive budgets around a scoring policy), ``expected_attention``, ``tova``, ``cake``,
``duoattention``, ``critical``, ``defensive`` and ``chunk`` (refinements of a scoring policy), ``keydiff``,
``lagkv``, ``leverage``, ``noncausal_attention``, ``compactor``, ``qfilters``, ``rkv``, ``random``), except
``kvzip``, which scores with a pass over the whole context and composes with ``all`` only.
"""

from kvpolicy.hookspecs import hookimpl
from kvpolicy.policies.adakv import AdaKV, AdaSnapKVPreset
from kvpolicy.policies.baseline_presets import (
    GemFilterPreset,
    H2OPreset,
    PyramidInferPreset,
    PyramidKVPreset,
    StreamingLLMPreset,
)
from kvpolicy.policies.cake import CAKE, CAKEPreset
from kvpolicy.policies.chunkkv import ChunkKV, ChunkKVPreset
from kvpolicy.policies.compactor import Compactor, CompactorPreset, Leverage, NonCausalAttention
from kvpolicy.policies.criticalkv import CriticalAdaKVPreset, CriticalKV, CriticalKVPreset
from kvpolicy.policies.defensivekv import DefensiveKV, DefensiveKVPreset
from kvpolicy.policies.duoattention import DuoAttention, DuoAttentionPreset
from kvpolicy.policies.expected_attention import ExpectedAttention, ExpectedAttentionPreset
from kvpolicy.policies.full import AllTokens, FullCache
from kvpolicy.policies.gemfilter import GemFilter
from kvpolicy.policies.h2o import H2O
from kvpolicy.policies.keydiff import KeyDiff, KeyDiffPreset
from kvpolicy.policies.kvzip import KVzip, KVzipPreset
from kvpolicy.policies.lagkv import LagKV, LagKVPreset
from kvpolicy.policies.presets import FastKVPreset, FullKVPreset, SnapKVPreset
from kvpolicy.policies.pyramidinfer import PyramidInfer, PyramidInferSqueeze
from kvpolicy.policies.pyramidkv import PyramidKV
from kvpolicy.policies.qfilters import QFilters, QFiltersPreset
from kvpolicy.policies.random import Random, RandomPreset
from kvpolicy.policies.rkv import RKV, RKVPreset
from kvpolicy.policies.snapkv import SnapKV
from kvpolicy.policies.streamingllm import StreamingLLM
from kvpolicy.policies.tova import TOVA, TOVAPreset
from kvpolicy.policies.tsp import TSP


@hookimpl
def kvpolicy_register_components() -> list[type]:
    return [
        AllTokens,
        FullCache,
        TSP,
        SnapKV,
        GemFilter,
        PyramidInfer,
        StreamingLLM,
        H2O,
        PyramidKV,
        PyramidInferSqueeze,
        AdaKV,
        CriticalKV,
        DefensiveKV,
        ChunkKV,
        ExpectedAttention,
        TOVA,
        RKV,
        CAKE,
        DuoAttention,
        QFilters,
        KeyDiff,
        LagKV,
        Leverage,
        NonCausalAttention,
        Compactor,
        Random,
        KVzip,
    ]


@hookimpl
def kvpolicy_register_presets() -> list[type]:
    return [
        FullKVPreset,
        SnapKVPreset,
        FastKVPreset,
        StreamingLLMPreset,
        H2OPreset,
        PyramidKVPreset,
        GemFilterPreset,
        PyramidInferPreset,
        AdaSnapKVPreset,
        CriticalKVPreset,
        CriticalAdaKVPreset,
        DefensiveKVPreset,
        ChunkKVPreset,
        ExpectedAttentionPreset,
        TOVAPreset,
        RKVPreset,
        CAKEPreset,
        DuoAttentionPreset,
        QFiltersPreset,
        KeyDiffPreset,
        LagKVPreset,
        CompactorPreset,
        RandomPreset,
        KVzipPreset,
    ]


__all__ = [
    "CAKE",
    "H2O",
    "RKV",
    "TOVA",
    "TSP",
    "AdaKV",
    "AdaSnapKVPreset",
    "AllTokens",
    "CAKEPreset",
    "ChunkKV",
    "ChunkKVPreset",
    "Compactor",
    "CompactorPreset",
    "CriticalAdaKVPreset",
    "CriticalKV",
    "CriticalKVPreset",
    "DefensiveKV",
    "DefensiveKVPreset",
    "DuoAttention",
    "DuoAttentionPreset",
    "ExpectedAttention",
    "ExpectedAttentionPreset",
    "FastKVPreset",
    "FullCache",
    "FullKVPreset",
    "GemFilter",
    "GemFilterPreset",
    "H2OPreset",
    "KVzip",
    "KVzipPreset",
    "KeyDiff",
    "KeyDiffPreset",
    "LagKV",
    "LagKVPreset",
    "Leverage",
    "NonCausalAttention",
    "PyramidInfer",
    "PyramidInferPreset",
    "PyramidInferSqueeze",
    "PyramidKV",
    "PyramidKVPreset",
    "QFilters",
    "QFiltersPreset",
    "RKVPreset",
    "Random",
    "RandomPreset",
    "SnapKV",
    "SnapKVPreset",
    "StreamingLLM",
    "StreamingLLMPreset",
    "TOVAPreset",
]
