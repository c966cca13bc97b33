"""The method table of the kvpress parity harness: kvpress press <-> kvpolicy policy, per ratio.

Standard library only: both halves of the harness import it, each in its own venv, and evaluate
the two strings in their own namespace (``press`` in kvpress's, ``policy`` in kvpolicy's).

Names available to the expressions:

* ``r``: kvpress's compression ratio, the fraction of the cache *removed* (0.25 / 0.5 / 0.75);
* ``n``: entries kvpress keeps per layer and KV head, ``max(1, int(T * (1 - r)))``
  (``kvpress.utils.compute_n_kept``), handed to kvpolicy as an int (token) budget so neither side
  rounds a fraction its own way;
* ``T``: the prompt length in tokens;
* ``qfilters``: path of the Q-Filters kvpolicy ships for the embedded model (a plain JSON list);
* ``head_map``: path of kvpolicy's calibrated DuoAttention head map for the embedded model
  (``tests/data/duo_smollm2_head_map.json``: ``kvpolicy calibrate --duo-heads``, sink 64, recent 256);
  the kvpress side injects the same map into ``DuoAttentionPress`` instead of its hub download.

Settings are kvpress 0.5.5's defaults; kvpolicy's are set to them where its own defaults differ
(SnapKV's window 8 / kernel 7 / max-pooling are FastKV's; kvpress uses 64 / 5 / average).
A row with ``"context": "chat"`` runs on the chat template's prefix followed by the context (kvpress's
pipeline sends KVzip's context that way). Rows for methods a file in ``policies/`` does not implement yet are skipped by the kvpolicy side
(``requires``: the component kind that must be registered).
"""

from __future__ import annotations

RATIOS = (0.25, 0.5, 0.75)
LENGTHS = (1536, 3072)

_SNAP_PRESS = "SnapKVPress(compression_ratio=r, window_size=64, kernel_size=5)"
_SNAP_POLICY = "SnapKV(budget=n, window=64, kernel=5, pooling='avg')"
_EA_PRESS = "ExpectedAttentionPress(compression_ratio=r)"
_EA_POLICY = "ExpectedAttention(budget=n)"

#: name -> press expression, policy expression, the component kind kvpolicy needs, a note.
METHODS: dict[str, dict[str, str]] = {
    "SnapKV": {
        "press": _SNAP_PRESS,
        "policy": f"compose(cache={_SNAP_POLICY})",
        "requires": "snapkv",
        "note": "kvpress window 64, kernel 5, mean over window and group (kvpolicy sums: same order)",
    },
    "StreamingLLM": {
        "press": "StreamingLLMPress(compression_ratio=r, n_sink=4)",
        "policy": "compose(cache=StreamingLLM(budget=n, sinks=4))",
        "requires": "streamingllm",
        "note": "4 sinks + the last n - 4 tokens",
    },
    "TOVA": {
        "press": "TOVAPress(compression_ratio=r)",
        "policy": "compose(cache=TOVA(budget=n, evict_during_decode=False))",
        "requires": "tova",
        "note": "last query's attention averaged over all query heads, one set for every KV head",
    },
    "ExpectedAttention": {
        "press": _EA_PRESS,
        "policy": f"compose(cache={_EA_POLICY})",
        "requires": "expected_attention",
        "note": "512 future positions, 4 sinks, covariance, value norms (both defaults)",
    },
    "AdaKV(SnapKV)": {
        "press": f"AdaKVPress({_SNAP_PRESS}, alpha_safeguard=0.2)",
        "policy": f"compose(cache=AdaKV(inner={_SNAP_POLICY}, floor=0.2))",
        "requires": "ada",
        "note": "head-wise: kvpress masks, kvpolicy keeps a ragged cache",
    },
    "AdaKV(ExpectedAttention)": {
        "press": f"AdaKVPress({_EA_PRESS}, alpha_safeguard=0.2)",
        "policy": f"compose(cache=AdaKV(inner={_EA_POLICY}, floor=0.2))",
        "requires": "ada",
        "note": "head-wise",
    },
    "DuoAttention": {
        "press": "duo_press(head_compression_ratio=r, head_map=head_map)",
        "policy": "compose(cache=DuoAttention(head_map_file=head_map, ratio=r, sink=64, recent=256))",
        "requires": "duoattention",
        "note": "r is the share of *heads* that stream (kvpress head_compression_ratio); kvpolicy's head map in both",
    },
    "PyramidKV": {
        "press": "PyramidKVPress(compression_ratio=r, window_size=64, kernel_size=5, beta=20)",
        "policy": "compose(cache=PyramidKV(budget=n, window=64, kernel=5, pooling='avg', beta=20))",
        "requires": "pyramidkv",
        "note": "per-layer budgets differ: kvpress rewrote KVCache-Factory's schedule, kvpolicy keeps it",
    },
    "KNorm": {
        "press": "KnormPress(compression_ratio=r)",
        "policy": "compose(cache=KeyNorm(budget=n, window=0))",
        "requires": "keynorm",
        "note": "contrib/kvpolicy-keynorm (kind keynorm): lowest key norms",
    },
    "KVzip": {
        "press": "KVzipPress(compression_ratio=r)",
        "policy": "compose(cache=KVzip(budget=1 - r))",
        "requires": "kvzip",
        "context": "chat",
        "note": "context after the chat template's prefix; one chunk up to 2048 tokens (3K: two chunks, see README)",
    },
    "QFilters": {
        "press": "qfilter_press(compression_ratio=r, filters=qfilters)",
        "policy": "compose(cache=QFilters(budget=n, filters_file=qfilters))",
        "requires": "qfilters",
        "note": "kvpolicy's shipped SmolLM2 filters injected into kvpress's press (no hub download)",
    },
    "KeyDiff": {
        "press": "KeyDiffPress(compression_ratio=r)",
        "policy": "compose(cache=KeyDiff(budget=n))",
        "requires": "keydiff",
        "note": "cosine to the mean normalised key, no sinks",
    },
    "LagKV": {
        "press": "LagKVPress(compression_ratio=r, n_sink=4, lag_size=128)",
        "policy": "compose(cache=LagKV(budget=n, n_sink=4, lag_size=128))",
        "requires": "lagkv",
        "note": "partitions of 128 scored against the next; sinks and tail tie in kvpress (policies/lagkv.py)",
    },
    "Compactor": {
        "press": "CompactorPress(compression_ratio=r)",
        "policy": "compose(cache=Compactor(budget=1 - r))",
        "requires": "compactor",
        "note": "fraction budget so blending = r as in kvpress; the leverage sketch is random on both sides",
    },
    "Random": {
        "press": "RandomPress(compression_ratio=r, seed=0)",
        "policy": "compose(cache=Random(budget=n, seed=0))",
        "requires": "random",
        "note": "different generators by design (kvpolicy seeds per layer): only the count can match",
    },
    "CriticalKV(SnapKV)": {
        "press": f"CriticalKVPress({_SNAP_PRESS})",
        "policy": f"compose(cache=CriticalKV(inner={_SNAP_POLICY}))",
        "requires": "critical",
        "note": "epsilon 1e-4, first stage 0.5 (both defaults)",
    },
    "CriticalAdaKV(SnapKV)": {
        "press": f"CriticalAdaKVPress({_SNAP_PRESS}, alpha_safeguard=0.2)",
        "policy": f"compose(cache=CriticalKV(inner={_SNAP_POLICY}, adaptive=True, floor=0.2))",
        "requires": "critical",
        "note": "head-wise",
    },
    "CriticalKV(SnapKV) eps=0": {
        "press": f"CriticalKVPress({_SNAP_PRESS}, epsilon=0.0)",
        "policy": f"compose(cache=CriticalKV(inner={_SNAP_POLICY}, epsilon=0.0))",
        "requires": "critical",
        "note": "diagnostic: epsilon 0 on both sides (kvpolicy's SnapKV scores are sums, kvpress's means)",
    },
    "ChunkKV(SnapKV)": {
        "press": f"ChunkKVPress({_SNAP_PRESS}, chunk_length=20)",
        "policy": f"compose(cache=ChunkKV(inner={_SNAP_POLICY}, chunk_length=20))",
        "requires": "chunk",
        "note": "chunks of 20 tokens ranked by summed scores",
    },
}
