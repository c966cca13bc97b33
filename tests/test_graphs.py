"""Graph-replayed decode (kvpolicy.graphs): replay equals eager token for token, and the decode-state
contract is enforced. On a CPU the recorded step is the traced stand-in, which bakes host values and
tensor addresses exactly as a CUDA graph does, so what replays right here replays right on CUDA."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY_OPTIONS, tiny_policy

import kvpolicy
from kvpolicy.graphs import GraphContractError, HostReadGuard, graph_decode_step
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
    # one eager first step, one recording per variant, the rest replayed; PyramidInfer has two variants
    # (squeeze, record) and widens its recorded columns once near the end of the reserve (an eager step)
    if name == "pyramidinfer":
        assert stats == {"eager_steps": 2, "recordings": 4, "replays": STEPS - 6}
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

    def spy(self, adapter, batch, forward):
        seen.append(batch)
        original(self, adapter, batch, forward)

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
    with HostReadGuard():
        torch.where(x > 2, x, 0.0)  # the recordable form


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
