"""kvpolicy's conformance suite for cache policies, as a pytest plugin.

Any policy author can run the checks every built-in cache policy passes against their own policy:

1. keep-everything settings give the same greedy tokens as full KV (on a tiny random Llama);
2. budgets hold per layer and KV head (``cache.layers[i].keys.shape[2]`` is the resolved budget
   when the prompt is longer), each head keeps distinct prompt entries, decoding continues;
3. settings validate (bad values and unknown names raise, naming the setting), are immutable, and
   round-trip through JSON (``to_dict`` -> :func:`kvpolicy.registry.component_from_dict` and
   :func:`kvpolicy.registry.policy_from_dict`); the policy is registered under its ``kind``;
4. the policy composes with every *registered* propagation policy (built-in or installed);
5. it survives 1-token prompts, prompts shorter than a window, and budgets larger than the prompt.

Enable the plugin in the conftest.py at the root of your tests (or ``pytest -p kvpolicy.testing``)::

    import pytest

    pytest.register_assert_rewrite("kvpolicy.testing")
    pytest_plugins = ["kvpolicy.testing"]

(``register_assert_rewrite`` first: a conftest that imports ``kvpolicy.testing`` at module level, as
below, otherwise makes pytest warn on every run that it cannot rewrite the plugin's asserts.)

declare what to test with the ``pytest_kvpolicy_cases`` hook in that conftest.py::

    from kvpolicy.testing import ConformanceCase
    from my_package import MyPolicy

    def pytest_kvpolicy_cases():
        return [ConformanceCase(MyPolicy, invalid=[{"budget": 0}])]

and pull the suite into a test module by subclassing it (the class name must start with ``Test``)::

    from kvpolicy.testing import CachePolicyConformance

    class TestMyPolicyConformance(CachePolicyConformance):
        pass

A subclass may instead list its own cases in a ``kvpolicy_cases`` attribute (of the class, or of
its module), which takes precedence over the hook. The plugin
parametrizes every test of the suite over the cases (test ids are the cases' ids) and the
composition test over the registry's propagation policies. Override the ``kvpolicy_model``
fixture to run the suite on another model than the tiny random Llama.

The plugin is not registered as a ``pytest11`` entry point on purpose: it imports torch and
transformers, which every pytest run in an environment with kvpolicy installed would then pay for.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch

import kvpolicy
from kvpolicy.config import resolve_budget
from kvpolicy.interfaces import CachePolicy, Policy, PropagationPolicy
from kvpolicy.policies.full import AllTokens, FullCache
from kvpolicy.registry import PolicyConfigError, component_from_dict, get_registry, policy_from_dict

#: Prompt length of the main checks, tokens generated per run, and the budgets checked.
PROMPT_LEN = 100
NEW_TOKENS = 8
BUDGETS: tuple[int | float, ...] = (24, 40, 0.25)
#: Prompt lengths of the bad-input checks (all shorter than the usual 8-token windows).
SHORT_PROMPTS = (1, 3, 7)

ExpectedKV = Callable[[CachePolicy, int, int, int], int]


def default_expected_kv(policy: CachePolicy, prompt_len: int, layer: int, num_layers: int) -> int:
    """Entries per KV head a budgeted policy keeps when every prompt token reaches the layer.

    ``policy.budget`` resolved against the prompt, but at least ``policy.window`` (when the policy
    has one: the window is always kept) and at most the prompt: the SnapKV convention. Pass your
    own to :class:`ConformanceCase` for other schedules (e.g. budgets that vary with depth).
    """
    resolved = getattr(policy, "resolved_budget", None)  # a policy's own floors, when it says them
    budget = resolved(prompt_len) if callable(resolved) else resolve_budget(policy.budget, prompt_len)  # type: ignore[attr-defined]
    window = int(getattr(policy, "window", 0) or 0)
    return min(prompt_len, max(budget, window))


@dataclass(frozen=True)
class ConformanceCase:
    """One cache policy configuration family for the suite to check.

    Only ``policy`` is required when the class has a ``budget`` field with kvpolicy's meaning
    (tokens or a fraction of the prompt): the suite then builds ``policy(budget=b)``.

    Attributes:
        policy: the :class:`~kvpolicy.interfaces.CachePolicy` subclass under test.
        budgeted: builds the policy for a budget (``int`` tokens or ``float`` fraction); default
            ``policy(budget=b)`` if the class has a ``budget`` field, else the budget checks skip.
        keep_all: settings that keep every entry, at prefill and while decoding; default
            ``budgeted(1.0)``, or ``policy()`` when there is no budget.
        invalid: settings (keyword arguments) that must be refused.
        examples: further valid settings to round-trip through JSON.
        expected_kv: ``(policy, prompt_len, layer, num_layers) -> entries per KV head`` for the
            budget checks; default :func:`default_expected_kv`.
        propagation_settings: settings for registered propagation policies the composition check
            cannot build with their defaults, by kind: ``{"mykind": {"layer": 1}}``.
        registered: whether the class is in kvpolicy's registry (installed and registered through
            ``kvpolicy_register_components``); ``False`` round-trips through the class itself.
        id: the test id; default the policy's ``kind``.
        ragged: the KV heads of a layer keep different numbers of entries that add up to ``H_kv``
            times the budget (head-adaptive budgets, a :class:`~kvpolicy.interfaces.PerHead`
            selection): the budget checks compare the mean over the KV heads (what the layer's
            memory follows) with ``expected_kv``, instead of the largest head.
        composes_with: the propagation kinds the policy composes with; ``None`` (the default): every
            registered one. Each other kind must be refused by :func:`kvpolicy.compose` with a
            ``ValueError`` that names it (KVzip scores with a pass no propagation cut may shorten).
    """

    policy: type[CachePolicy]
    budgeted: Callable[[int | float], CachePolicy] | None = None
    keep_all: CachePolicy | None = None
    invalid: Sequence[Mapping[str, Any]] = ()
    examples: Sequence[CachePolicy] = ()
    expected_kv: ExpectedKV = default_expected_kv
    propagation_settings: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    registered: bool = True
    id: str = ""
    ragged: bool = False
    composes_with: Collection[str] | None = None

    def __post_init__(self) -> None:
        if not (isinstance(self.policy, type) and issubclass(self.policy, CachePolicy)):
            raise TypeError(f"ConformanceCase.policy must be a CachePolicy subclass, got {self.policy!r}")

    @property
    def label(self) -> str:
        return self.id or self.policy.kind or self.policy.__name__

    def make_budgeted(self, budget: int | float) -> CachePolicy | None:
        """The policy at ``budget``, or ``None`` if it has no budget."""
        if self.budgeted is not None:
            return self.budgeted(budget)
        if "budget" in self.policy.model_fields:
            return self.policy(budget=budget)  # type: ignore[call-arg]
        return None

    def make_keep_all(self) -> CachePolicy:
        if self.keep_all is not None:
            return self.keep_all
        return self.make_budgeted(1.0) or self.policy()

    def all_examples(self) -> list[CachePolicy]:
        out = [self.make_keep_all(), *self.examples]
        out += [p for p in (self.make_budgeted(b) for b in BUDGETS) if p is not None]
        return out


# -- the tiny model and a byte tokenizer ----------------------------------------------------------
def tiny_llama(
    layers: int = 4, heads: int = 4, kv_heads: int = 2, hidden: int = 64, vocab: int = 128, seed: int = 0
) -> Any:
    """A randomly initialised ``LlamaForCausalLM`` small enough for unit tests (milliseconds a token).

    Grouped-query attention (``heads`` query heads share ``kv_heads`` KV heads), SDPA attention.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=8192,
        attn_implementation="sdpa",
    )
    return LlamaForCausalLM(config).eval()


class ByteTokenizer:
    """A stand-in tokenizer: one token per UTF-8 byte (ids 0-255), no chat template.

    Enough for :func:`kvpolicy.generate` and the CLI with a :func:`tiny_llama` of ``vocab >= 256``.
    """

    chat_template = None
    eos_token_id = None

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
        return {"input_ids": list(text.encode("utf-8"))}

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return bytes(int(i) % 256 for i in ids).decode("utf-8", errors="replace")


@contextmanager
def one_thread() -> Iterator[None]:
    """Run torch single-threaded inside the block (then restore): tiny models run faster that way."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


# -- the plugin: hook, parametrization, fixtures --------------------------------------------------
class _HookSpecs:
    @pytest.hookspec
    def pytest_kvpolicy_cases(self, config: pytest.Config) -> Sequence[ConformanceCase]:  # type: ignore[empty-body]
        """Cache policy configurations for :class:`CachePolicyConformance` to check.

        Implement it in a conftest.py; every implementation that applies to a test's directory
        contributes its cases.
        """


def pytest_addhooks(pluginmanager: pytest.PytestPluginManager) -> None:
    pluginmanager.add_hookspecs(_HookSpecs)


def _declared_cases(metafunc: pytest.Metafunc) -> list[ConformanceCase]:
    own = getattr(metafunc.cls, "kvpolicy_cases", None)
    if own is None:
        own = getattr(metafunc.module, "kvpolicy_cases", None)
    if own is None:
        results = metafunc.definition.ihook.pytest_kvpolicy_cases(config=metafunc.config)
        own = [case for result in results for case in (result or ())]
    cases = list(own)
    for case in cases:
        if not isinstance(case, ConformanceCase):
            raise TypeError(f"kvpolicy conformance cases must be ConformanceCase objects, got {case!r}")
    return cases


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "kvpolicy_case" in metafunc.fixturenames:
        cases = _declared_cases(metafunc)
        if not cases:
            raise pytest.UsageError(
                f"{metafunc.definition.nodeid}: no kvpolicy conformance cases: implement "
                "pytest_kvpolicy_cases() in conftest.py or set kvpolicy_cases on the test class"
            )
        labels = [case.label for case in cases]
        if len(set(labels)) != len(labels):
            raise pytest.UsageError(f"kvpolicy conformance cases need distinct ids, got {labels}")
        metafunc.parametrize("kvpolicy_case", cases, ids=labels)
    if "kvpolicy_propagation" in metafunc.fixturenames:
        registry = get_registry()
        kinds = sorted(name for name, e in registry.components.items() if e.category == "propagation")
        metafunc.parametrize("kvpolicy_propagation", kinds)


@pytest.fixture(scope="session")
def kvpolicy_model() -> Any:
    """The model the suite runs on: :func:`tiny_llama` (4 layers, 4 query / 2 KV heads)."""
    return tiny_llama()


@pytest.fixture(scope="session")
def kvpolicy_prompt(kvpolicy_model: Any) -> torch.Tensor:
    """A ``(1, PROMPT_LEN)`` prompt of random token ids, the same every run."""
    vocab = kvpolicy_model.get_input_embeddings().num_embeddings
    return torch.randint(0, vocab, (1, PROMPT_LEN), generator=torch.Generator().manual_seed(1))


# -- helpers ----------------------------------------------------------------------------------------
def _tokens(model: Any, ids: torch.Tensor, policy: Policy, new_tokens: int = NEW_TOKENS) -> list[int]:
    return kvpolicy.generate(model, None, input_ids=ids, policy=policy, max_new_tokens=new_tokens).token_ids


def _num_layers(model: Any) -> int:
    return kvpolicy.get_adapter(model).num_layers


def _check_layer(
    cache_layer: Any, layer: int, kv_heads: int, tokens: int, what: str, ragged: bool = False
) -> int | float:
    """Shape and content checks every cached layer must pass; returns the entries per KV head (the
    largest, for policies whose heads keep different counts: see :func:`_head_counts`; their mean
    when ``ragged``: see :attr:`ConformanceCase.ragged`)."""
    keys, values, positions = cache_layer.keys, cache_layer.values, cache_layer.positions
    assert keys.shape[:3] == values.shape[:3] == positions.shape, (
        f"{what}: layer {layer}: keys {tuple(keys.shape)}, values {tuple(values.shape)} and positions "
        f"{tuple(positions.shape)} disagree"
    )
    assert keys.shape[1] == kv_heads, (
        f"{what}: layer {layer} caches {keys.shape[1]} heads; caches hold KV heads ({kv_heads})"
    )
    counts = _head_counts(cache_layer)
    for head, n in enumerate(counts):
        assert 1 <= n <= tokens, (
            f"{what}: layer {layer}, KV head {head} keeps {n} entries of the {tokens} it saw"
        )
        pos = positions[0, head, :n].tolist()
        assert len(set(pos)) == n, f"{what}: layer {layer}, KV head {head} keeps an entry twice: {pos}"
    return sum(counts) / len(counts) if ragged else max(counts)


def _head_counts(cache_layer: Any) -> list[int]:
    """Entries each KV head of the first sequence holds."""
    return [int(n) for n in cache_layer.lengths[0].tolist()]


class CachePolicyConformance:
    """kvpolicy's conformance suite for a cache policy. Subclass it as ``Test...`` in a test module.

    Every test takes the ``kvpolicy_case`` the plugin parametrizes (see the module docstring) and
    runs on the ``kvpolicy_model`` fixture.
    """

    #: Cases for this class only; ``None`` uses the ``pytest_kvpolicy_cases`` hook.
    kvpolicy_cases: Sequence[ConformanceCase] | None = None

    @pytest.fixture(autouse=True)
    def _kvpolicy_one_thread(self) -> Iterator[None]:
        """Run single-threaded: on a tiny model intra-op threads only add overhead (tens of times
        slower on a busy machine)."""
        with one_thread():
            yield

    # (a) keep everything == full KV --------------------------------------------------------------
    def test_keep_all_equals_full_kv(
        self, kvpolicy_case: ConformanceCase, kvpolicy_model: Any, kvpolicy_prompt: torch.Tensor
    ) -> None:
        policy = kvpolicy_case.make_keep_all()
        full = _tokens(kvpolicy_model, kvpolicy_prompt, kvpolicy.compose(AllTokens(), FullCache()))
        ours = _tokens(kvpolicy_model, kvpolicy_prompt, kvpolicy.compose(AllTokens(), policy))
        assert ours == full, f"{policy!r} should keep everything, but its tokens differ from full KV"
        pre = kvpolicy.prefill(kvpolicy_model, kvpolicy_prompt, kvpolicy.compose(cache=policy))
        length = kvpolicy_prompt.shape[1]
        assert pre.cache.kv_lengths == [length] * len(pre.cache.layers), (
            f"{policy!r} should keep all {length} entries per layer, kept {pre.cache.kv_lengths}"
        )

    # (b) budgets per layer and KV head -----------------------------------------------------------
    @pytest.mark.parametrize("budget", BUDGETS, ids=[f"budget={b}" for b in BUDGETS])
    def test_budget_per_layer_and_kv_head(
        self,
        kvpolicy_case: ConformanceCase,
        kvpolicy_model: Any,
        kvpolicy_prompt: torch.Tensor,
        budget: int | float,
    ) -> None:
        policy = kvpolicy_case.make_budgeted(budget)
        if policy is None:
            pytest.skip(f"{kvpolicy_case.policy.__name__} has no budget (give ConformanceCase.budgeted)")
        composed = kvpolicy.compose(cache=policy)
        length = kvpolicy_prompt.shape[1]
        pre = kvpolicy.prefill(kvpolicy_model, kvpolicy_prompt, composed, reserve=4)
        num_layers = len(pre.cache.layers)
        kv_heads = kvpolicy_model.config.num_key_value_heads
        kept = []
        for i, layer in enumerate(pre.cache.layers):
            n = _check_layer(layer, i, kv_heads, length, repr(policy), kvpolicy_case.ragged)
            want = kvpolicy_case.expected_kv(policy, length, i, num_layers)
            assert n == want, f"{policy!r}: layer {i} keeps {n} entries per KV head, expected {want}"
            assert int(layer.positions.max()) < length
            kept.append(n)
        # Decoding continues at the logical position, appending to the compressed cache.
        adapter = kvpolicy.get_adapter(kvpolicy_model)
        token = pre.next_token
        for step in range(3):
            token = adapter.decode_step(token, composed, pre.state, step).argmax(dim=-1, keepdim=True)
        assert pre.cache.get_seq_length() == length + 3, "decode positions must continue at the prompt length"
        if not policy.evicts_during_decode:
            assert pre.cache.kv_lengths == [n + 3 for n in kept]

    # (c) settings ---------------------------------------------------------------------------------
    def test_settings_validate(self, kvpolicy_case: ConformanceCase) -> None:
        cls = kvpolicy_case.policy
        with pytest.raises(ValueError, match="no_such_setting"):
            cls(no_such_setting=1)  # type: ignore[call-arg]
        for bad in kvpolicy_case.invalid:
            with pytest.raises(ValueError) as err:
                cls(**bad)
            if kvpolicy_case.registered:
                with pytest.raises(PolicyConfigError) as err:
                    component_from_dict({"kind": cls.kind, **bad})
            message = str(err.value)
            assert any(name in message for name in bad), (
                f"the error for {dict(bad)} should name the bad setting: {message}"
            )

    def test_settings_are_immutable(self, kvpolicy_case: ConformanceCase) -> None:
        policy = kvpolicy_case.make_keep_all()
        assert type(policy).model_config.get("frozen"), f"{type(policy).__name__} settings must be frozen"
        for name in type(policy).model_fields:
            with pytest.raises(ValueError):
                setattr(policy, name, getattr(policy, name))

    def test_settings_round_trip_json(self, kvpolicy_case: ConformanceCase) -> None:
        cls = kvpolicy_case.policy
        for policy in kvpolicy_case.all_examples():
            data = json.loads(json.dumps(policy.to_dict()))
            assert data["kind"] == cls.kind
            if kvpolicy_case.registered:
                again = component_from_dict(data)
                whole = json.loads(json.dumps(kvpolicy.compose(cache=policy).to_dict()))
                assert policy_from_dict(whole).cache == policy
            else:
                again = cls(**{k: v for k, v in data.items() if k != "kind"})
            assert type(again) is cls and again == policy, f"{policy!r} came back as {again!r}"

    def test_registered_as_cache_component(self, kvpolicy_case: ConformanceCase) -> None:
        cls = kvpolicy_case.policy
        if not kvpolicy_case.registered:
            pytest.skip("ConformanceCase(registered=False)")
        assert cls.kind, f"{cls.__name__} needs a `kind` (its registry name)"
        entry = get_registry().components.get(cls.kind)
        assert entry is not None, (
            f"{cls.kind!r} is not registered: return {cls.__name__} from a kvpolicy_register_components "
            "hook under the `kvpolicy` entry-point group, and install the package"
        )
        assert entry.obj is cls and entry.category == "cache", f"{cls.kind!r} is registered as {entry}"

    # (d) composition with every registered propagation policy -----------------------------------
    def test_composes_with_propagation(
        self,
        kvpolicy_case: ConformanceCase,
        kvpolicy_propagation: str,
        kvpolicy_model: Any,
        kvpolicy_prompt: torch.Tensor,
    ) -> None:
        prop_cls = get_registry().components[kvpolicy_propagation].obj
        settings = dict(kvpolicy_case.propagation_settings.get(kvpolicy_propagation, {}))
        try:
            prop: PropagationPolicy = prop_cls(**settings)
            prop.check_model(_num_layers(kvpolicy_model))
        except ValueError as exc:
            pytest.skip(
                f"propagation {kvpolicy_propagation!r} does not build with {settings or 'its defaults'} "
                f"for this model ({exc}); give ConformanceCase.propagation_settings"
            )
        keep_all = kvpolicy_case.make_keep_all()
        if (
            kvpolicy_case.composes_with is not None
            and kvpolicy_propagation not in kvpolicy_case.composes_with
        ):
            with pytest.raises(ValueError, match=kvpolicy_propagation):
                kvpolicy.compose(prop, keep_all)
            return
        full = _tokens(kvpolicy_model, kvpolicy_prompt, kvpolicy.compose(prop, FullCache()))
        ours = _tokens(kvpolicy_model, kvpolicy_prompt, kvpolicy.compose(prop, keep_all))
        assert ours == full, f"{keep_all!r} after {prop!r} should match full KV after it"

        policy = kvpolicy_case.make_budgeted(24)
        if policy is None:
            return
        composed = kvpolicy.compose(prop, policy)
        length = kvpolicy_prompt.shape[1]
        pre = kvpolicy.prefill(kvpolicy_model, kvpolicy_prompt, composed)
        kv_heads = kvpolicy_model.config.num_key_value_heads
        num_layers = len(pre.cache.layers)
        for i, layer in enumerate(pre.cache.layers):
            seen = pre.state.tokens_per_layer[i]
            n = _check_layer(layer, i, kv_heads, seen, f"{policy!r} after {prop!r}", kvpolicy_case.ragged)
            # The budget resolves against the prompt; a layer that fewer tokens reach keeps them all.
            budget = kvpolicy_case.expected_kv(policy, length, i, num_layers)
            want = min(budget, seen)
            assert n == want, (
                f"{policy!r} after {prop!r}: layer {i} keeps {n} entries per KV head of the {seen} tokens "
                f"that reached it, expected {want} (its budget {budget} for a {length}-token prompt)"
            )
        assert _tokens(kvpolicy_model, kvpolicy_prompt, composed, new_tokens=4)

    # (e) bad inputs -------------------------------------------------------------------------------
    @pytest.mark.parametrize("length", SHORT_PROMPTS, ids=[f"prompt={n}" for n in SHORT_PROMPTS])
    def test_short_prompts(
        self, kvpolicy_case: ConformanceCase, kvpolicy_model: Any, kvpolicy_prompt: torch.Tensor, length: int
    ) -> None:
        ids = kvpolicy_prompt[:, :length]
        full = _tokens(kvpolicy_model, ids, kvpolicy.compose())
        num_layers = _num_layers(kvpolicy_model)
        kv_heads = kvpolicy_model.config.num_key_value_heads
        # The budget larger than the prompt must be a no-op; the fraction may compress.
        variants = [(kvpolicy_case.make_keep_all(), True)]
        variants += [(p, b == 24) for b in (24, 0.25) if (p := kvpolicy_case.make_budgeted(b)) is not None]
        for policy, keeps_all in variants:
            composed = kvpolicy.compose(cache=policy)
            out = _tokens(kvpolicy_model, ids, composed)
            assert len(out) >= 1
            pre = kvpolicy.prefill(kvpolicy_model, ids, composed)
            for i, layer in enumerate(pre.cache.layers):
                what = f"{policy!r} on a {length}-token prompt"
                n = _check_layer(layer, i, kv_heads, length, what, kvpolicy_case.ragged)
                want = length if keeps_all else kvpolicy_case.expected_kv(policy, length, i, num_layers)
                assert n == want, f"{policy!r} kept {n} entries of a {length}-token prompt, expected {want}"
            if keeps_all:
                assert out == full, f"{policy!r} keeps a {length}-token prompt whole but its tokens differ"

    def test_budget_larger_than_prompt(
        self, kvpolicy_case: ConformanceCase, kvpolicy_model: Any, kvpolicy_prompt: torch.Tensor
    ) -> None:
        policy = kvpolicy_case.make_budgeted(2 * PROMPT_LEN)
        if policy is None:
            pytest.skip(f"{kvpolicy_case.policy.__name__} has no budget (give ConformanceCase.budgeted)")
        ids = kvpolicy_prompt[:, :20]
        composed = kvpolicy.compose(cache=policy)
        pre = kvpolicy.prefill(kvpolicy_model, ids, composed)
        assert pre.cache.kv_lengths == [20] * len(pre.cache.layers), (
            f"a budget of {2 * PROMPT_LEN} on a 20-token prompt must keep everything, kept {pre.cache.kv_lengths}"
        )
        assert _tokens(kvpolicy_model, ids, composed) == _tokens(kvpolicy_model, ids, kvpolicy.compose())

    # (f) graph-replayed decode -------------------------------------------------------------------
    def test_graph_decode_equals_eager(
        self, kvpolicy_case: ConformanceCase, kvpolicy_model: Any, kvpolicy_prompt: torch.Tensor
    ) -> None:
        """``generate(..., graphs=True)`` records a decode step once and replays it: the policy's
        decode hooks must keep the decode-state contract (:mod:`kvpolicy.graphs`). On a CPU the
        recorded step is a traced stand-in that bakes host values and addresses as a CUDA graph does,
        so a breach either raises :class:`~kvpolicy.graphs.GraphContractError` naming it, or shows here
        as tokens that differ from eager decoding."""
        steps = 3 * NEW_TOKENS
        for policy in [kvpolicy_case.make_keep_all(), kvpolicy_case.make_budgeted(24)]:
            if policy is None:
                continue
            composed = kvpolicy.compose(cache=policy)
            kwargs = {"input_ids": kvpolicy_prompt, "policy": composed, "max_new_tokens": steps}
            eager = kvpolicy.generate(kvpolicy_model, None, **kwargs).token_ids
            replayed = kvpolicy.generate(kvpolicy_model, None, graphs=True, **kwargs).token_ids
            assert replayed == eager, (
                f"{policy!r}: graph-replayed decode differs from eager decode; state kept across decode "
                f"steps must be updated in place, and step-dependent tensor math must read "
                f"view.step_tensor (docs/authoring/decode-eviction.md)"
            )


__all__ = [
    "BUDGETS",
    "NEW_TOKENS",
    "PROMPT_LEN",
    "SHORT_PROMPTS",
    "ByteTokenizer",
    "CachePolicyConformance",
    "ConformanceCase",
    "default_expected_kv",
    "one_thread",
    "tiny_llama",
]
