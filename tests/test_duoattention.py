"""DuoAttention: retrieval heads keep everything, streaming heads sinks + recent (policies/duoattention.py).

An all-retrieval map is full KV, an all-streaming map is StreamingLLM, a mixed map gives ragged per-head
caches; head maps that do not fit the model are refused naming the numbers; the calibration proxy
returns a map of the model's shape in [0, 1] that round-trips through a file; composes with TSP; and
the conformance suite.
"""

from __future__ import annotations

import pytest

pytest.register_assert_rewrite("kvpolicy.testing")  # before importing it: detailed assertion messages
pytest_plugins = ["kvpolicy.testing"]
pytestmark = pytest.mark.usefixtures("single_thread")

import json  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

import kvpolicy  # noqa: E402
from kvpolicy.adapters.base import AdapterError  # noqa: E402
from kvpolicy.policies import TSP, StreamingLLM  # noqa: E402
from kvpolicy.policies.duoattention import (  # noqa: E402
    DuoAttention,
    DuoAttentionPreset,
    duo_head_scores,
    read_head_map,
    streaming_for_ratio,
    threshold_for_ratio,
    write_head_map,
)
from kvpolicy.registry import PolicyConfigError, get_registry, validate_settings  # noqa: E402
from kvpolicy.testing import (  # noqa: E402
    PROMPT_LEN,
    ByteTokenizer,
    CachePolicyConformance,
    ConformanceCase,
    tiny_llama,
)

SINK, RECENT = 4, 16
KEEP = SINK + RECENT
LAYERS, KV_HEADS = 4, 2
ONES = [[1.0] * KV_HEADS for _ in range(LAYERS)]
ZEROS = [[0.0] * KV_HEADS for _ in range(LAYERS)]
MIXED = [[1.0, 0.0], [0.0, 0.9], [0.6, 0.4], [0.0, 0.0]]


def duo(head_map=MIXED, **settings) -> DuoAttention:
    return DuoAttention(head_map=head_map, **{"sink": SINK, "recent": RECENT, **settings})


def generate(model, ids, cache, new_tokens=12, propagation=None):
    policy = kvpolicy.compose(propagation, cache)
    return kvpolicy.generate(model, None, input_ids=ids, policy=policy, max_new_tokens=new_tokens)


# -- all retrieval, all streaming, mixed --------------------------------------------------------------
def test_all_retrieval_heads_is_full_kv(model, ids):
    full = generate(model, ids, None)
    ours = generate(model, ids, duo(ONES))
    assert ours.token_ids == full.token_ids
    pre = kvpolicy.prefill(model, ids, kvpolicy.compose(cache=duo(ONES)))
    assert pre.cache.kv_head_lengths() == [[100] * KV_HEADS] * LAYERS


def test_all_streaming_heads_is_streamingllm(model, ids):
    stream = StreamingLLM(budget=KEEP, sinks=SINK)
    assert generate(model, ids, duo(ZEROS)).token_ids == generate(model, ids, stream).token_ids
    a = kvpolicy.prefill(model, ids, kvpolicy.compose(cache=stream))
    b = kvpolicy.prefill(model, ids, kvpolicy.compose(cache=duo(ZEROS)))
    assert b.cache.kv_head_lengths() == a.cache.kv_head_lengths() == [[KEEP] * KV_HEADS] * LAYERS
    for la, lb in zip(a.cache.layers, b.cache.layers, strict=True):
        for h in range(KV_HEADS):
            assert sorted(la.positions[0, h, :KEEP].tolist()) == sorted(lb.positions[0, h, :KEEP].tolist())
    kept = sorted(b.cache.layers[0].positions[0, 0, :KEEP].tolist())
    assert kept == [*range(SINK), *range(100 - RECENT, 100)]


def test_mixed_map_keeps_ragged_per_head_caches(model, ids):
    pre = kvpolicy.prefill(model, ids, kvpolicy.compose(cache=duo()))
    assert pre.cache.kv_head_lengths() == [[100, KEEP], [KEEP, 100], [100, KEEP], [KEEP, KEEP]]
    streaming = {*range(SINK), *range(100 - RECENT, 100)}
    for layer, row in zip(pre.cache.layers, MIXED, strict=True):
        for h, score in enumerate(row):
            n = layer.row_lengths(0)[h]
            kept = set(layer.positions[0, h, :n].tolist())
            assert kept == (set(range(100)) if score >= 0.5 else streaming)
    out = generate(model, ids, duo())
    assert len(out.token_ids) == 12
    # memory follows what is kept: the layer mean over heads
    assert out.stats.kv_tokens_per_layer == [(100 + KEEP) / 2] * 3 + [KEEP]


def test_threshold_moves_heads(model, ids):
    low = kvpolicy.prefill(model, ids, kvpolicy.compose(cache=duo(threshold=0.3)))
    assert low.cache.kv_head_lengths()[2] == [100, 100]  # 0.4 >= 0.3: now a retrieval head
    high = kvpolicy.prefill(model, ids, kvpolicy.compose(cache=duo(threshold=0.95)))
    assert high.cache.kv_head_lengths()[:3] == [[100, KEEP], [KEEP, KEEP], [KEEP, KEEP]]


def test_short_prompt_is_kept_whole(model, ids):
    pre = kvpolicy.prefill(model, ids[:, :KEEP], kvpolicy.compose(cache=duo()))
    assert pre.cache.kv_head_lengths() == [[KEEP] * KV_HEADS] * LAYERS


def test_composes_with_tsp(model, ids):
    tsp = TSP(layer=1, rate=0.5)
    assert generate(model, ids, duo(ONES), propagation=tsp).token_ids == (
        generate(model, ids, None, propagation=tsp).token_ids
    )
    out = generate(model, ids, duo(), new_tokens=8, propagation=tsp)
    assert len(out.token_ids) == 8 and out.stats.tokens_per_layer == [100, 100, 50, 50]
    pre = kvpolicy.prefill(model, ids, kvpolicy.compose(tsp, duo()))
    assert pre.cache.kv_head_lengths() == [[100, KEEP], [KEEP, 100], [50, KEEP], [KEEP, KEEP]]
    for layer in pre.cache.layers:
        assert int(layer.positions.max()) < 100


@pytest.mark.parametrize("rolling", [False, True])
def test_batch_equals_each_prompt_alone(model, ids, rolling):
    prompts = [ids[0, :n].tolist() for n in (100, 57, 15)]
    policy = kvpolicy.compose(cache=duo(rolling=rolling))
    alone = [kvpolicy.generate(model, None, input_ids=p, policy=policy, max_new_tokens=8) for p in prompts]
    together = kvpolicy.generate(model, None, input_ids=prompts, policy=policy, max_new_tokens=8)
    assert [o.token_ids for o in together] == [o.token_ids for o in alone]
    assert [o.stats.kv_bytes_per_layer for o in together] == [o.stats.kv_bytes_per_layer for o in alone]


def test_rolling_keeps_streaming_heads_at_sink_plus_recent(model, ids):
    from test_engine import NoHostSync

    policy = kvpolicy.compose(cache=duo(rolling=True))
    pre = kvpolicy.prefill(model, ids, policy, reserve=12)
    adapter = kvpolicy.get_adapter(model)
    token = pre.next_token
    with NoHostSync():
        for step in range(10):
            token = adapter.decode_step(token, policy, pre.batch, step).argmax(dim=-1, keepdim=True)
    pre.batch.raise_deferred(policy.cache)
    assert pre.cache.kv_head_lengths() == [[110, KEEP], [KEEP, 110], [110, KEEP], [KEEP, KEEP]]
    last = pre.cache.layers[3]
    for h in range(KV_HEADS):  # sinks, then the most recent positions (the prompt's end and the new tokens)
        assert sorted(last.positions[0, h, :KEEP].tolist()) == [*range(SINK), *range(110 - RECENT, 110)]
    # all streaming + rolling is StreamingLLM rolling, token for token
    stream = StreamingLLM(budget=KEEP, sinks=SINK, rolling=True)
    assert generate(model, ids, duo(ZEROS, rolling=True), new_tokens=16).token_ids == (
        generate(model, ids, stream, new_tokens=16).token_ids
    )
    assert not duo().evicts_during_decode and duo(rolling=True).evicts_during_decode


# -- bad input -----------------------------------------------------------------------------------------
def test_head_map_with_other_layer_count_is_refused(model, ids):
    policy = kvpolicy.compose(cache=duo(MIXED[:3]))
    with pytest.raises(ValueError, match="head map has 3 layers, the model has 4"):
        kvpolicy.prefill(model, ids, policy)


def test_head_map_with_other_kv_head_count_is_refused(model, ids):
    policy = kvpolicy.compose(cache=duo([[1.0, 0.0, 0.5]] * LAYERS))
    # the adapter wraps a policy's failure, naming the policy and the layer
    with pytest.raises(AdapterError, match="head map layer 0 has 3 KV heads, the model has 2"):
        kvpolicy.prefill(model, ids, policy)


@pytest.mark.parametrize(
    ("values", "names"),
    [
        ({"head_map": [[0.5, 1.5]]}, ["head_map[0][1]=1.5", "outside [0, 1]"]),
        ({"head_map": [[-0.1]]}, ["head_map[0][0]=-0.1", "outside [0, 1]"]),
        ({"head_map": []}, ["head_map", "non-empty"]),
        ({"head_map": [[]]}, ["head_map[0]", "non-empty"]),
        ({}, ["exactly one of head_map and head_map_file", "neither"]),
        ({"head_map": [[1.0]], "head_map_file": "m.json"}, ["exactly one", "both"]),
        ({"head_map_file": "no/such/map.json"}, ["head_map_file='no/such/map.json'", "does not exist"]),
        ({"head_map": [[1.0]], "threshold": 1.5}, ["threshold"]),
        ({"head_map": [[1.0]], "sink": -1}, ["sink"]),
        ({"head_map": [[1.0]], "recent": 0}, ["recent"]),
    ],
)
def test_bad_settings_name_the_value(values, names):
    with pytest.raises(PolicyConfigError) as err:
        validate_settings(DuoAttention, values)
    for name in names:
        assert name in str(err.value), str(err.value)
    with pytest.raises(ValueError):
        DuoAttention(**values)


def test_bad_head_map_files(tmp_path):
    bad_json = tmp_path / "bad.json"
    bad_json.write_text("{not json")
    with pytest.raises(ValueError, match="is not valid JSON"):
        DuoAttention(head_map_file=bad_json)
    no_key = tmp_path / "nokey.json"
    no_key.write_text('{"scores": [[1.0]]}')
    with pytest.raises(ValueError, match="without a 'head_map' list"):
        DuoAttention(head_map_file=no_key)
    out_of_range = tmp_path / "range.json"
    out_of_range.write_text("[[0.2, 3.0]]")
    with pytest.raises(ValueError, match=r"\[0\]\[1\]=3.0 is outside \[0, 1\]"):
        DuoAttention(head_map_file=out_of_range)


# -- head-map files, calibration, preset ---------------------------------------------------------------
def test_head_map_file_round_trips(tmp_path, model, ids):
    path = write_head_map(tmp_path / "duo" / "map.json", MIXED, model="tiny")
    assert json.loads(path.read_text())["model"] == "tiny"
    assert read_head_map(path) == MIXED
    from_file = DuoAttention(head_map_file=path, sink=SINK, recent=RECENT)
    assert from_file.scores == MIXED
    data = json.loads(json.dumps(from_file.to_dict()))
    assert data["head_map_file"] == str(path) and data["head_map"] is None
    assert DuoAttention(**{k: v for k, v in data.items() if k != "kind"}) == from_file
    a = kvpolicy.prefill(model, ids, kvpolicy.compose(cache=from_file)).cache.kv_head_lengths()
    assert a == kvpolicy.prefill(model, ids, kvpolicy.compose(cache=duo())).cache.kv_head_lengths()
    plain = tmp_path / "plain.json"  # a bare list of lists is a head map too
    plain.write_text(json.dumps(MIXED))
    assert read_head_map(plain) == MIXED


def test_official_tsv_layout_is_read_and_clipped(tmp_path):
    path = tmp_path / "full_attention_heads.tsv"
    path.write_text("1.02\t-0.01\n0.3\t0.7\n")  # the official loader clips to [0, 1]
    assert read_head_map(path) == [[1.0, 0.0], [0.3, 0.7]]
    assert DuoAttention(head_map_file=path).retrieval_heads(1) == [False, True]


def test_calibration_scores_have_the_models_shape(tmp_path, model, ids):
    prompts = [ids[0].tolist(), torch.randint(0, 128, (80,), generator=torch.Generator().manual_seed(2))]
    scores = duo_head_scores(model, None, prompts, sink=SINK, recent=RECENT, window=8)
    assert len(scores) == LAYERS and all(len(row) == KV_HEADS for row in scores)
    flat = [v for row in scores for v in row]
    assert all(0.0 <= v <= 1.0 for v in flat) and max(flat) == pytest.approx(1.0)
    raw = duo_head_scores(model, None, prompts, sink=SINK, recent=RECENT, window=8, normalize=False)
    assert all(0.0 <= v <= 1.0 for row in raw for v in row) and max(v for r in raw for v in r) < 1.0
    # the file round-trips into a policy for the same model
    path = write_head_map(tmp_path / "map.json", scores, sink=SINK, recent=RECENT)
    policy = DuoAttention(head_map_file=path, sink=SINK, recent=RECENT, threshold=0.5)
    assert [v for row in policy.scores for v in row] == pytest.approx(flat)
    lengths = kvpolicy.prefill(model, ids, kvpolicy.compose(cache=policy)).cache.kv_head_lengths()
    assert lengths == [[100 if s >= 0.5 else KEEP for s in row] for row in scores]


def test_far_attention_probe_separates_retrieval_from_streaming_heads():
    """Head 0's last query looks at position 50 (beyond sinks + recent), head 1's at position 98
    (recent): shares 1 and 0."""
    from kvpolicy.interfaces import LayerView
    from kvpolicy.policies.duoattention import _FarAttentionProbe
    from kvpolicy.state import RequestState

    t, d = 100, 4
    key = torch.zeros(1, 2, t, d)
    key[0, 0, 50, 0] = 10.0
    key[0, 1, 98, 0] = 10.0
    query = torch.zeros(1, 4, t, d)
    query[..., 0] = 10.0
    view = LayerView(0, 1, t, torch.arange(t)[None], query, key, key.clone(), 1.0)
    probe = _FarAttentionProbe(sink=SINK, recent=RECENT, window=1)
    state = RequestState(t, 1, None)  # type: ignore[arg-type]
    assert probe.select(view, state) is None
    share = state.scratch(probe)["far"][0].tolist()
    assert share[0] == pytest.approx(1.0, abs=1e-6) and share[1] == pytest.approx(0.0, abs=1e-6)


def test_calibration_takes_text_and_refuses_short_prompts():
    model = tiny_llama(vocab=256)
    text = "The quick brown fox jumps over the lazy dog. " * 3
    scores = duo_head_scores(model, ByteTokenizer(), [text], sink=SINK, recent=RECENT, window=8)
    assert len(scores) == LAYERS and len(scores[0]) == KV_HEADS
    with pytest.raises(ValueError, match=r"prompt 0 has 20 tokens.*sink \+ recent = 4 \+ 16 = 20"):
        duo_head_scores(model, None, [list(range(20))], sink=SINK, recent=RECENT)
    with pytest.raises(ValueError, match="at least one"):
        duo_head_scores(model, None, [])


def test_calibrate_cli_writes_the_head_map_and_a_config(tmp_path, monkeypatch, capsys):
    from kvpolicy.cli import main

    model = tiny_llama(vocab=256)
    monkeypatch.setattr("kvpolicy.cli.load_from_args", lambda args: (model, ByteTokenizer()))
    prompts = tmp_path / "prompts"
    prompts.mkdir()
    for i in range(2):
        (prompts / f"{i}.txt").write_text(f"Prompt {i}: " + "a longer calibration text. " * 4)
    out = tmp_path / "out"
    argv = ["calibrate", "--prompts", str(prompts), "--duo-heads", "--duo-sink", "4", "--duo-recent", "16"]
    assert main([*argv, "--out", str(out)]) == 0
    assert "duo_head_map.json" in capsys.readouterr().out
    data = json.loads((out / "duo_head_map.json").read_text())
    assert (data["sink"], data["recent"], data["prompts"]) == (4, 16, 2)
    scores = read_head_map(out / "duo_head_map.json")
    assert len(scores) == LAYERS and all(len(r) == KV_HEADS for r in scores)
    config = json.loads((out / "duo_policy.json").read_text())
    assert config == {
        "policy": "duoattention",
        "head_map_file": str(out / "duo_head_map.json"),
        "sink": 4,
        "recent": 16,
    }
    assert DuoAttention(**{k: v for k, v in config.items() if k != "policy"}).scores == scores


def test_shipped_smollm2_head_map_fits_the_embedded_model():
    """tests/data/duo_smollm2_head_map.json: duo_head_scores on SmolLM2-135M-Instruct (30 layers, 3 KV
    heads), 3 needle prompts of 1500 tokens, sink 64, recent 256."""
    from pathlib import Path

    path = Path(__file__).parent / "data" / "duo_smollm2_head_map.json"
    scores = read_head_map(path)
    assert len(scores) == 30 and all(len(row) == 3 for row in scores)
    assert max(v for row in scores for v in row) == 1.0
    meta = json.loads(path.read_text())
    assert (meta["sink"], meta["recent"]) == (64, 256)


def test_threshold_for_ratio():
    scores = [[0.1, 0.9], [0.5, 0.3]]
    assert threshold_for_ratio(scores, 0.0) == 0.0
    assert threshold_for_ratio(scores, 0.5) == 0.5  # the two lowest (0.1, 0.3) are streaming
    assert threshold_for_ratio(scores, 1.0) == float("inf")
    with pytest.raises(ValueError, match=r"ratio=1\.5"):
        threshold_for_ratio(scores, 1.5)
    # a tie at the cut: the heads tied with the last one taken stream too (never fewer than the ratio)
    tied = [[0.1, 0.3], [0.3, 0.9]]
    threshold = threshold_for_ratio(tied, 0.5)
    streaming = sum(v < threshold for row in tied for v in row)
    assert threshold == 0.9 and streaming == 3 >= 2


def kvpress_streaming(head_map, ratio):
    """kvpress's DuoAttentionPress.post_init_from_model, its selection lines: the reference."""
    head_scores = np.array(head_map, dtype=float)
    n_pruned = round(head_scores.size * ratio)
    mask = np.zeros(head_scores.shape, dtype=bool)
    if n_pruned > 0:
        indices = np.argsort(head_scores, axis=None)[:n_pruned]
        mask[np.unravel_index(indices, head_scores.shape)] = True
    return mask.tolist()


@pytest.mark.parametrize("ratio", [0.0, 0.25, 0.5, 0.75, 1.0])
def test_ratio_is_met_exactly_with_ties(ratio):
    """`ratio`: exactly round(ratio * heads) stream, the lowest first (kvpress's
    head_compression_ratio), where a threshold cannot split tied heads."""
    tied = [[0.3, 0.3], [0.3, 0.3]]  # every head tied
    policy = DuoAttention(head_map=tied, ratio=ratio, sink=SINK, recent=RECENT)
    streaming = [[not r for r in policy.retrieval_heads(layer)] for layer in range(2)]
    assert sum(map(sum, streaming)) == round(4 * ratio)
    assert streaming == kvpress_streaming(tied, ratio)
    assert streaming_for_ratio([[0.2, 0.1], [0.9, 0.1]], 0.5) == [[False, True], [False, True]]


@pytest.mark.parametrize("ratio", [0.1, 0.25, 0.5, 0.75, 0.9])
def test_ratio_splits_ties_as_kvpress_on_real_size_maps(ratio):
    """Real-size maps (30 layers x 3 KV heads, the embedded model's) with ties at the cut: the heads
    kvpress's unstable np.argsort picks, which are not layer-then-head order."""
    from pathlib import Path

    shipped = read_head_map(Path(__file__).parent / "data" / "duo_smollm2_head_map.json")
    rng = np.random.default_rng(0)
    coarse = np.round(rng.random((30, 3)), 1).tolist()  # ~9 heads per value: ties at every cut
    for head_map in (shipped, coarse):
        ours = streaming_for_ratio(head_map, ratio)
        assert sum(map(sum, ours)) == round(90 * ratio)
        assert ours == kvpress_streaming(head_map, ratio)
        policy = DuoAttention(head_map=head_map, ratio=ratio, sink=SINK, recent=RECENT)
        assert [[not r for r in policy.retrieval_heads(layer)] for layer in range(30)] == ours
    # the tie the issue measured: (14, 1) and (29, 0) both score 0.1343 at ratio 0.5's cut
    assert shipped[14][1] == shipped[29][0] == 0.1343
    if ratio == 0.5:
        half = streaming_for_ratio(shipped, 0.5)
        assert half[14][1] != half[29][0]  # exactly one of the tied pair streams, the one numpy picks


def test_layer_first_order_is_not_kvpress_order():
    """The test above can see a layer-first tie rule: on the coarse map it picks other heads."""
    coarse = np.round(np.random.default_rng(0).random((30, 3)), 1).tolist()
    flat = sorted((v, layer, h) for layer, row in enumerate(coarse) for h, v in enumerate(row))

    def layer_first(ratio):
        chosen = {(layer, h) for _, layer, h in flat[: round(90 * ratio)]}
        return [[(layer, h) in chosen for h in range(3)] for layer in range(30)]

    ratios = [0.1, 0.25, 0.5, 0.75, 0.9]
    assert any(layer_first(r) != kvpress_streaming(coarse, r) for r in ratios)


def test_preset_builds_the_policy(tmp_path, model, ids):
    path = write_head_map(tmp_path / "map.json", MIXED)
    preset = DuoAttentionPreset(head_map_file=path, sink=SINK, recent=RECENT, threshold=0.4)
    policy = preset.build()
    assert policy.cache == DuoAttention(head_map_file=path, sink=SINK, recent=RECENT, threshold=0.4)
    assert DuoAttentionPreset(**{k: v for k, v in preset.to_dict().items() if k != "kind"}) == preset
    assert kvpolicy.generate(model, None, input_ids=ids, policy=policy, max_new_tokens=4).token_ids
    with pytest.raises(PolicyConfigError, match="head_map_file"):
        validate_settings(DuoAttentionPreset, {})
    with pytest.raises(PolicyConfigError, match="threshold=2"):
        validate_settings(DuoAttentionPreset, {"head_map_file": str(path), "threshold": 2})


def test_defaults_are_the_official_ones():
    policy = DuoAttention(head_map=ONES)
    assert (policy.sink, policy.recent, policy.threshold) == (64, 256, 0.5)


# -- the conformance suite ---------------------------------------------------------------------------
def _streaming(budget: int | float) -> DuoAttention:
    """Every head streaming, ``budget`` entries (sinks included) per head; a fraction is of the suite's
    prompt length (the policy has token sizes only)."""
    tokens = budget if isinstance(budget, int) else max(SINK + 1, int(budget * PROMPT_LEN))
    return DuoAttention(head_map=ZEROS, sink=SINK, recent=tokens - SINK)


def _streaming_kv(policy: DuoAttention, length: int, layer: int, num_layers: int) -> int:
    return min(length, policy.streaming_keep)


_REGISTERED = "duoattention" in get_registry().components


class TestDuoAttentionConformance(CachePolicyConformance):
    kvpolicy_cases = (
        ConformanceCase(
            DuoAttention,
            keep_all=duo(ONES),
            invalid=[
                {"head_map": [[1.5, 0.0]] * LAYERS},
                {"head_map": ONES, "threshold": -0.1},
                {"head_map": ONES, "sink": -1},
                {"head_map": ONES, "recent": 0},
                {"head_map": ONES, "head_map_file": "x.json"},
            ],
            examples=[duo(), duo(MIXED, threshold=0.2), DuoAttention(head_map=MIXED)],
            registered=_REGISTERED,
            ragged=True,
        ),
        ConformanceCase(
            DuoAttention,
            id="duoattention-streaming",
            budgeted=_streaming,
            keep_all=duo(ONES),
            expected_kv=_streaming_kv,
            registered=_REGISTERED,
        ),
    )
