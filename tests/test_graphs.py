"""Graph-replayed decode (kvpolicy.graphs): replay equals eager token for token, and the decode-state
contract is enforced. On a CPU the recorded step is the traced stand-in, which bakes host values and
tensor addresses exactly as a CUDA graph does, so what replays right here replays right on CUDA."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY_OPTIONS, tiny_llama, tiny_policy

import kvpolicy
from kvpolicy import generation
from kvpolicy.graphs import DecodeGraphs, GraphContractError, HostReadGuard, graph_decode_step
from kvpolicy.interfaces import CachePolicy, DecodeView, Evict, LayerView
from kvpolicy.state import Batch, RequestState

#: Every built-in preset, and the decode-time eviction variants of those that have one.
GRAPH_PRESETS = {
    **TINY_OPTIONS,
    "h2o-evicting": {"kv_budget": 20, "evict_during_decode": True},
    "streamingllm-rolling": {"kv_budget": 20, "rolling": True},
    "duoattention-rolling": {**TINY_OPTIONS["duoattention"], "rolling": True},
}
STEPS = 40


def _decode(model, ids, policy, steps=STEPS, reserve=STEPS, graphs=True):
    """Greedy tokens over ``steps`` decode steps and the batch (its ``graphs`` counters)."""
    pre = kvpolicy.prefill(model, ids, policy, reserve=reserve)
    adapter = kvpolicy.get_adapter(model)
    step_fn = graph_decode_step(adapter) if graphs else adapter.decode_step
    token, out = pre.next_token, []
    for step in range(steps):
        token = step_fn(token, policy, pre.batch, step).argmax(dim=-1, keepdim=True)
        out.append(token)
    pre.batch.raise_deferred(policy.cache)
    return torch.cat(out, dim=-1).tolist(), pre.batch


@pytest.mark.parametrize("name", list(GRAPH_PRESETS))
def test_graph_decode_equals_eager_for_every_preset(tiny_model, prompt_ids, name):
    policy = tiny_policy(name, GRAPH_PRESETS[name])
    eager, _ = _decode(tiny_model, prompt_ids, policy, graphs=False)
    replayed, batch = _decode(tiny_model, prompt_ids, policy)
    assert replayed == eager
    stats = batch.graphs.stats()
    # one eager first step, one recording, the rest replayed. PyramidInfer has two variants: recording
    # steps (recorded at step 1) and squeeze steps (15 and 31: each a variant's first occurrence since
    # the state last changed, so eager); it widens its recorded columns at step 27 (an eager step),
    # after which the recording variant runs eagerly once more (28) and is recorded anew (29)
    if name == "pyramidinfer":
        assert stats == {"eager_steps": 5, "recordings": 2, "replays": STEPS - 7}
    else:
        assert stats == {"eager_steps": 1, "recordings": 1, "replays": STEPS - 2}


def test_generate_with_graphs_equals_eager_in_a_padded_batch(tiny_model):
    torch.manual_seed(3)
    prompts = [torch.randint(0, 128, (n,)).tolist() for n in (90, 57, 120)]
    for name in ("fastkv", "h2o-evicting", "pyramidinfer", "duoattention-rolling"):
        policy = tiny_policy(name, GRAPH_PRESETS[name])
        eager = kvpolicy.generate(tiny_model, None, input_ids=prompts, policy=policy, max_new_tokens=24)
        fast = kvpolicy.generate(
            tiny_model, None, input_ids=prompts, policy=policy, max_new_tokens=24, graphs=True
        )
        assert [o.token_ids for o in fast] == [o.token_ids for o in eager], name


@pytest.mark.parametrize("name", ["snapkv", "h2o-evicting", "pyramidinfer"])
def test_cache_growth_records_anew_and_stays_equal(tiny_model, prompt_ids, name):
    """A reserve of 4 makes the cache grow mid-decode: the pools move, so the step after a growth runs
    eagerly and the graphs are recorded again, never replayed over freed memory."""
    policy = tiny_policy(name, GRAPH_PRESETS[name])
    eager, _ = _decode(tiny_model, prompt_ids, policy, steps=70, reserve=4, graphs=False)
    replayed, batch = _decode(tiny_model, prompt_ids, policy, steps=70, reserve=4)
    assert replayed == eager
    assert batch.graphs.eager_steps >= 2 and batch.graphs.replays > 40


def test_compress_once_answer_many_keeps_its_graphs(tiny_model, monkeypatch):
    """Questions restore the compressed context in place, so SnapKV's one recorded step replays for
    every question; H2O's running scores are rebuilt per question and recorded anew. Both equal eager."""
    seen: list[Batch] = []
    original = kvpolicy.graphs.DecodeGraphs.__init__

    def spy(self, adapter, batch, *args):
        seen.append(batch)
        original(self, adapter, batch, *args)

    monkeypatch.setattr(kvpolicy.graphs.DecodeGraphs, "__init__", spy)
    torch.manual_seed(5)
    context = torch.randint(0, 128, (110,)).tolist()
    questions = [torch.randint(0, 128, (n,)).tolist() for n in (6, 9, 4)]
    for name, recordings in (("snapkv", 1), ("h2o-evicting", 3)):
        policy = tiny_policy(name, GRAPH_PRESETS[name])
        kwargs = {"context_ids": context, "question_ids": questions, "policy": policy, "max_new_tokens": 12}
        eager = kvpolicy.generate(tiny_model, None, **kwargs)
        fast = kvpolicy.generate(tiny_model, None, graphs=True, **kwargs)
        assert [o.token_ids for o in fast] == [o.token_ids for o in eager], name
        assert seen[-1].graphs.recordings == recordings, name


# -- the contract ---------------------------------------------------------------------------------
class _Rebinds(CachePolicy):
    """Breaks the contract: a new tensor in its scratch every step."""

    kind = "rebinds_test"
    decodes_batched = True

    def select(self, view: LayerView, state: RequestState) -> None:
        return None

    def on_decode(self, view: DecodeView, state: Batch) -> Evict | None:
        store = state.scratch(self)
        store["seen"] = store.get("seen", torch.zeros(())) + 1
        return None


class _ReadsHost(CachePolicy):
    """Breaks the contract: reads the device from the host inside a step."""

    kind = "reads_host_test"
    decodes_batched = True

    def select(self, view: LayerView, state: RequestState) -> None:
        return None

    def on_decode(self, view: DecodeView, state: Batch) -> Evict | None:
        if int(view.lengths.max()) > 10**9:
            return Evict(view.lengths[..., None] * 0 - 1)
        return None


class _HostTensorEachStep(CachePolicy):
    """Breaks the contract: copies host data to the device every step."""

    kind = "host_tensor_test"
    decodes_batched = True

    def select(self, view: LayerView, state: RequestState) -> None:
        return None

    def on_decode(self, view: DecodeView, state: Batch) -> Evict | None:
        return Evict(torch.tensor([-1]).expand(*view.lengths.shape, 1))


@pytest.mark.parametrize(
    ("cache", "message"),
    [
        (_Rebinds(), r"_Rebinds \('rebinds_test'\).*\['seen'\] was rebound to a new tensor"),
        (_ReadsHost(), r"host read in a recorded decode step: Tensor.__int__"),
        (_HostTensorEachStep(), r"host data copied to the device .*torch.tensor"),
    ],
)
def test_contract_breaches_are_named(tiny_model, prompt_ids, cache, message):
    policy = kvpolicy.compose(cache=cache)
    with pytest.raises(GraphContractError, match=message):
        _decode(tiny_model, prompt_ids, policy, steps=4)
    eager, _ = _decode(tiny_model, prompt_ids, policy, steps=4, graphs=False)  # eager decode is fine
    assert len(eager[0]) == 4


def test_host_read_guard_flags_boolean_masks():
    x = torch.arange(6.0)
    with pytest.raises(GraphContractError, match="boolean-mask indexing"), HostReadGuard():
        x[x > 2]
    with pytest.raises(GraphContractError, match="boolean-mask indexing"), HostReadGuard():
        x[x > 2] = 0.0  # a write through a mask is index_put with nonzero: the same sync
    zero = torch.zeros(())
    with pytest.raises(GraphContractError, match="boolean-mask indexing"), HostReadGuard():
        x.index_put_((x > 2,), zero)
    with HostReadGuard():
        torch.where(x > 2, x, 0.0)  # the recordable form
        x.masked_fill(x > 2, 0.0)


_X = torch.arange(6.0)
_I = torch.tensor([0, 2, 1, 0, 3, 1])
#: (family, call, message): every call below waits for the device on CUDA.
GUARDED = [
    ("Python values", lambda: _X.tolist(), "host read.*Tensor.tolist"),
    ("Python values", lambda: f"{_X[0]:.2f}", "host read.*Tensor.__format__"),
    ("Python values", lambda: repr(_X), "host read.*Tensor.__repr__"),
    ("Python values", lambda: 3.0 in _X, "host read.*Tensor.__contains__"),
    ("Python values", lambda: torch.is_nonzero(_X[:1]), "host read.*is_nonzero"),
    ("Python bools", lambda: torch.equal(_X, _X), "host read.*Tensor.equal"),
    ("Python bools", lambda: torch.allclose(_X, _X), "host read.*Tensor.allclose"),
    ("data-dependent sizes", lambda: _X.nonzero(), "data-dependent size.*nonzero"),
    ("data-dependent sizes", lambda: torch.argwhere(_X), "data-dependent size.*argwhere"),
    ("data-dependent sizes", lambda: torch.where(_X > 2), "data-dependent size.*where"),
    ("data-dependent sizes", lambda: torch.masked_select(_X, _X > 2), "data-dependent size.*masked_select"),
    ("data-dependent sizes", lambda: torch.unique(_I), "data-dependent size.*unique"),
    ("data-dependent sizes", lambda: _I.unique_consecutive(), "data-dependent size.*unique_consecutive"),
    ("data-dependent sizes", lambda: torch.bincount(_I), "data-dependent size.*bincount"),
    ("data-dependent sizes", lambda: _X.repeat_interleave(_I), "repeat_interleave with tensor repeats"),
    ("data-dependent sizes", lambda: torch.repeat_interleave(_I), "repeat_interleave with tensor repeats"),
    ("data-dependent sizes", lambda: torch.histc(_X, bins=4), "histc with min == max"),
    ("host transfers", lambda: torch.zeros(2, device="meta").to("cpu"), "host transfer.*to the host"),
    ("host transfers", lambda: _X.to("meta"), "host transfer.*from the host"),
    ("host transfers", lambda: _X.to(device=torch.device("meta")), "host transfer.*from the host"),
    ("host transfers", lambda: _X.to(torch.zeros(1, device="meta")), "host transfer.*from the host"),
    ("host transfers", lambda: torch.zeros(6, device="meta").copy_(_X), "host transfer.*copy_"),
    ("host transfers", lambda: _X.cpu(), "host read.*Tensor.cpu"),
    ("host data", lambda: _X.new_tensor([1.0]), "host data copied.*new_tensor"),
    ("host data", lambda: torch.tensor([1.0]), "host data copied.*torch.tensor"),
]


@pytest.mark.parametrize(
    ("family", "call", "message"), GUARDED, ids=[f"{g[0]}-{i}" for i, g in enumerate(GUARDED)]
)
def test_host_read_guard_flags_each_sync(family, call, message):
    with pytest.raises(GraphContractError, match=message), HostReadGuard():
        call()


def test_host_read_guard_passes_the_recordable_forms():
    """The fixed-size forms a recorded step uses instead; none reads the host."""
    with HostReadGuard():
        _X.repeat_interleave(2)
        _X.repeat_interleave(_I, output_size=7)
        torch.histc(_X, bins=4, min=0.0, max=6.0)
        _X.to(torch.float64)
        _X.to("cpu")  # same device: no copy
        _X.clone().copy_(_X)
        torch.where(_X > 2, _X, 0.0)
        torch.nonzero_static(_X, size=6)
        _X.topk(2).indices.sort()
        (_X > 2).any()  # a tensor: only converting it to bool would read the host


class _LazyVariant(CachePolicy):
    """Two variants; the second's first use allocates its scratch (a lazy initialisation that must not
    happen inside a recording: an entry added there fails the contract)."""

    kind = "lazy_variant_test"
    decodes_batched = True

    def select(self, view: LayerView, state: RequestState) -> None:
        return None

    def decode_variant(self, step, batch):
        return step % 4 == 3

    def on_decode(self, view: DecodeView, state: Batch) -> Evict | None:
        if view.step % 4 == 3:
            store = state.scratch(self)
            seen = store.get(view.layer)
            if seen is None:
                seen = store[view.layer] = torch.zeros_like(view.attention.sum(dim=(1, 2, 3)))
            seen += view.attention.amax(dim=(1, 2, 3))
        return None


def test_a_variants_first_occurrence_runs_eagerly(tiny_model, prompt_ids):
    """The squeeze-like variant is first seen at step 3: it runs eagerly there (allocating its scratch),
    the other variant is recorded anew after that allocation, and the lazy variant at step 7."""
    policy = kvpolicy.compose(cache=_LazyVariant())
    eager, _ = _decode(tiny_model, prompt_ids, policy, steps=12, graphs=False)
    replayed, batch = _decode(tiny_model, prompt_ids, policy, steps=12)
    assert replayed == eager
    # eager: 0 (first), 3 (the variant's first); recorded: 1, then 4 (after 3 added scratch), 7
    assert batch.graphs.stats() == {"eager_steps": 2, "recordings": 3, "replays": 7}


# -- fusion: the compiled step inside the recording -------------------------------------------------
@pytest.mark.parametrize("name", ["snapkv", "h2o-evicting", "pyramidinfer"])
def test_graphs_record_the_compiled_step_without_compiling_inside(monkeypatch, name):
    """With ``compile=True`` the recorded step is the compiled forward (dynamo's graph, traced here as
    a CUDA graph captures inductor's kernels), compiled before any recording: dynamo compiles as many
    graphs as with ``compile=True`` alone, and tokens equal eager. A counting backend shows the
    compiled graph runs at each eager step and each recording (replays run no Python)."""
    from torch._dynamo.utils import counters

    runs: list[int] = []

    def counting(gm: torch.fx.GraphModule, example_inputs: list[torch.Tensor]):
        def run(*args: torch.Tensor):
            runs.append(1)
            return gm(*args)

        return run

    monkeypatch.setattr(generation, "COMPILE_BACKEND", counting)
    seen: list[DecodeGraphs] = []
    original = DecodeGraphs.__init__

    def spy(self, *args):
        original(self, *args)
        seen.append(self)

    monkeypatch.setattr(DecodeGraphs, "__init__", spy)
    policy = tiny_policy(name, GRAPH_PRESETS[name])
    ids = torch.randint(0, 128, (1, 100), generator=torch.Generator().manual_seed(1)).tolist()[0]
    kwargs = {"input_ids": ids, "policy": policy, "max_new_tokens": 20}
    compiles, tokens = {}, {}
    try:
        for mode in ("eager", "compile", "graphs"):
            torch._dynamo.reset()
            counters.clear()
            model = tiny_llama()  # a fresh adapter: its compiled step starts empty
            compile, graphs = mode != "eager", mode == "graphs"
            tokens[mode] = kvpolicy.generate(model, None, compile=compile, graphs=graphs, **kwargs).token_ids
            compiles[mode] = counters["stats"]["unique_graphs"]
            if mode == "compile":
                runs.clear()
    finally:
        torch._dynamo.reset()
    assert tokens["compile"] == tokens["eager"] and tokens["graphs"] == tokens["eager"]
    assert compiles["graphs"] == compiles["compile"] > 0
    if name == "snapkv":  # no decode state of its own: the decode attention, chosen before the first
        assert compiles["compile"] == 1  # step (prepare_step), leaves one compile (H2O allocates at step 0)
    stats = seen[-1].stats()
    assert seen[-1].compiled and stats["recordings"] >= 1 and stats["replays"] >= 10
    assert len(runs) == stats["eager_steps"] + stats["recordings"]


def test_graphs_belong_to_the_batch_not_the_model(tiny_model, prompt_ids):
    """Each request's recordings go with its batch: nothing accumulates on the adapter or the model
    over many requests."""
    policy = tiny_policy("snapkv", GRAPH_PRESETS["snapkv"])
    ids = prompt_ids[0].tolist()
    kvpolicy.generate(tiny_model, None, input_ids=ids, policy=policy, max_new_tokens=6, graphs=True)
    before = set(vars(kvpolicy.get_adapter(tiny_model)))
    for _ in range(3):
        kvpolicy.generate(tiny_model, None, input_ids=ids, policy=policy, max_new_tokens=6, graphs=True)
    assert set(vars(kvpolicy.get_adapter(tiny_model))) == before
    assert not any("graph" in name for name in vars(tiny_model))
