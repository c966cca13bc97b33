"""KVzip (policies/kvzip.py): reconstruction scores, kvpress's allocation, the engine's scoring suffix."""

from __future__ import annotations

import math

import pytest
import torch

pytest.register_assert_rewrite("kvpolicy.testing")
pytest_plugins = ["kvpolicy.testing"]

import kvpolicy  # noqa: E402
from kvpolicy.interfaces import LayerView  # noqa: E402
from kvpolicy.policies import TSP, AllTokens, FullCache, KVzip  # noqa: E402
from kvpolicy.policies.kvzip import (  # noqa: E402
    FIRST_PROMPT,
    NEXT_PROMPT,
    reconstruction_scores,
    repeat_tokens,
)
from kvpolicy.state import RequestState  # noqa: E402
from kvpolicy.testing import ByteTokenizer, CachePolicyConformance, ConformanceCase, tiny_llama  # noqa: E402


@pytest.fixture(autouse=True)
def _one_thread(single_thread: None) -> None:
    """Tiny models run fastest on one thread (two spin-wait on a busy machine)."""


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return tiny_llama(vocab=256)


def _prompt(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 250, (n,), generator=torch.Generator().manual_seed(seed))


class ChatBytes(ByteTokenizer):
    """A byte tokenizer with a chat template (system prompt, user header, assistant header)."""

    chat_template = "yes"

    def apply_chat_template(self, messages, add_generation_prompt=True, tokenize=False, **kwargs):  # type: ignore[no-untyped-def]
        return f"<sys>be brief</sys><user>{messages[0]['content']}</user><assistant>"


# -- scores ------------------------------------------------------------------------------------------
def test_reconstruction_scores_equal_naive() -> None:
    """Max over the repetition's queries and the KV group of the softmax over sinks, the chunk and the
    repetition (causal), against plain loops in float64."""
    g = torch.Generator().manual_seed(1)
    h_kv, group, d, t = 2, 3, 8, 40
    q, k = torch.randn(h_kv * group, t, d, generator=g), torch.randn(h_kv, t, d, generator=g)
    start, end, lo, hi, sinks, scale = 6, 20, 25, 40, 4, 0.3
    got = reconstruction_scores(q, k, scale, start, end, (lo, hi), sinks)
    want = torch.zeros(h_kv, end - start, dtype=torch.float64)
    for h in range(h_kv):
        for r in range(group):
            for i in range(lo, hi):
                cols = [*range(min(sinks, start)), *range(start, end), *range(lo, i + 1)]
                logits = [scale * float(q[h * group + r, i].double() @ k[h, c].double()) for c in cols]
                top = max(logits)
                z = sum(math.exp(x - top) for x in logits)
                for j, c in enumerate(cols):
                    if start <= c < end:
                        want[h, c - start] = max(want[h, c - start], math.exp(logits[j] - top) / z)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)


def _kvpress_compress(scores: torch.Tensor, ratio: float, layerwise: bool) -> torch.Tensor:
    """kvpress's ``KVzipPress.compress_post``, transcribed: the ``(layers, H, T)`` keep mask."""
    n_layer, heads, t = scores.shape
    if layerwise:
        n_pruned_layers = [int(heads * t * ratio)] * n_layer
    else:
        pruned = torch.topk(-scores.reshape(-1), int(scores.numel() * ratio)).indices
        n_pruned_layers = torch.bincount(pruned // (heads * t), minlength=n_layer).tolist()
    keep = torch.ones_like(scores, dtype=torch.bool)
    for layer in range(n_layer):
        idx = torch.topk(-scores[layer].reshape(1, -1), n_pruned_layers[layer], dim=1).indices.flatten()
        keep[layer, idx // t, idx % t] = False
    return keep


@pytest.mark.parametrize("layerwise", [False, True])
@pytest.mark.parametrize("budget", [0.25, 0.5, 0.75])
def test_allocation_equals_kvpress(budget: float, layerwise: bool) -> None:
    """The global (or per-layer) bottom-k over layers and heads is kvpress's, entry for entry."""
    scores = torch.rand(5, 3, 50, generator=torch.Generator().manual_seed(2))
    scores[..., :4] = 1.0
    policy = KVzip(budget=budget, layerwise=layerwise)
    state = RequestState(prompt_len=50, num_layers=5)
    state.scratch(policy)["scores"] = dict(enumerate(scores))
    final = policy.finish_prefill(state)
    assert final is not None
    want = _kvpress_compress(scores, 1 - budget, layerwise)
    for layer, sel in final.items():
        for h in range(3):
            kept = sel.indices[0, h, : int(sel.counts[0, h])].tolist()
            assert kept == want[layer, h].nonzero().flatten().tolist(), (layer, h)
    if not layerwise:  # memory follows the budget over the whole model, not per layer
        total = sum(int(sel.counts.sum()) for sel in final.values())
        assert total == scores.numel() - int(scores.numel() * (1 - budget))


# -- the repetition --------------------------------------------------------------------------------
def test_repetition_is_kvpress_prompt_chat_suffix_and_context() -> None:
    tok = ChatBytes()
    tokens = repeat_tokens(tok)
    assert bytes(tokens.first).decode() == FIRST_PROMPT and bytes(tokens.next).decode() == NEXT_PROMPT
    assert bytes(tokens.prefix).decode() == "<sys>be brief</sys><user>"
    assert bytes(tokens.suffix).decode() == "</user><assistant>"
    policy = KVzip(budget=0.5, chunk_size=10, overlap=3).with_tokenizer(tok)
    context = list(b"<sys>be brief</sys><user>") + list(b"abcdefghijklmnopqrstuvw")
    prompt = torch.tensor(context)
    state = RequestState(prompt_len=len(context), num_layers=2)
    segments = policy.scoring_suffix(prompt, state)
    assert segments is not None and len(segments) == 3  # one pass per chunk
    suffix = torch.cat(segments)
    text = bytes(suffix.tolist()).decode()
    first = FIRST_PROMPT + "</user><assistant>abcdefghij"
    second = NEXT_PROMPT + "hij</user><assistant>klmnopqrst"
    third = NEXT_PROMPT + "rst</user><assistant>uvw"
    assert text == first + second + third
    n, skip = len(context), len(tokens.prefix)
    spans = state.scratch(policy)["spans"]
    assert [(a, b) for a, b, _, _ in spans] == [(skip, skip + 10), (skip + 10, skip + 20), (skip + 20, n)]
    assert spans[0][2] == n and spans[-1][3] == n + len(suffix)
    # A prompt that does not start with the template's prefix is repeated whole.
    bare = torch.tensor(list(b"abcdefghijklmnopqrstuvw"))
    segments = policy.scoring_suffix(bare, RequestState(prompt_len=23, num_layers=2))
    assert segments is not None
    assert bytes(segments[0].tolist()).decode() == FIRST_PROMPT + "</user><assistant>abcdefghij"


def test_without_a_tokenizer_the_repetition_is_the_context() -> None:
    prompt = _prompt(30)
    segments = KVzip(budget=0.5).scoring_suffix(prompt, RequestState(prompt_len=30, num_layers=2))
    assert segments is not None and torch.cat(segments).tolist() == prompt.tolist()
    assert KVzip(budget=1.0).scoring_suffix(prompt, RequestState(prompt_len=30, num_layers=2)) is None


# -- on the engine ---------------------------------------------------------------------------------
def test_engine_scores_with_the_suffix_and_never_caches_it(model: torch.nn.Module) -> None:
    prompt = _prompt(80)
    policy = kvpolicy.compose(AllTokens(), KVzip(budget=0.25))
    pre = kvpolicy.prefill(model, prompt[None], policy, reserve=4)
    layers = pre.cache.layers
    kv_heads = model.config.num_key_value_heads
    assert pre.state.tokens_per_layer == [160] * len(layers)  # the reconstruction is prefill work
    assert pre.state.scoring_tokens == 80
    kept = [n for layer in layers for n in layer.row_lengths(0)]
    assert sum(kept) == 80 * kv_heads * len(layers) - int(80 * kv_heads * len(layers) * 0.75)
    assert len(set(kept)) > 1  # budgets differ across layers and heads: the allocation is global
    assert all(int(layer.positions.max()) < 80 for layer in layers)
    assert pre.cache.get_seq_length() == 80  # decoding continues after the prompt
    full = kvpolicy.prefill(model, prompt[None], kvpolicy.compose())
    torch.testing.assert_close(pre.logits, full.logits)  # the prompt's last token, not the suffix's


def test_batch_equals_one_at_a_time(model: torch.nn.Module) -> None:
    prompts = [_prompt(70, 3).tolist(), _prompt(41, 4).tolist(), _prompt(55, 5).tolist()]
    policy = kvpolicy.compose(AllTokens(), KVzip(budget=0.3))
    together = kvpolicy.generate(model, None, input_ids=prompts, policy=policy, max_new_tokens=6)
    for ids, out in zip(prompts, together, strict=True):
        alone = kvpolicy.generate(model, None, input_ids=ids, policy=policy, max_new_tokens=6)
        assert out.token_ids == alone.token_ids
        assert out.stats.kv_tokens_per_layer == alone.stats.kv_tokens_per_layer


def test_generate_binds_the_tokenizer_and_answers_questions(model: torch.nn.Module) -> None:
    tok = ByteTokenizer()
    policy = kvpolicy.get_policy("kvzip", kv_budget=0.5)
    out = kvpolicy.generate(
        model, tok, "a context of some length, long enough to drop half", policy, max_new_tokens=4
    )
    n = out.stats.prompt_tokens
    assert out.stats.tokens_per_layer[0] == n + len(FIRST_PROMPT.encode()) + 1 + n  # prompt, "\n", context
    answers = kvpolicy.generate(
        model,
        tok,
        policy=policy,
        context="the context " * 8,
        questions=["q one?", "q two?"],
        max_new_tokens=3,
    )
    assert len(answers) == 2


def test_propagation_cuts_are_refused() -> None:
    with pytest.raises(ValueError, match="tsp"):
        kvpolicy.compose(TSP(layer=1, rate=0.5), KVzip())


def test_bad_settings_name_the_value() -> None:
    for bad in ({"budget": 0}, {"sinks": -1}, {"chunk_size": 0}, {"overlap": -2}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            KVzip(**bad)


# -- the conformance suite ------------------------------------------------------------------------
def _layerwise_kept(policy: KVzip, length: int, layer: int, num_layers: int, heads: int = 2) -> float:
    """Mean entries per KV head of a layer under ``layerwise``: kvpress drops ``int(H * L * ratio)``."""
    if policy.resolved_budget(length) >= length:
        return length
    if isinstance(policy.budget, int):
        return policy.budget
    return (heads * length - int(heads * length * round(1 - policy.budget, 12))) / heads


class TestKVzipConformance(CachePolicyConformance):
    kvpolicy_cases = (
        ConformanceCase(
            KVzip,
            budgeted=lambda budget: KVzip(budget=budget, layerwise=True),
            invalid=[{"budget": 0}, {"sinks": -1}, {"chunk_size": 0}],
            examples=[KVzip(budget=64, layerwise=True, sinks=0, chunk_size=512, overlap=0)],
            expected_kv=_layerwise_kept,
            ragged=True,
            composes_with=("all",),
        ),
    )


class _Segments(FullCache):
    """Test policy: appends given scoring segments and records each layer's queries and keys."""

    segments: tuple[tuple[int, ...], ...] = ()

    def scoring_suffix(self, prompt: torch.Tensor, state: RequestState) -> list[torch.Tensor] | None:
        return [torch.tensor(s) for s in self.segments] or None

    def select(self, view: LayerView, state: RequestState) -> None:
        state.scratch(self)[view.layer] = (
            view.query[0].clone(),
            view.key[0].clone(),
            view.positions[0].clone(),
        )
        return None


def test_each_segment_is_a_separate_pass_over_the_prompt(model: torch.nn.Module) -> None:
    """Segments after one prompt in one forward see the prompt and themselves only, numbered from L:
    each one's queries and keys equal those of a forward with that segment alone."""
    prompt = _prompt(40, 7)
    segs = (tuple(_prompt(12, 8).tolist()), tuple(_prompt(9, 9).tolist()), tuple(_prompt(15, 10).tolist()))
    together = _Segments(segments=segs)
    pre = kvpolicy.prefill(model, prompt[None], kvpolicy.compose(AllTokens(), together))
    rec = pre.state.scratch(together)
    assert pre.state.scoring_segments == (12, 9, 15) and pre.cache.get_seq_length() == 40
    start = 40
    for seg in segs:
        alone = _Segments(segments=(seg,))
        one = kvpolicy.prefill(model, prompt[None], kvpolicy.compose(AllTokens(), alone))
        ref = one.state.scratch(alone)
        rows = slice(start, start + len(seg))
        for layer, (q, k, pos) in ref.items():
            q_all, k_all, pos_all = rec[layer]
            assert pos_all[rows].tolist() == pos[40:].tolist() == list(range(40, 40 + len(seg)))
            torch.testing.assert_close(q_all[:, rows], q[:, 40:], rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(k_all[:, rows], k[:, 40:], rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(q_all[:, :40], q[:, :40])  # the prompt never sees a segment
        start += len(seg)
    torch.testing.assert_close(pre.logits, kvpolicy.prefill(model, prompt[None]).logits)
