"""Memory returns when a request ends, by reference counting alone (issue 27, item 5).

Every test here runs with the cyclic garbage collector off: a batch, its cache's tensors (the KV
pools) and its recorded decode graphs must be freed as soon as the last reference to the batch goes,
as ``kvpolicy bench`` (which never collects) needs at long context on a GPU. A request state refers to
its batch weakly (the batch owns its requests), so there is no cycle between them.
"""

from __future__ import annotations

import contextlib
import copy
import gc
import weakref
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from conftest import TINY_OPTIONS, round_machine, tiny_llama

import kvpolicy
from kvpolicy.generation import Prefill
from kvpolicy.state import Batch, RequestState

MACHINE = round_machine()


POLICIES = {
    "fullkv": {},
    "snapkv": TINY_OPTIONS["snapkv"],
    "fastkv": TINY_OPTIONS["fastkv"],
    "h2o": {**TINY_OPTIONS["h2o"], "evict_during_decode": True},
}


@pytest.fixture(scope="module")
def model():
    return tiny_llama()


@contextlib.contextmanager
def no_gc() -> Iterator[None]:
    """The cyclic collector off (after one collection, so earlier tests' garbage is gone)."""
    gc.collect()
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def _tensors(value: Any, out: list[torch.Tensor]) -> None:
    if isinstance(value, torch.Tensor):
        out.append(value)
    elif isinstance(value, dict):
        for item in value.values():
            _tensors(item, out)
    elif isinstance(value, (list, tuple)):
        for item in value:
            _tensors(item, out)


class Spy:
    """Weak references to every batch made (by a prefill, a join or a deep copy), to the tensors it
    holds (cache layers, positions, flags, the policies' scratch: taken when it is made and again when
    its decode ends, after any growth) and to its recorded decode graphs."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.batches: list[weakref.ref[Batch]] = []
        self.tensors: list[tuple[str, weakref.ref[torch.Tensor]]] = []
        self.graphs: list[weakref.ref[Any]] = []
        self.pools = 0  # KV pools seen
        post_init, raise_deferred = Batch.__post_init__, Batch.raise_deferred
        deepcopy = getattr(Batch, "__deepcopy__", None)
        spy = self

        def made(batch: Batch) -> None:
            post_init(batch)
            spy.saw(batch)

        def copied(batch: Batch, memo: dict[int, Any]) -> Batch:
            assert deepcopy is not None
            new = deepcopy(batch, memo)
            spy.saw(new)
            return new

        def ended(batch: Batch, policy: Any) -> None:
            spy.saw(batch)
            raise_deferred(batch, policy)

        monkeypatch.setattr(Batch, "__post_init__", made)
        if deepcopy is not None:
            monkeypatch.setattr(Batch, "__deepcopy__", copied)
        monkeypatch.setattr(Batch, "raise_deferred", ended)

    def saw(self, batch: Batch) -> None:
        if not any(ref() is batch for ref in self.batches):
            self.batches.append(weakref.ref(batch))
        named: list[tuple[str, torch.Tensor]] = []
        for i, layer in enumerate(batch.cache.layers):
            for name, value in vars(layer).items():
                if isinstance(value, torch.Tensor):
                    named.append((f"cache layer {i} {name}", value))
                    self.pools += name in ("k_pool", "v_pool", "_v_pool")
        for name in ("next_positions", "step_counter", "flags"):
            named.append((name, getattr(batch, name)))
        found: list[torch.Tensor] = []
        _tensors(batch._scratch, found)
        for state in batch.states:
            _tensors(state._scratch, found)
        named += [("policy scratch", t) for t in found]
        self.tensors += [(name, weakref.ref(t)) for name, t in named]
        if batch.graphs is not None and not any(ref() is batch.graphs for ref in self.graphs):
            self.graphs.append(weakref.ref(batch.graphs))

    def alive(self) -> list[str]:
        """What is still alive of what was seen, in words (empty: everything was freed)."""
        out = [f"batch {i}" for i, ref in enumerate(self.batches) if ref() is not None]
        out += [f"recorded graphs {i}" for i, ref in enumerate(self.graphs) if ref() is not None]
        out += sorted({name for name, ref in self.tensors if ref() is not None})
        return out


def _prompts(n: int) -> list[list[int]]:
    return [[(7 * i + 3 * j + 1) % 128 for i in range(60 - 9 * j)] for j in range(n)]


def _freed(spy: Spy, graphs: bool) -> None:
    """Everything the spy saw is freed: the batch, its cache tensors and, with ``graphs``, its recorded
    graphs (on the CPU stand-in, the tensors a traced step holds as constants are let go of when its
    recordings are dropped, so the fx module's own reference cycle does not keep the pools)."""
    assert spy.batches and spy.pools, "the spy saw no batch"
    assert spy.alive() == []


@pytest.mark.parametrize("graphs", [False, True], ids=["eager", "graphs"])
@pytest.mark.parametrize("rows", [1, 2])
@pytest.mark.parametrize("name", list(POLICIES))
def test_generate_frees_the_batch_without_gc(model, monkeypatch, name, rows, graphs):
    spy = Spy(monkeypatch)
    policy = kvpolicy.get_policy(name, **POLICIES[name])
    prompts = _prompts(rows)
    with no_gc():
        out = kvpolicy.generate(
            model,
            None,
            input_ids=prompts if rows > 1 else prompts[0],
            policy=policy,
            max_new_tokens=12,
            graphs=graphs,
        )
        if graphs:
            assert spy.graphs, "the graph path recorded nothing"
        # nothing the outputs hold keeps the batch: it went when generate returned
        assert all(ref() is None for ref in spy.batches)
        del out
        _freed(spy, graphs)


def test_each_chunk_of_a_batched_generate_is_freed_before_the_next_prefill(model, monkeypatch):
    """``batch_size=1`` over three prompts: when a chunk's batch is made, every earlier chunk's is gone
    (no two caches held at once)."""
    spy = Spy(monkeypatch)
    made = Batch.__post_init__
    earlier_alive: list[int] = []

    def check(batch: Batch) -> None:
        earlier_alive.append(sum(ref() is not None for ref in spy.batches))
        made(batch)

    monkeypatch.setattr(Batch, "__post_init__", check)
    with no_gc():
        kvpolicy.generate(
            model,
            None,
            input_ids=_prompts(3),
            policy=kvpolicy.get_policy("snapkv", kv_budget=20),
            batch_size=1,
        )
        assert earlier_alive == [0, 0, 0]
        _freed(spy, False)


@pytest.mark.parametrize("graphs", [False, True], ids=["eager", "graphs"])
def test_compress_once_frees_the_context_and_its_working_copy(model, monkeypatch, graphs):
    spy = Spy(monkeypatch)
    policy = kvpolicy.get_policy("snapkv", kv_budget=20)
    with no_gc():
        answers = kvpolicy.generate(
            model,
            None,
            context_ids=_prompts(1)[0],
            question_ids=[[5, 6, 7], [8, 9]],
            policy=policy,
            max_new_tokens=6,
            graphs=graphs,
        )
        assert len(answers) == 2 and len(spy.batches) == 2  # the prefill's and the working copy
        del answers
        _freed(spy, graphs)


def test_a_request_state_refers_to_its_batch_weakly(model):
    policy = kvpolicy.get_policy("snapkv", kv_budget=20)
    with no_gc():
        pre = kvpolicy.prefill(model, _prompts(2), policy, reserve=4)
        states = pre.states
        assert [s.batch for s in states] == [pre.batch, pre.batch] and states[1].cache is pre.cache
        pool = weakref.ref(pre.cache.layers[0].k_pool)
        # a deep copy of the batch (compress once, answer many) has its own states, pointing at it
        twin = copy.deepcopy(pre.batch)
        assert all(s.batch is twin for s in twin.states) and twin.states[0] is not states[0]
        assert twin.cache.layers[0].k_pool.data_ptr() != pool().data_ptr()  # type: ignore[union-attr]
        # a request copied alone has no batch; a shallow copy shares its batch
        alone = copy.deepcopy(states[0])
        assert alone.batch is None and alone.prompt_len == states[0].prompt_len
        assert copy.copy(states[0]).batch is pre.batch
        del twin
        # the states alone do not keep the batch: dropping the prefill frees its cache
        del pre
        assert pool() is None and states[0].batch is None
        with pytest.raises(RuntimeError, match="batch was freed"):
            states[0].cache  # noqa: B018
    with pytest.raises(RuntimeError, match="no cache yet"):
        RequestState(10, 4).cache  # noqa: B018


def test_a_batch_points_its_requests_at_itself(model):
    states = [RequestState(5, 4, index=i) for i in range(2)]
    pre = kvpolicy.prefill(model, [1, 2, 3, 4, 5], "fullkv")
    batch = Batch(states, pre.cache, pre.batch.next_positions.clone())
    assert all(s.batch is batch for s in states) and batch.size == 2
    kept = Prefill(logits=pre.logits, batch=batch, seconds=0.0)
    assert kept.state is states[0]


def test_benchmark_keeps_no_batch_across_runs(model, monkeypatch):
    """``kvpolicy bench``: when each run is reported, the batches of every run so far are freed (the
    bench never collects garbage)."""
    from kvpolicy.bench.runner import benchmark

    spy = Spy(monkeypatch)
    ids = torch.randint(0, 128, (2, 80), generator=torch.Generator().manual_seed(0))
    seen: list[tuple[str, list[str]]] = []
    policies = {name: kvpolicy.get_policy(name, **POLICIES[name]) for name in ("snapkv", "h2o")}
    with no_gc():
        rows = benchmark(
            model,
            {80: ids, 60: ids[:, :60]},
            policies,
            gen=4,
            repeats=1,
            warmup=1,
            machine=MACHINE,
            on_sample=lambda length, variant, rep, sample: seen.append((variant, spy.alive())),
        )
        assert len(rows) == 2 * 4 and len(seen) == 2 * 2 * 4
        assert [alive for _, alive in seen] == [[]] * len(seen), seen
        _freed(spy, False)


def test_throughput_runs_free_their_batches(model, monkeypatch, tmp_path):
    """The throughput bench: a run's joined batch (and its sub-batches, prefilled 2 at a time) is freed
    when the run returns, before the bench's own collection between runs."""
    from kvpolicy.bench import throughput as tp

    spy = Spy(monkeypatch)
    after: list[list[str]] = []

    def run(*args: Any, **kwargs: Any) -> tp.Run:
        result = tp._run(*args, **kwargs)
        after.append(spy.alive())
        return result

    ids = torch.randint(0, 128, (1, 80), generator=torch.Generator().manual_seed(1))
    with no_gc():
        for prefill_batch in (None, 2):
            cells = tp.throughput(
                model,
                {80: ids},
                {"snapkv": kvpolicy.get_policy("snapkv", kv_budget=20)},
                [3],
                gen=3,
                repeats=1,
                warmup=0,
                memory_gib=1.0,
                prefill_batch=prefill_batch,
                machine=MACHINE,
                run=run,
            )
            assert all(c.status == "ok" and c.batch == 3 for c in cells)
    assert len(after) == 4 and after == [[]] * 4, after
