"""kvpolicy's compression inside vLLM's engine, on the CPU (``docs/serving.md`` has the design).

Four pieces, installed by :func:`install` (the plugin calls it in every vLLM process):

* **the admission check** (:mod:`kvpolicy_vllm.admission`): a bad setting, or an engine that cannot
  compress, is vLLM's validation error (the server's 400) before the request reaches the engine;
* **the attention backend**: ``CPU_ATTN``'s class path is replaced, through vLLM's own backend
  registry, by :class:`KVPolicyCPUBackend`, the CPU backend whose attention, after a request's prefill
  (its whole prompt in this step, a policy asked for), lets the policy select per layer and writes the
  kept entries to the request's first slots with vLLM's own cache writer;
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

Nothing changes for a request that asks for no policy. What it needs: prefix caching off (a compressed
request's blocks no longer hold the prefix their hash names, and they are rewritten in place) and each
prompt prefilled in one step (chunked prefill off); both are checked, with the setting to change in
the error; models with one KV cache group of full attention (hybrid and sliding-window models are
refused when a request asks for a policy).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any

import torch
from kvpolicy.interfaces import Policy

from kvpolicy_vllm.paged import compacted_metadata, kept_entries, request_slots, select_for_request
from kvpolicy_vllm.servable import _cached_policy, kept_count, request_spec


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclass
class Step:
    """What the backend needs of one engine step: the requests whose prompt compresses in it (batch
    index -> request id, policy and the number of entries it drops, :func:`kept_count`'s)."""

    compress: dict[int, tuple[str, Policy, int]] = field(default_factory=dict)
    num_layers: int = 0


#: The step being run in this process (set by the patched ``_prepare_inputs``, read by the backend).
_STEP: Step | None = None


def _runner_state(runner: Any) -> tuple[dict[str, int], dict[str, str | None]]:
    """The model runner's per-request compression state: entries dropped and policy spec, by request
    id (kept on the runner, beside vLLM's own per-request states)."""
    if not hasattr(runner, "_kvpolicy_dropped"):
        runner._kvpolicy_dropped = {}
        runner._kvpolicy_specs = {}
    return runner._kvpolicy_dropped, runner._kvpolicy_specs


def _check_engine(rid: str, vllm_config: Any) -> None:
    """The admission check's verdict on the engine, again where compression happens: a request that
    reached the engine some other way fails here, named, rather than compressing wrongly."""
    from kvpolicy_vllm.admission import why_engine_cannot_compress

    why = why_engine_cannot_compress(vllm_config)
    if why:
        raise ValueError(f"request {rid} asks for kvpolicy compression, but {why}")


def _prepare_inputs(original: Any, runner: Any, scheduler_output: Any, num_scheduled_tokens: Any) -> Any:
    global _STEP
    dropped, specs = _runner_state(runner)
    for gone in [rid for rid in specs if rid not in runner.requests]:
        specs.pop(gone, None)
        dropped.pop(gone, None)
    result = original(runner, scheduler_output, num_scheduled_tokens)
    num_reqs = runner.input_batch.num_reqs
    req_ids = list(runner.input_batch.req_ids[:num_reqs])
    tables = runner.input_batch.block_table.block_tables
    step = Step(num_layers=runner.model_config.get_num_layers(runner.parallel_config))
    drops = [0] * num_reqs
    for b, rid in enumerate(req_ids):
        state = runner.requests[rid]
        if rid not in specs:
            specs[rid] = request_spec(getattr(state.sampling_params, "extra_args", None))
        spec = specs[rid]
        computed, scheduled = int(runner.input_batch.num_computed_tokens_cpu[b]), int(num_scheduled_tokens[b])
        if spec is None:
            continue
        if computed > 0:
            drops[b] = dropped.get(rid, 0)
            if computed < state.num_prompt_tokens:
                raise ValueError(
                    f"request {rid}: kvpolicy compresses a prompt prefilled in one step, but vLLM split this one "
                    f"({state.num_prompt_tokens} tokens) into chunks; start vLLM with enable_chunked_prefill=False "
                    f"and max_num_batched_tokens at least the longest prompt"
                )
            continue
        # a prefill from scratch (a new request, or one preempted and recomputed): compress it
        _check_engine(rid, runner.vllm_config)
        if len(tables) != 1:
            raise ValueError(
                f"request {rid} asks for kvpolicy compression, but this model has {len(tables)} KV cache groups "
                f"(sliding-window or hybrid layers); the vLLM integration compresses single-group models"
            )
        if scheduled < state.num_prompt_tokens:
            raise ValueError(
                f"request {rid}: kvpolicy compresses a prompt prefilled in one step, but vLLM split this one "
                f"({state.num_prompt_tokens} tokens) into chunks; start vLLM with enable_chunked_prefill=False and "
                f"max_num_batched_tokens at least the longest prompt"
            )
        drop = scheduled - kept_count(spec, scheduled)
        dropped.pop(rid, None)
        if drop <= 0:
            continue
        step.compress[b] = (rid, _cached_policy(spec), drop)
        dropped[rid] = drop
        # the scheduler gives the tail blocks back at its next step (HeldBlocks.shrink): this row and the
        # request's block list forget them now, so the blocks it appends later land where it counts them
        table, held = tables[0], _cdiv(scheduled - drop, tables[0].block_size)
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
                held = _cdiv(length - drop, manager.block_size)
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
        if request.num_computed_tokens != count:  # not a prefill from scratch (updated by schedule())
            continue
        spec = request_spec(getattr(request.sampling_params, "extra_args", None))
        if spec is None:
            continue
        _check_engine(rid, scheduler.vllm_config)
        drop = count - kept_count(spec, count) if count >= request.num_prompt_tokens else 0
        if drop > 0:
            held.pending[rid] = (count, drop)
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
            if step is None or not step.compress or metadata is None:
                return out
            num_blocks, heads, block, _ = kv_cache.shape
            key_cache, value_cache = kv_cache.view(num_blocks, heads, 2 * block, -1).chunk(2, dim=2)
            index = extract_layer_index(layer.layer_name)
            starts = metadata.query_start_loc.tolist()
            for b, (rid, policy, expected) in step.compress.items():
                rows = slice(starts[b], starts[b + 1])
                k, v = key[rows], value[rows]
                keep = select_for_request(policy, index, step.num_layers, query[rows], k, v, self.scale)
                if keep is None:
                    keep = torch.arange(k.shape[0], device=k.device).expand(k.shape[1], -1)
                kept_keys, kept_values = kept_entries(k, v, keep)
                slots = request_slots(metadata.block_table[b], keep.shape[1], block)
                ops.cpu_attn_reshape_and_cache(
                    kept_keys, kept_values, key_cache, value_cache, slots, layer.isa
                )
                if k.shape[0] - keep.shape[1] != expected:  # kept_count's promise, on which the blocks rest
                    raise RuntimeError(
                        f"request {rid}: {type(policy.cache).__name__} kept {keep.shape[1]} of {k.shape[0]} entries "
                        f"at layer {index}, not the {k.shape[0] - expected} its synthetic selection kept"
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


def _wrap(cls: type, name: str, hook: Any) -> None:
    """Replace ``cls.name`` by ``hook(original, self, *args)``, once (a second install is a no-op)."""
    current = getattr(cls, name)
    if getattr(current, "_kvpolicy", False):
        return

    @functools.wraps(current)
    def wrapped(self: Any, *args: Any, **kwargs: Any) -> Any:
        return hook(current, self, *args, **kwargs)

    wrapped._kvpolicy = True  # type: ignore[attr-defined]
    setattr(cls, name, wrapped)


def install() -> None:
    """Register the backend and wrap the three vLLM methods (once per process; vLLM 0.32.0 only: the
    methods' contracts are that release's, listed in ``docs/serving.md``)."""
    from kvpolicy_vllm.version import check_vllm

    check_vllm()
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend
    from vllm.v1.core.sched.scheduler import Scheduler
    from vllm.v1.engine.input_processor import InputProcessor
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    from kvpolicy_vllm.admission import _validate_params

    register_backend(AttentionBackendEnum.CPU_ATTN, f"{__name__}.KVPolicyCPUBackend")
    _wrap(InputProcessor, "_validate_params", _validate_params)
    _wrap(GPUModelRunner, "_prepare_inputs", _prepare_inputs)
    _wrap(Scheduler, "schedule", _schedule)
