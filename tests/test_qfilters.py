"""Q-Filters (arXiv 2503.02812; kvpress's QFilterPress) as a cache policy (policies/qfilters.py).

A naive float64 reference for the filters (the principal direction by power iteration over explicit
loops, the sign by counting, the group mean by a loop) and for the scores; calibration on the tiny
model writes a file the policy loads (and the CLI writes the same); the shipped filters of the
embedded model; the window; batch equals one at a time; the missing-filters error; the conformance
suite (graph-replayed decode included).
"""

from __future__ import annotations

import json
import math

import pytest
import torch

pytest.register_assert_rewrite("kvpolicy.testing")  # before importing it: detailed assertion messages
pytest_plugins = ["kvpolicy.testing"]
pytestmark = pytest.mark.usefixtures("single_thread")

import kvpolicy  # noqa: E402
from kvpolicy.adapters.base import AdapterError  # noqa: E402
from kvpolicy.interfaces import LayerView, ScoresKeys  # noqa: E402
from kvpolicy.policies import TSP, AdaKV, FullCache  # noqa: E402
from kvpolicy.policies.qfilters import (  # noqa: E402
    FILTERS_FILE,
    QFilters,
    calibrate_filters,
    filters_from_queries,
    model_filters,
    qfilter_scores,
    read_filters,
    write_filters,
)
from kvpolicy.registry import PolicyConfigError  # noqa: E402
from kvpolicy.testing import CachePolicyConformance, ConformanceCase  # noqa: E402

#: The tiny models' shape: 4 layers, 2 KV heads of 16 dims (4 query heads).
SHAPE = (4, 2, 16)


def random_filters(seed: int = 0, shape: tuple[int, int, int] = SHAPE) -> list:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).tolist()


FILTERS = random_filters()


def make_view(t=30, h_kv=2, d=16, prompt_len=None, positions=None, seed=0, batch=1):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, 2 * h_kv, t, d, generator=g)
    k, v = (torch.randn(batch, h_kv, t, d, generator=g) for _ in range(2))
    return LayerView(
        layer=1,
        num_layers=4,
        prompt_len=prompt_len or t,
        positions=torch.arange(t).expand(batch, t) if positions is None else positions,
        query=q,
        key=k,
        value=v,
        scaling=d**-0.5,
    )


# -- the naive reference --------------------------------------------------------------------------
def naive_direction(rows: list[list[float]], iterations: int = 500) -> list[float]:
    """The first right singular vector of ``rows`` (uncentred): power iteration on the Gram matrix
    ``Σ q qᵀ``, built and applied with plain loops."""
    d = len(rows[0])
    gram = [[sum(r[i] * r[j] for r in rows) for j in range(d)] for i in range(d)]
    v = [1.0 / math.sqrt(d)] * d
    for _ in range(iterations):
        w = [sum(gram[i][j] * v[j] for j in range(d)) for i in range(d)]
        norm = math.sqrt(sum(x * x for x in w))
        v = [x / norm for x in w]
    return v


def naive_filters(queries: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """The official make_filters.py, one head at a time: ``-sign · v₀`` (sign: most queries project
    positively on it), averaged over the query heads of each KV head."""
    h_q, _, d = queries.shape
    group = h_q // num_kv_heads
    out = torch.zeros(num_kv_heads, d, dtype=torch.float64)
    for h in range(h_q):
        rows = queries[h].double().tolist()
        v = naive_direction(rows)
        positive = sum(1 for r in rows if sum(a * b for a, b in zip(r, v, strict=True)) > 0)
        sign = 1.0 if positive / len(rows) > 0.5 else -1.0
        for i in range(d):
            out[h // group, i] += -sign * v[i] / group
    return out


def anisotropic_queries(h_q=4, n=60, d=8, seed=0) -> torch.Tensor:
    """Queries leaning along one direction per head (as the paper observes), plus noise."""
    g = torch.Generator().manual_seed(seed)
    lean = torch.randn(h_q, 1, d, generator=g) * 3
    return lean + torch.randn(h_q, n, d, generator=g)


@pytest.mark.parametrize("kv_heads", [1, 2, 4])
def test_filters_equal_the_naive_reference(kv_heads):
    queries = anisotropic_queries()
    ours = filters_from_queries(queries, kv_heads)
    assert ours.shape == (kv_heads, 8) and ours.dtype == torch.float32
    torch.testing.assert_close(ours.double(), naive_filters(queries, kv_heads), rtol=1e-4, atol=1e-5)


def test_the_filter_points_against_the_queries():
    """Queries lean along +u: the filter is about -u (the official sign), so ``-(f · k)`` ranks keys
    by their projection on the queries' direction; flipping every query flips the filter."""
    u = torch.zeros(8)
    u[2] = 1.0
    queries = 5 * u + 0.1 * torch.randn(1, 40, 8, generator=torch.Generator().manual_seed(0))
    f = filters_from_queries(queries, 1)[0]
    assert float(f @ u) < -0.99
    torch.testing.assert_close(filters_from_queries(-queries, 1)[0], -f)


def test_scores_equal_the_naive_reference():
    view = make_view(batch=2)
    filters = torch.tensor(FILTERS)[1]
    ours = qfilter_scores(view.key, filters)
    want = torch.zeros(2, 2, 30, dtype=torch.float64)
    for b in range(2):
        for h in range(2):
            for t in range(30):
                want[b, h, t] = -sum(float(view.key[b, h, t, i]) * float(filters[h, i]) for i in range(16))
    assert ours.shape == (2, 2, 30) and ours.dtype == torch.float32
    torch.testing.assert_close(ours.double(), want, rtol=1e-5, atol=1e-5)
    policy = QFilters(budget=10, filters=FILTERS)
    torch.testing.assert_close(policy.key_scores(view), ours)


def test_scoring_contract_select_and_window():
    policy = QFilters(budget=10, filters=FILTERS)
    assert isinstance(policy, ScoresKeys)
    view = make_view()
    scores = policy.key_scores(view)
    keep = policy.select(view, None)
    assert keep.shape == (1, 2, 10) and torch.equal(keep, keep.sort(dim=-1).values)
    assert torch.equal(keep, scores.topk(10, dim=-1).indices.sort(dim=-1).values)
    assert policy.select(make_view(t=10), None) is None, "everything fits: keep all"
    # the window: the most recent positions score +inf and are kept on every head
    windowed = QFilters(budget=10, filters=FILTERS, window=4)
    scores = windowed.key_scores(view)
    assert torch.isinf(scores[..., 26:]).all() and torch.isfinite(scores[..., :26]).all()
    assert all({26, 27, 28, 29} <= set(row.tolist()) for row in windowed.select(view, None)[0])
    # by original position: a propagation cut that left positions 0..58 step 2 of a 60-token prompt
    cut = make_view(t=30, prompt_len=60, positions=torch.arange(0, 60, 2)[None])
    assert torch.isinf(windowed.key_scores(cut)).sum(dim=-1).eq(2).all()  # positions 56 and 58


def test_budgets():
    assert QFilters(filters=FILTERS).resolved_budget(35) == 8  # 0.1 of 35 is 3: floored at 8
    assert QFilters(filters=FILTERS, window=4).resolved_budget(35) == 12
    assert QFilters(filters=FILTERS).resolved_budget(4000) == 400
    assert QFilters(filters=FILTERS).resolved_budget(5) == 5
    assert QFilters(filters=FILTERS, budget=3).resolved_budget(4000) == 3  # tokens: exact


# -- calibration on the tiny model ------------------------------------------------------------------
def prompts(count=3, length=70, seed=5) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 128, (length - 7 * i,), generator=g).tolist() for i in range(count)]


def test_model_filters_are_the_svd_of_the_recorded_queries(model):
    """Every token (``svd_samples=None``): the filters equal the reference on the queries the layers
    compute, read here with a probe of our own."""
    from kvpolicy.interfaces import CachePolicy

    class Record(CachePolicy):
        kind = "record-all-queries"

        def select(self, view, state):
            state.scratch(self).setdefault("q", {})[view.layer] = view.query[0].clone()
            return None

    calibration = prompts(2, 40)
    filters = model_filters(model, calibration, svd_samples=None)
    assert filters.shape == SHAPE
    recorder = Record()
    seen: dict[int, list[torch.Tensor]] = {}
    for p in calibration:
        pre = kvpolicy.prefill(model, torch.tensor([p]), kvpolicy.compose(cache=recorder))
        for layer, q in pre.state.scratch(recorder)["q"].items():
            seen.setdefault(layer, []).append(q)
    for layer in (0, 3):
        want = naive_filters(torch.cat(seen[layer], dim=1), 2)
        torch.testing.assert_close(filters[layer].double(), want, rtol=1e-3, atol=1e-4)
    # a subsample is seeded: the same filters twice, others for another seed
    a, b = (model_filters(model, calibration, svd_samples=20, seed=1) for _ in range(2))
    assert torch.equal(a, b) and not torch.equal(a, model_filters(model, calibration, svd_samples=20))


def test_calibrate_writes_filters_the_policy_loads(model, ids, tmp_path):
    path = calibrate_filters(model, tmp_path, prompts(), svd_samples=100, command="test")
    assert path == tmp_path / FILTERS_FILE
    data = json.loads(path.read_text())
    assert data["about"]["svd_samples"] == 100 and data["about"]["prompts"] == 3
    filters = read_filters(path)
    assert filters.shape == SHAPE
    torch.testing.assert_close(filters, model_filters(model, prompts(), svd_samples=100), atol=1e-6, rtol=0)
    by_file = kvpolicy.get_policy("qfilters", filters_file=str(path), kv_budget=24)
    assert by_file.cache.filter_tensor.shape == SHAPE
    pre = kvpolicy.prefill(model, ids, by_file)
    assert pre.cache.kv_head_lengths() == [[24, 24]] * 4
    # the file is a policy config of its own, with the filters embedded
    as_config = kvpolicy.load_policy_config(path)
    assert as_config.name == "qfilters_filters" and torch.equal(as_config.cache.filter_tensor, filters)
    embedded = kvpolicy.get_policy("qfilters", filters=filters.tolist(), kv_budget=24)
    assert kvpolicy.prefill(model, ids, embedded).cache.layers[2].positions.tolist() == (
        pre.cache.layers[2].positions.tolist()
    )


def test_calibrate_cli_writes_the_filters(tmp_path, monkeypatch, capsys):
    """``kvpolicy calibrate --qfilters`` on calibrate's own prompt options (prompt files here)."""
    from kvpolicy.cli import main
    from kvpolicy.testing import ByteTokenizer, tiny_llama

    model = tiny_llama(layers=2, vocab=256)
    monkeypatch.setattr("kvpolicy.cli.load_from_args", lambda args: (model, ByteTokenizer()))
    folder = tmp_path / "prompts"
    folder.mkdir()
    for i in range(2):
        (folder / f"{i}.txt").write_text(f"Prompt {i}: " + "a longer calibration text. " * 4)
    out = tmp_path / "out"
    argv = ["calibrate", "--qfilters", "--prompts", str(folder), "--qfilters-samples", "50"]
    assert main([*argv, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    path = out / FILTERS_FILE
    assert str(path) in printed and "--filters-file" in printed
    assert read_filters(path).shape == (2, 2, 16)
    about = json.loads(path.read_text())["about"]
    assert (about["prompts"], about["svd_samples"], about["seed"]) == (2, 50, 42)
    assert about["command"].startswith("kvpolicy")


# -- the shipped filters of the embedded model ------------------------------------------------------
def embedded_stand_in():
    """A model whose config says it was loaded from the embedded model's cache folder."""
    from types import SimpleNamespace

    from kvpolicy.models import cache_root

    path = str(cache_root() / "models" / "SmolLM2-135M-Instruct")
    return SimpleNamespace(config=SimpleNamespace(_name_or_path=path, num_hidden_layers=30))


def test_the_embedded_model_ships_its_filters():
    from kvpolicy.calibrated import CONFIGS, resolve_preset

    path = CONFIGS / "SmolLM2-135M-Instruct" / FILTERS_FILE
    assert read_filters(path).shape == (30, 3, 64)  # SmolLM2-135M: 30 layers, 3 KV heads of 64
    resolved = resolve_preset("qfilters", {}, embedded_stand_in())
    assert resolved.measured == {"packaged_filters": "SmolLM2-135M-Instruct"}
    assert torch.equal(resolved.policy.cache.filter_tensor, read_filters(path))
    assert "qfilters.json" in resolved.note
    # the user's own filters replace the shipped ones (no "give one of" error)
    mine = resolve_preset("qfilters", {"filters": random_filters(shape=(30, 3, 64))}, embedded_stand_in())
    assert mine.measured == {} and mine.policy.cache.packaged_filters is None


# -- the missing-filters error ----------------------------------------------------------------------
def test_missing_filters_name_the_calibrate_command(model, ids):
    """Without filters, the policy refuses the model before prefill (whether filters ship depends on
    the model: settings alone cannot tell), naming the calibrate command that makes them."""
    from kvpolicy.calibrated import resolve_preset

    for policy in (
        kvpolicy.get_policy("qfilters"),
        resolve_preset("qfilters", {}, model).policy,  # not a packaged model: nothing measured
        kvpolicy.compose(cache=AdaKV(inner=QFilters())),
    ):
        with pytest.raises(ValueError, match=r"Field required.*kvpolicy calibrate --qfilters") as err:
            kvpolicy.prefill(model, ids, policy)
        assert "none ship for this model" in str(err.value) and "filters_file=" in str(err.value)
    with pytest.raises(PolicyConfigError, match=r"invalid settings for qfilters: packaged_filters='nope'"):
        kvpolicy.get_policy("qfilters", packaged_filters="nope")
    with pytest.raises(
        ValueError, match=r"packaged_filters='Llama-3-8B'.*none ship for Llama-3-8B.*ship for: SmolLM2"
    ):
        QFilters(packaged_filters="Llama-3-8B")
    with pytest.raises(
        ValueError, match=r"filters_file='nowhere.json' does not exist.*kvpolicy calibrate --qfilters"
    ):
        QFilters(filters_file="nowhere.json")
    with pytest.raises(ValueError, match="give one of filters, filters_file and packaged_filters"):
        QFilters(filters=FILTERS, packaged_filters="SmolLM2-135M-Instruct")


def test_filters_of_another_model_are_refused(model, ids):
    with pytest.raises((ValueError, AdapterError), match="filters for 3 layers, the model has 4"):
        kvpolicy.prefill(model, ids, kvpolicy.compose(cache=QFilters(filters=FILTERS[:3])))
    wrong_dim = random_filters(shape=(4, 2, 8))
    with pytest.raises(
        AdapterError, match="layer 0 has filters for 2 KV heads of 8 dims, the model has 2 of 16"
    ):
        kvpolicy.prefill(model, ids, kvpolicy.compose(cache=QFilters(filters=wrong_dim)))


@pytest.mark.parametrize(
    ("bad", "named"),
    [
        ({"filters": []}, "shaped (layers, KV heads, head dim), got shape (0,)"),
        ({"filters": [[[1.0, 2.0]], [[1.0]]]}, "filters must be numbers shaped (layers, KV heads, head dim)"),
        ({"filters": [[[1.0, math.nan]]]}, "not a finite number"),
        ({"filters": FILTERS, "budget": 0}, "budget"),
        ({"filters": FILTERS, "budget": 1.5}, "budget"),
        ({"filters": FILTERS, "window": -1}, "window"),
        ({"filters": FILTERS, "window": 8, "budget": 8}, "budget (8) must exceed window (8)"),
    ],
)
def test_bad_settings_name_the_value(bad, named):
    with pytest.raises(ValueError, match=named.replace("(", r"\(").replace(")", r"\)")):
        QFilters(**bad)


def test_official_safetensors_load(tmp_path):
    from safetensors.torch import save_file

    save_file({"q_filters": torch.tensor(FILTERS)}, tmp_path / "model.safetensors")
    assert torch.equal(read_filters(tmp_path / "model.safetensors"), torch.tensor(FILTERS))
    write_filters(tmp_path / "f.json", FILTERS, model="x")
    torch.testing.assert_close(read_filters(tmp_path / "f.json"), torch.tensor(FILTERS), atol=1e-6, rtol=0)


# -- on the tiny model --------------------------------------------------------------------------------
def test_batch_equals_each_prompt_alone(model):
    policy = kvpolicy.get_policy("qfilters", filters=FILTERS, kv_budget=20)
    g = torch.Generator().manual_seed(3)
    batch_prompts = [torch.randint(0, 128, (n,), generator=g).tolist() for n in (90, 40, 7)]
    alone = [
        kvpolicy.generate(model, None, input_ids=p, policy=policy, max_new_tokens=6) for p in batch_prompts
    ]
    batch = kvpolicy.generate(model, None, input_ids=batch_prompts, policy=policy, max_new_tokens=6)
    for a, b in zip(alone, batch, strict=True):
        assert b.token_ids == a.token_ids
        assert b.stats.kv_tokens_per_layer == a.stats.kv_tokens_per_layer


def test_composes_with_tsp_and_ada(model, ids):
    cache = QFilters(budget=24, filters=FILTERS)
    pre = kvpolicy.prefill(model, ids, kvpolicy.compose(TSP(layer=1, rate=0.5), cache))
    assert pre.state.tokens_per_layer == [100, 100, 50, 50]
    assert pre.cache.kv_head_lengths() == [[24, 24]] * 4
    ada = kvpolicy.prefill(model, ids, kvpolicy.compose(cache=AdaKV(inner=cache)))
    assert [sum(heads) for heads in ada.cache.kv_head_lengths()] == [48] * 4
    full = kvpolicy.generate(
        model, None, input_ids=ids[:, :40], policy=kvpolicy.compose(cache=FullCache()), max_new_tokens=6
    )
    roomy = kvpolicy.compose(cache=QFilters(budget=1.0, filters=FILTERS))
    assert (
        kvpolicy.generate(model, None, input_ids=ids[:, :40], policy=roomy, max_new_tokens=6).token_ids
        == full.token_ids
    )


# -- the conformance suite ------------------------------------------------------------------------
class TestQFiltersConformance(CachePolicyConformance):
    kvpolicy_cases = (
        ConformanceCase(
            QFilters,
            budgeted=lambda budget: QFilters(budget=budget, filters=FILTERS),
            invalid=[
                {"filters": FILTERS, "budget": 0},
                {"filters": FILTERS, "window": -1},
                {"filters": [[1.0]]},
                {"filters": FILTERS, "packaged_filters": "SmolLM2-135M-Instruct"},
                {"packaged_filters": "no-such-model"},
            ],
            examples=[
                QFilters(budget=64, filters=FILTERS, window=4),
                QFilters(budget=0.3, filters=random_filters(1)),
            ],
        ),
        ConformanceCase(
            QFilters,
            id="qfilters-window",
            budgeted=lambda budget: QFilters(budget=budget, filters=FILTERS, window=4),
        ),
    )
