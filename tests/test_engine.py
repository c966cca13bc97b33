"""The one engine: per-head ragged cache, sync-free decode, one loop for batch 1 and N."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY_OPTIONS, tiny_llama, tiny_policy
from torch.overrides import TorchFunctionMode

import kvpolicy
from kvpolicy.adapters.base import AdapterError
from kvpolicy.cache import PagedLayer, evict_rows, paged_attention
from kvpolicy.interfaces import CachePolicy, Evict, LayerView, PerHead
from kvpolicy.policies.snapkv import snapkv_keep
from kvpolicy.state import RequestState

#: Tensor methods that wait for the device (or read tensor values on the host).
SYNCING = {"item", "tolist", "numpy", "cpu", "__bool__", "__int__", "__float__", "__index__"}


class NoHostSync(TorchFunctionMode):
    """Fails on any call that reads a tensor's values back to the host."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in SYNCING:
            raise AssertionError(f"host sync in a decode step: Tensor.{name}")
        return func(*args, **(kwargs or {}))


DECODE_PRESETS = {
    **TINY_OPTIONS,
    "h2o-evicting": {"kv_budget": 20, "evict_during_decode": True},
    "streamingllm-rolling": {"kv_budget": 20, "rolling": True},
}


@pytest.mark.parametrize("name", list(DECODE_PRESETS))
def test_decode_step_never_syncs_with_the_host(tiny_model, prompt_ids, name):
    options = DECODE_PRESETS[name]
    policy = tiny_policy(name, options)
    pre = kvpolicy.prefill(tiny_model, prompt_ids, policy, reserve=40)
    adapter = kvpolicy.get_adapter(tiny_model)
    token = pre.next_token
    with NoHostSync():  # 34 steps: PyramidInfer squeezes twice, H2O / StreamingLLM evict every step
        for step in range(34):
            token = adapter.decode_step(token, policy, pre.batch, step).argmax(dim=-1, keepdim=True)
    pre.batch.raise_deferred(policy.cache)
    if "evict" in name or "rolling" in name:
        assert pre.cache.kv_lengths == [20] * 4


def test_no_sync_detector_catches_syncs():
    with pytest.raises(AssertionError, match="item"), NoHostSync():
        torch.ones(1).item()
    with pytest.raises(AssertionError, match="__bool__"), NoHostSync():
        bool(torch.ones(1) > 0)


# -- per-head ragged cache ------------------------------------------------------------------------
class UnevenHeads(CachePolicy):
    """Test policy: SnapKV's choice, but KV head ``h`` keeps ``budget - step * h`` entries."""

    kind = "uneven_heads_test"
    budget: int = 24
    step: int = 7

    def select(self, view: LayerView, state: RequestState) -> PerHead | None:
        idx = snapkv_keep(view, self.budget, 8, 7, "max")
        if idx is None:
            return None
        heads = view.num_kv_heads
        counts = torch.tensor([[self.budget - self.step * h for h in range(heads)]])
        # each head's own first `count` picks, best first, then anything (ignored past the count)
        return PerHead(idx, counts)


def test_per_head_counts_are_stored_exactly(tiny_model, prompt_ids):
    policy = kvpolicy.compose(cache=UnevenHeads())
    pre = kvpolicy.prefill(tiny_model, prompt_ids, policy, reserve=0, block_size=8)
    for layer in pre.cache.layers:
        assert layer.row_lengths(0) == [24, 17]
        # memory follows the entries: pages per row are ceil(count / block), not the longest row's
        assert layer.pages_per_row == [3, 3]
    pre = kvpolicy.prefill(tiny_model, prompt_ids, kvpolicy.compose(cache=UnevenHeads(step=16)), block_size=8)
    assert pre.cache.layers[0].pages_per_row == [3, 1]
    assert pre.cache.kv_head_lengths(0)[0] == [24, 8]


def _naive_per_head_decode(model, pre, policy, steps):
    """Reference: each layer's KV heads as Python lists of their own entries; attention per head."""
    adapter = kvpolicy.get_adapter(model)
    store = []
    for layer in pre.cache.layers:
        keys, values, n = layer.dense(layer.k_pool)[0], layer.dense(layer.v_pool)[0], layer.row_lengths(0)
        store.append([[keys[h, : n[h]], values[h, : n[h]]] for h in range(len(n))])
    token, out = pre.next_token, [int(pre.next_token)]
    position = pre.state.prompt_len
    for _ in range(steps):

        def attend(i, attn, q, k, v):
            heads = store[i]
            n_rep = q.shape[1] // len(heads)
            outs = []
            for h, kv in enumerate(heads):
                kv[0] = torch.cat([kv[0], k[0, h]])
                kv[1] = torch.cat([kv[1], v[0, h]])
                qh = q[0, h * n_rep : (h + 1) * n_rep, 0]  # (n_rep, d)
                probs = (qh @ kv[0].T * attn.scaling).softmax(-1)
                outs.append(probs @ kv[1])
            return torch.cat(outs).reshape(1, 1, -1)

        logits = adapter.decode_pass(token, torch.tensor([[position]]), attend)
        token = logits.argmax(-1, keepdim=True)
        out.append(int(token))
        position += 1
    return out


def test_uneven_heads_decode_exactly_like_a_naive_per_head_reference(tiny_model, prompt_ids):
    policy = kvpolicy.compose(cache=UnevenHeads())
    ref_pre = kvpolicy.prefill(tiny_model, prompt_ids, policy, block_size=8)
    naive = _naive_per_head_decode(tiny_model, ref_pre, policy, steps=15)
    ours = kvpolicy.generate(tiny_model, None, input_ids=prompt_ids, policy=policy, max_new_tokens=16)
    assert ours.token_ids == naive
    assert ours.stats.kv_tokens_per_layer == [20.5] * 4  # the mean over the KV heads (24 and 17)


def test_uneven_heads_in_a_batch_equal_each_alone(tiny_model, prompt_ids):
    policy = kvpolicy.compose(cache=UnevenHeads())
    prompts = [prompt_ids[0, :n].tolist() for n in (100, 57, 30)]
    alone = [
        kvpolicy.generate(tiny_model, None, input_ids=p, policy=policy, max_new_tokens=8) for p in prompts
    ]
    together = kvpolicy.generate(tiny_model, None, input_ids=prompts, policy=policy, max_new_tokens=8)
    assert [o.token_ids for o in together] == [o.token_ids for o in alone]


def test_paged_attention_equals_dense_attention_on_ragged_rows():
    g = torch.Generator().manual_seed(0)
    h, d = 2, 8
    keys = torch.randn(h, 30, d, generator=g)
    counts = torch.tensor([30, 11])
    layer = PagedLayer(block_size=4)
    layer.store([(keys, keys * 2, torch.arange(30).expand(h, -1), counts)], reserve=3)
    q = torch.randn(1, 4, 1, d, generator=g)
    out, probs = paged_attention(q, layer, 0.3, want_probs=True)
    for head in range(h):
        k = keys[head, : counts[head]]
        want = ((q[0, 2 * head : 2 * head + 2, 0] @ k.T) * 0.3).softmax(-1)
        torch.testing.assert_close(probs[0, head, :, : counts[head]], want)
        assert float(probs[0, head, :, counts[head] :].abs().sum()) == 0.0
        torch.testing.assert_close(out[0, 0, 2 * head * d : (2 * head + 2) * d], (want @ (2 * k)).reshape(-1))


def test_eviction_moves_the_last_entry_into_the_freed_slot():
    layer = PagedLayer(block_size=2)
    pos = torch.arange(6).expand(2, -1)
    layer.store([(torch.randn(2, 6, 4), torch.randn(2, 6, 4), pos, None)], reserve=2)
    mirror = layer.dense(layer.pos_pool).clone()[..., None].float()
    slots = torch.tensor([[[1, 3], [-1, 0]]])
    lengths = layer.lengths.clone()
    layer.evict(slots)
    evict_rows(mirror, slots, lengths)
    assert layer.row_lengths(0) == [4, 5]
    assert layer.positions[0, 0, :4].tolist() == [0, 2, 4, 5]
    assert layer.positions[0, 1, :5].tolist() == [1, 2, 3, 4, 5]
    stored = layer.slot_positions()[0]
    assert mirror[0, 0, :4, 0].long().tolist() == stored[0, :4].tolist()
    assert mirror[0, 1, :5, 0].long().tolist() == stored[1, :5].tolist()
    # vacated and never-used slots read position -1 (what attention and policies mask on)
    assert stored[0, 4:].tolist() == [-1] * (stored.shape[1] - 4)
    assert stored[1, 5:].tolist() == [-1] * (stored.shape[1] - 5)


def test_bad_and_repeated_evictions_are_flagged_not_applied():
    layer = PagedLayer(block_size=4)
    layer.store([(torch.randn(2, 6, 4), torch.randn(2, 6, 4), torch.arange(6).expand(2, -1), None)])
    bad = layer.evict(torch.tensor([[[7], [-2]]]))
    assert bad.tolist() == [[True, True]]
    assert layer.row_lengths(0) == [6, 6]
    assert layer.evict(torch.tensor([[[2, 2], [-1, 5]]])).tolist() == [[True, False]]
    assert layer.row_lengths(0) == [5, 5]


def test_cache_grows_past_its_reserve_without_losing_entries(tiny_model, prompt_ids):
    policy = kvpolicy.get_policy("snapkv", kv_budget=20)
    pre = kvpolicy.prefill(tiny_model, prompt_ids, policy, reserve=0, block_size=4)
    adapter = kvpolicy.get_adapter(tiny_model)
    token = pre.next_token
    out = []
    for step in range(12):
        token = adapter.decode_step(token, policy, pre.batch, step).argmax(-1, keepdim=True)
        out.append(int(token))
    reserved = kvpolicy.generate(tiny_model, None, input_ids=prompt_ids, policy=policy, max_new_tokens=13)
    assert [int(pre.next_token), *out] == reserved.token_ids
    assert pre.cache.kv_lengths == [32] * 4


# -- decode-time returns are checked without syncing ------------------------------------------------
class BadEviction(CachePolicy):
    kind = "bad_eviction_test"

    def select(self, view, state):
        return None

    def on_decode(self, view, state):
        return Evict(torch.full((1, view.lengths.shape[1], 1), 10_000))


def test_bad_decode_indices_are_reported_at_the_end_naming_policy_and_layer(tiny_model, prompt_ids):
    with pytest.raises(AdapterError, match=r"BadEviction.*on_decode\(\) at layer 0.*outside"):
        kvpolicy.generate(
            tiny_model,
            None,
            input_ids=prompt_ids,
            policy=kvpolicy.compose(cache=BadEviction()),
            max_new_tokens=3,
        )


def test_bad_decode_index_shape_fails_at_once(tiny_model, prompt_ids):
    class WrongShape(BadEviction):
        def on_decode(self, view, state):
            return Evict(torch.zeros(3, dtype=torch.long))

    with pytest.raises(AdapterError, match=r"WrongShape.*shape"):
        kvpolicy.generate(
            tiny_model,
            None,
            input_ids=prompt_ids,
            policy=kvpolicy.compose(cache=WrongShape()),
            max_new_tokens=3,
        )


def test_one_prompt_is_a_batch_of_one(tiny_model, prompt_ids):
    policy = kvpolicy.get_policy("fastkv", **TINY_OPTIONS["fastkv"])
    one = kvpolicy.generate(tiny_model, None, input_ids=prompt_ids, policy=policy, max_new_tokens=6)
    many = kvpolicy.generate(
        tiny_model, None, input_ids=[prompt_ids[0].tolist()], policy=policy, max_new_tokens=6
    )
    assert isinstance(many, list) and many[0].token_ids == one.token_ids
    assert many[0].stats.kv_tokens_per_layer == one.stats.kv_tokens_per_layer


def test_prefill_memory_does_not_keep_the_previous_layer(prompt_ids):
    model = tiny_llama()
    from kvpolicy.adapters import base

    old = base.MLP_CHUNK_TOKENS
    base.MLP_CHUNK_TOKENS = 16  # chunked projections and MLP give the same output
    try:
        chunked = kvpolicy.prefill(model, prompt_ids, "fullkv").logits
    finally:
        base.MLP_CHUNK_TOKENS = old
    torch.testing.assert_close(chunked, kvpolicy.prefill(model, prompt_ids, "fullkv").logits)


# -- compiled decode ---------------------------------------------------------------------------------
@pytest.fixture
def dynamo_eager(monkeypatch):
    """Compile with dynamo's graph capture only (no inductor codegen): checks fullgraph capture and
    recompiles quickly; one test below runs inductor itself."""
    import kvpolicy.generation as generation

    monkeypatch.setattr(generation, "COMPILE_BACKEND", "eager")
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("name", list(DECODE_PRESETS))
def test_compiled_decode_equals_eager_and_stops_recompiling(dynamo_eager, name):
    from torch._dynamo.utils import counters

    from kvpolicy.generation import compiled_decode_step

    model = tiny_llama()  # a fresh adapter: its compiled step starts empty
    ids = torch.randint(0, 128, (1, 100), generator=torch.Generator().manual_seed(1))
    policy = tiny_policy(name, DECODE_PRESETS[name])
    eager = kvpolicy.generate(model, None, input_ids=ids, policy=policy, max_new_tokens=40)
    compiled = kvpolicy.generate(model, None, input_ids=ids, policy=policy, max_new_tokens=40, compile=True)
    assert compiled.token_ids == eager.token_ids
    # Across steps of a new request the graphs are reused: no frame is compiled again.
    before = counters["frames"]["ok"]
    pre = kvpolicy.prefill(model, ids, policy, reserve=40)
    step_fn, token = compiled_decode_step(kvpolicy.get_adapter(model)), pre.next_token
    for step in range(40):
        token = step_fn(token, policy, pre.batch, step).argmax(-1, keepdim=True)
    assert counters["frames"]["ok"] == before


def test_inductor_compiled_decode_equals_eager():
    torch._dynamo.reset()
    model = tiny_llama()
    ids = torch.randint(0, 128, (1, 60), generator=torch.Generator().manual_seed(2))
    policy = kvpolicy.get_policy("snapkv", kv_budget=20)
    eager = kvpolicy.generate(model, None, input_ids=ids, policy=policy, max_new_tokens=8)
    compiled = kvpolicy.generate(model, None, input_ids=ids, policy=policy, max_new_tokens=8, compile=True)
    assert compiled.token_ids == eager.token_ids
    torch._dynamo.reset()


# -- model.generate on the cache ------------------------------------------------------------------------
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_model_generate_on_layers_of_different_lengths_is_right_or_refused(attn, prompt_ids):
    from kvpolicy.cache import CacheLayoutError

    model = tiny_llama(attn=attn)
    policy = kvpolicy.get_policy("pyramidkv", kv_budget=20)  # 32, 24, 16, 8 entries per layer
    ours = kvpolicy.generate(model, None, input_ids=prompt_ids, policy=policy, max_new_tokens=6).token_ids
    pre = kvpolicy.prefill(model, prompt_ids, policy, reserve=6)
    ids = torch.cat([prompt_ids, pre.next_token], dim=-1)
    run = lambda: model.generate(  # noqa: E731
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=5,
        do_sample=False,
        **pre.generate_kwargs(model),
    )
    if attn == "sdpa":
        assert (
            run()[0, 100:].tolist() == ours
        )  # no mask in a one-prompt decode: each layer attends to its own
    else:
        with pytest.raises(
            CacheLayoutError, match=r"different numbers of entries.*'eager'.*kvpolicy.generate"
        ):
            run()


def test_model_generate_refuses_ragged_heads(prompt_ids, tiny_model):
    from kvpolicy.cache import CacheLayoutError

    pre = kvpolicy.prefill(tiny_model, prompt_ids, kvpolicy.compose(cache=UnevenHeads()), reserve=4)
    ids = torch.cat([prompt_ids, pre.next_token], dim=-1)
    with pytest.raises(CacheLayoutError, match=r"rows .* different numbers of entries"):
        tiny_model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, **pre.generate_kwargs(tiny_model)
        )


def test_squeeze_recent_ratio_must_match_pyramidinfer():
    from kvpolicy.policies.pyramidinfer import PyramidInfer, PyramidInferSqueeze

    with pytest.raises(
        ValueError, match=r"PyramidInferSqueeze\(recent_ratio=0.01\).*PyramidInfer\(recent_ratio=0.2\)"
    ):
        kvpolicy.compose(PyramidInfer(recent_ratio=0.2), PyramidInferSqueeze())
    kvpolicy.compose(PyramidInfer(recent_ratio=0.2), PyramidInferSqueeze(recent_ratio=0.2))


@pytest.mark.parametrize(
    "indices, problem",
    [
        (torch.tensor([[5, 3, 9]]), "strictly increasing"),
        (torch.tensor([[3, 3, 9]]), "strictly increasing"),
        (torch.tensor([[3, 9, 100]]), r"in \[0, 100\)"),
        (torch.tensor([3, 9]), "shape"),
    ],
)
def test_propagate_indices_are_checked(tiny_model, prompt_ids, indices, problem):
    from kvpolicy.interfaces import Propagate, PropagationPolicy

    class Bad(PropagationPolicy):
        kind = "bad_propagate_test"

        def propagate(self, view, state):
            return Propagate(indices) if view.layer == 0 else None

    with pytest.raises(AdapterError, match=rf"Bad.*propagate\(\) at layer 0.*{problem}"):
        kvpolicy.prefill(tiny_model, prompt_ids, kvpolicy.compose(Bad()))


def test_restart_indices_are_checked(tiny_model, prompt_ids):
    from kvpolicy.interfaces import PropagationPolicy, Restart

    class BadRestart(PropagationPolicy):
        kind = "bad_restart_test"

        def propagate(self, view, state):
            return Restart(torch.tensor([[9, 2, 40]])) if view.layer == 1 else None

    with pytest.raises(AdapterError, match=r"BadRestart.*strictly increasing"):
        kvpolicy.prefill(tiny_model, prompt_ids, kvpolicy.compose(BadRestart()))


# -- compiled decode on the embedded model ----------------------------------------------------------------
EMBEDDED_COMPILE = {
    "fullkv": {},
    "fastkv": {"tsp_layer": 20},
    "h2o-evicting": {"evict_during_decode": True},
    "streamingllm-rolling": {"rolling": True},
    "pyramidinfer": {},
}


@pytest.fixture(scope="module")
def embedded_prompt(real_model):
    """About 700 tokens of real text and a question: long enough for every budget to cut."""
    from kvpolicy.eval import needle

    _, tokenizer = real_model
    haystack = needle.load_haystack(needle.find_haystack_dir())
    return torch.tensor([needle.build_sample(tokenizer, 700, 0.5, haystack).input_ids])


@pytest.mark.slow
@pytest.mark.parametrize("name", list(EMBEDDED_COMPILE))
def test_compiled_decode_equals_eager_on_the_embedded_model(dynamo_eager, real_model, embedded_prompt, name):
    """Graph capture of the real model's 30-layer decode step (fullgraph, no breaks) for each distinct
    decode path: greedy tokens equal eager (dynamo's capture, eager kernels: minutes less than inductor)."""
    model, _ = real_model
    policy = tiny_policy(name, EMBEDDED_COMPILE[name])
    eager = kvpolicy.generate(model, None, input_ids=embedded_prompt, policy=policy, max_new_tokens=12)
    compiled = kvpolicy.generate(
        model, None, input_ids=embedded_prompt, policy=policy, max_new_tokens=12, compile=True
    )
    assert compiled.token_ids == eager.token_ids


@pytest.mark.slow
def test_inductor_compiled_decode_equals_eager_on_the_embedded_model(real_model, embedded_prompt):
    """Inductor's generated kernels on the real model (about a minute of compiling on 2 cores)."""
    model, _ = real_model
    torch._dynamo.reset()
    policy = kvpolicy.get_policy("snapkv")
    eager = kvpolicy.generate(model, None, input_ids=embedded_prompt, policy=policy, max_new_tokens=12)
    compiled = kvpolicy.generate(
        model, None, input_ids=embedded_prompt, policy=policy, max_new_tokens=12, compile=True
    )
    torch._dynamo.reset()
    assert compiled.token_ids == eager.token_ids
