"""kvpolicy's compression inside vLLM's engine, on the CPU (``docs/serving.md`` has the design).

Four pieces, installed by :func:`install` (the plugin calls it in every vLLM process):

* **the admission check** (:mod:`kvpolicy_vllm.admission`): a bad setting, or an engine that cannot
  compress, is vLLM's validation error (the server's 400) before the request reaches the engine;
* **the attention backend**: ``CPU_ATTN``'s class path is replaced, through vLLM's own backend
  registry, by :class:`KVPolicyCPUBackend`, the CPU backend whose attention, after a request's prefill
  (in the step of its last chunk, a policy asked for), lets the policy select per layer from the whole
  prompt and writes the kept entries to the request's first slots with vLLM's own cache writer;
* **one patched model-runner method** (vLLM 0.32.0 only, checked): ``GPUModelRunner._prepare_inputs``,
  which the CPU runner inherits, is wrapped so that after vLLM prepared a step, requests that dropped
  entries read only what they hold and write their new tokens after it (``seq_lens`` and
  ``slot_mapping``), their positions unchanged; the backend learns which requests compress in this
  step, and their block-table rows forget the tail blocks the scheduler gives back;
* **one patched scheduler method**: ``Scheduler.schedule`` is wrapped so that, in the step after a
  compressed request's prefill, its emptied tail blocks go back to vLLM's block pool, and its later
  blocks are counted from the entries it holds (:class:`HeldBlocks`, a view of the scheduler's KV cache
  coordinator): more requests fit.

Both sides know how many entries a request keeps without talking to each other:
:func:`~kvpolicy_vllm.servable.kept_count` (the policy's own selection on one synthetic layer of the
prompt's length) gives it, and the backend checks its selection against it.

A prompt vLLM prefills in chunks is selected from as a whole: the backend keeps each layer's queries,
keys and values of the chunks before the last (:class:`Prefill`) and selects in the last chunk's step.

Nothing changes for a request that asks for no policy. What it needs: prefix caching off (a compressed
request's blocks no longer hold the prefix their hash names, and they are rewritten in place) and a
model with one KV cache group of full attention (hybrid and sliding-window models are refused); the
admission check (:mod:`kvpolicy_vllm.admission`) refuses a compressed request otherwise, naming the
setting to change.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any

import torch
from kvpolicy.interfaces import Policy

from kvpolicy_vllm.paged import (
    blocks_for,
    compacted_metadata,
    kept_entries,
    request_slots,
    select_for_request,
)
from kvpolicy_vllm.servable import _cached_policy, kept_count, request_spec


@dataclass
class Prefill:
    """A compressed request's prefill while it runs (on the worker): the length it ends at (its prompt,
    or for a request preempted and recomputed its prompt and answer so far), and, when vLLM splits it
    into chunks, each layer's queries, keys and values of the chunks before the last, so the policy
    selects from the whole prompt exactly as it would from one step."""

    target: int
    spec: str
    chunks: dict[int, list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]] = field(default_factory=dict)


@dataclass
class Step:
    """What the backend needs of one engine step, by batch index: the prefills whose chunk it keeps for
    later (``save``), and those ending in this step, with their policy and the number of entries they
    drop (:func:`kept_count`'s), which the policy selects and compacts (``compress``)."""

    save: dict[int, Prefill] = field(default_factory=dict)
    compress: dict[int, tuple[str, Prefill, Policy, int]] = field(default_factory=dict)
    num_layers: int = 0


#: The step being run in this process (set by the patched ``_prepare_inputs``, read by the backend).
_STEP: Step | None = None


@dataclass
class RunnerState:
    """The model runner's per-request compression state, by request id (kept on the runner, beside
    vLLM's own per-request states, and forgotten when a request leaves): policy spec, entries dropped,
    prefill under way."""

    specs: dict[str, str | None] = field(default_factory=dict)
    dropped: dict[str, int] = field(default_factory=dict)
    prefills: dict[str, Prefill] = field(default_factory=dict)

    def forget_all_but(self, live: Any) -> None:
        for gone in [rid for rid in self.specs if rid not in live]:
            self.specs.pop(gone, None)
            self.dropped.pop(gone, None)
            self.prefills.pop(gone, None)


def _runner_state(runner: Any) -> RunnerState:
    if not hasattr(runner, "_kvpolicy"):
        runner._kvpolicy = RunnerState()
    return runner._kvpolicy


def _check_engine(rid: str, vllm_config: Any) -> None:
    """The admission check's verdict on the engine, again where compression happens: a request that
    reached the engine some other way fails here, named, rather than compressing wrongly."""
    from kvpolicy_vllm.admission import why_engine_cannot_compress

    why = why_engine_cannot_compress(vllm_config)
    if why:
        raise ValueError(f"request {rid} asks for kvpolicy compression, but {why}")


def _prepare_inputs(original: Any, runner: Any, scheduler_output: Any, num_scheduled_tokens: Any) -> Any:
    global _STEP
    mine = _runner_state(runner)
    mine.forget_all_but(runner.requests)
    result = original(runner, scheduler_output, num_scheduled_tokens)
    num_reqs = runner.input_batch.num_reqs
    req_ids = list(runner.input_batch.req_ids[:num_reqs])
    tables = runner.input_batch.block_table.block_tables
    step = Step(num_layers=runner.model_config.get_num_layers(runner.parallel_config))
    drops = [0] * num_reqs
    for b, rid in enumerate(req_ids):
        state = runner.requests[rid]
        if rid not in mine.specs:
            mine.specs[rid] = request_spec(getattr(state.sampling_params, "extra_args", None))
        spec = mine.specs[rid]
        if spec is None:
            continue
        computed, scheduled = int(runner.input_batch.num_computed_tokens_cpu[b]), int(num_scheduled_tokens[b])
        if computed == 0:  # a prefill from scratch: a new request, or one preempted and recomputed
            _check_engine(rid, runner.vllm_config)
            if len(tables) != 1:
                raise ValueError(
                    f"request {rid} asks for kvpolicy compression, but this model has {len(tables)} KV cache "
                    f"groups (sliding-window or hybrid layers); the vLLM integration compresses single-group models"
                )
            mine.dropped.pop(rid, None)
            mine.prefills[rid] = Prefill(state.num_prompt_tokens + len(state.output_token_ids), spec)
        prefill = mine.prefills.get(rid)
        if prefill is None:  # decoding: reads what it holds, writes after it
            drops[b] = mine.dropped.get(rid, 0)
            continue
        if computed + scheduled < prefill.target:
            step.save[b] = prefill
            continue
        del mine.prefills[rid]
        if computed + scheduled != prefill.target:  # the scheduler's HeldBlocks counts the same length
            raise RuntimeError(
                f"request {rid}: its prefill ends at {computed + scheduled} tokens, not the {prefill.target} "
                f"its prompt and answer so far make"
            )
        drop = prefill.target - kept_count(spec, prefill.target)
        if drop <= 0:
            continue
        step.compress[b] = (rid, prefill, _cached_policy(spec), drop)
        mine.dropped[rid] = drop
        # the scheduler gives the tail blocks back at its next step (HeldBlocks.shrink_pending): this row
        # and the request's block list forget them now, so the blocks it appends later land where it
        # counts them
        table, held = tables[0], blocks_for(prefill.target - drop, tables[0].block_size)
        table.num_blocks_per_row[b] = min(int(table.num_blocks_per_row[b]), held)
        del state.block_ids[0][held:]
    if any(drops):
        table = tables[0]
        starts = runner.query_start_loc.gpu[: num_reqs + 1]
        held, slots = compacted_metadata(
            runner.seq_lens[:num_reqs],
            starts,
            table.block_table.gpu[:num_reqs],
            torch.tensor(drops, device=runner.seq_lens.device),
            table.block_size,
        )
        runner.seq_lens[:num_reqs] = held.to(runner.seq_lens.dtype)
        table.slot_mapping.gpu[: slots.shape[0]] = slots.to(table.slot_mapping.gpu.dtype)
    _STEP = step
    return result


class HeldBlocks:
    """The scheduler's KV cache coordinator, seen through the entries each compressed request holds.

    vLLM's ``KVCacheManager`` sizes a request's blocks from its ``num_computed_tokens`` (its logical
    length, which positions need); a compressed request holds ``dropped`` fewer entries. This view
    subtracts them where the manager asks how many blocks a request needs or allocates them, gives the
    emptied tail blocks back to the pool once the prefill that compressed them has been scheduled
    (:meth:`shrink_pending`), and forgets a request when vLLM frees it (finished or preempted: a
    preempted request is prefilled and compressed again from scratch). Everything else is the
    coordinator's own.
    """

    def __init__(self, coordinator: Any) -> None:
        self._inner = coordinator
        self.dropped: dict[str, int] = {}
        self.prefills: dict[str, tuple[int, str]] = {}  # request id -> (length its prefill ends at, spec)
        self.pending: dict[str, tuple[int, int]] = {}  # request id -> (prefill length, entries dropped)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def get_num_blocks_to_allocate(self, request_id: str, num_tokens: int, *args: Any, **kwargs: Any) -> int:
        drop = self.dropped.get(request_id, 0)
        if drop and "num_tokens_main_model" in kwargs:
            kwargs["num_tokens_main_model"] -= drop
        return self._inner.get_num_blocks_to_allocate(request_id, num_tokens - drop, *args, **kwargs)

    def allocate_new_blocks(
        self, request_id: str, num_tokens: int, num_tokens_main_model: int, *args: Any, **kwargs: Any
    ) -> Any:
        drop = self.dropped.get(request_id, 0)
        return self._inner.allocate_new_blocks(
            request_id, num_tokens - drop, num_tokens_main_model - drop, *args, **kwargs
        )

    def free(self, request_id: str) -> None:
        self._forget(request_id)
        self._inner.free(request_id)

    def pop_blocks_for_free(self, request_id: str) -> Any:
        self._forget(request_id)
        return self._inner.pop_blocks_for_free(request_id)

    def _forget(self, request_id: str) -> None:
        self.dropped.pop(request_id, None)
        self.prefills.pop(request_id, None)
        self.pending.pop(request_id, None)

    def shrink_pending(self) -> None:
        """Give back the tail blocks of the requests whose compressed prefill has been scheduled.

        Safe before that prefill has run (async scheduling): a block given to another request is first
        written in a later step, and the worker runs steps in order."""
        from vllm.v1.core.single_type_kv_cache_manager import FullAttentionManager

        for rid, (length, drop) in self.pending.items():
            for manager in self._inner.single_type_managers:
                if type(manager) is not FullAttentionManager:
                    raise ValueError(
                        f"request {rid} asks for kvpolicy compression, but this model's KV cache has "
                        f"{type(manager).__name__} layers; the vLLM integration compresses full-attention models"
                    )
                blocks = manager.req_to_blocks[rid]
                held = blocks_for(length - drop, manager.block_size)
                tail = blocks[held:]
                del blocks[held:]
                manager.block_pool.free_blocks(reversed(tail))
            self.dropped[rid] = drop
        self.pending.clear()


def _schedule(original: Any, scheduler: Any, *args: Any, **kwargs: Any) -> Any:
    manager = scheduler.kv_cache_manager
    held = manager.coordinator
    if not isinstance(held, HeldBlocks):
        held = manager.coordinator = HeldBlocks(manager.coordinator)
    held.shrink_pending()
    output = original(scheduler, *args, **kwargs)
    for rid, count in output.num_scheduled_tokens.items():
        request = scheduler.requests[rid]
        if request.num_computed_tokens == count:  # a prefill from scratch (schedule() counted this step)
            spec = request_spec(getattr(request.sampling_params, "extra_args", None))
            if spec is None:
                continue
            _check_engine(rid, scheduler.vllm_config)
            held.prefills[rid] = (request.num_tokens, spec)
        target, spec = held.prefills.get(rid, (0, ""))
        if target and request.num_computed_tokens >= target:  # its last chunk is in this step
            del held.prefills[rid]
            drop = target - kept_count(spec, target)
            if drop > 0:
                held.pending[rid] = (target, drop)
    return output


@functools.cache
def _backend_classes() -> tuple[type, type]:
    from vllm import _custom_ops as ops
    from vllm.model_executor.models.utils import extract_layer_index
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend, CPUAttentionBackendImpl

    class KVPolicyCPUAttentionImpl(CPUAttentionBackendImpl):
        """vLLM's CPU attention, then, for requests whose prompt compresses in this step, the policy's
        selection written to their first slots."""

        def forward(
            self,
            layer: Any,
            query: torch.Tensor,
            key: torch.Tensor,
            value: torch.Tensor,
            *args: Any,
            **kwargs: Any,
        ) -> Any:
            out = super().forward(layer, query, key, value, *args, **kwargs)
            step, kv_cache, metadata = _STEP, args[0], args[1]
            if step is None or metadata is None or not (step.compress or step.save):
                return out
            index = extract_layer_index(layer.layer_name)
            starts = metadata.query_start_loc.tolist()
            for b, prefill in step.save.items():  # a chunk before the last: kept for the selection
                rows = slice(starts[b], starts[b + 1])
                prefill.chunks.setdefault(index, []).append(
                    (query[rows].clone(), key[rows].clone(), value[rows].clone())
                )
            if not step.compress:
                return out
            num_blocks, heads, block, _ = kv_cache.shape
            key_cache, value_cache = kv_cache.view(num_blocks, heads, 2 * block, -1).chunk(2, dim=2)
            for b, (rid, prefill, policy, expected) in step.compress.items():
                rows = slice(starts[b], starts[b + 1])
                earlier = prefill.chunks.pop(index, [])
                q, k, v = (
                    torch.cat([chunk[i] for chunk in earlier] + [now[rows]])
                    for i, now in enumerate((query, key, value))
                )
                keep = select_for_request(policy, index, step.num_layers, q, k, v, self.scale)
                if keep is None:
                    keep = torch.arange(k.shape[0], device=k.device).expand(k.shape[1], -1)
                if k.shape[0] - keep.shape[1] != expected:  # kept_count's promise, on which the blocks rest
                    raise RuntimeError(
                        f"request {rid}: {type(policy.cache).__name__} kept {keep.shape[1]} of {k.shape[0]} entries "
                        f"at layer {index}, not the {k.shape[0] - expected} its synthetic selection kept"
                    )
                kept_keys, kept_values = kept_entries(k, v, keep)
                slots = request_slots(metadata.block_table[b], keep.shape[1], block)
                ops.cpu_attn_reshape_and_cache(  # as vLLM's own do_kv_cache_update writes (fp8 caches too)
                    kept_keys,
                    kept_values,
                    key_cache,
                    value_cache,
                    slots,
                    layer.isa,
                    k_scale=layer._k_scale_float,
                    v_scale=layer._v_scale_float,
                    kv_cache_dtype=self.kv_cache_dtype,
                )
            return out

    class KVPolicyCPUBackend(CPUAttentionBackend):
        """vLLM's CPU attention backend with kvpolicy's compression after prefill."""

        @staticmethod
        def get_impl_cls() -> type:
            return KVPolicyCPUAttentionImpl

    return KVPolicyCPUBackend, KVPolicyCPUAttentionImpl


def __getattr__(name: str) -> Any:  # the backend classes, built on first use (they import vLLM)
    if name in ("KVPolicyCPUBackend", "KVPolicyCPUAttentionImpl"):
        backend, impl = _backend_classes()
        return backend if name == "KVPolicyCPUBackend" else impl
    raise AttributeError(name)


def _wrap(owner: Any, name: str, hook: Any) -> None:
    """Replace ``owner.name`` by ``hook(original, self, *args)``, once (a second install is a no-op); on a
    module, a function's first argument stands in for ``self``."""
    current = getattr(owner, name)
    if getattr(current, "_kvpolicy", False):
        return

    @functools.wraps(current)
    def wrapped(self: Any, *args: Any, **kwargs: Any) -> Any:
        return hook(current, self, *args, **kwargs)

    wrapped._kvpolicy = True  # type: ignore[attr-defined]
    setattr(owner, name, wrapped)


def install() -> None:
    """Register the backend and wrap vLLM's methods (once per process; vLLM 0.32.0 only: the methods'
    contracts are that release's, listed in ``docs/serving.md``): the three that compress, and the two
    that show a user what is served (:mod:`kvpolicy_vllm.server`)."""
    import sys

    from kvpolicy_vllm.version import check_vllm

    check_vllm()
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend
    from vllm.v1.core.sched.scheduler import Scheduler
    from vllm.v1.engine.input_processor import InputProcessor
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    from kvpolicy_vllm import server
    from kvpolicy_vllm.admission import _validate_params

    register_backend(AttentionBackendEnum.CPU_ATTN, f"{__name__}.KVPolicyCPUBackend")
    _wrap(InputProcessor, "_validate_params", _validate_params)
    _wrap(InputProcessor, "__init__", server._input_processor_init)
    _wrap(GPUModelRunner, "_prepare_inputs", _prepare_inputs)
    _wrap(Scheduler, "schedule", _schedule)
    # the API server's app builder: imported by every server entry point before vLLM loads plugins
    # (while it parses the command line); other processes (engine core, workers, offline) never build it
    app = sys.modules.get("vllm.entrypoints.launchers.app")
    if app is not None:
        _wrap(app, "init_entrypoints_middleware", server._init_entrypoints_middleware)
