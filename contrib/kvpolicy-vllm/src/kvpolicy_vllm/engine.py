"""kvpolicy's compression inside vLLM's engine, on the CPU (an early version: see ``docs/serving.md``).

Two pieces, installed by :func:`install` (the plugin calls it in every vLLM process):

* **the attention backend**: ``CPU_ATTN``'s class path is replaced, through vLLM's own backend
  registry, by :class:`KVPolicyCPUBackend`, the CPU backend whose attention, after a request's prefill
  (its whole prompt in this step, a policy asked for), lets the policy select per layer and writes the
  kept entries to the request's first slots with vLLM's own cache writer;
* **one patched model-runner method** (vLLM 0.32.0 only, checked): ``GPUModelRunner._prepare_inputs``,
  which the CPU runner inherits, is wrapped so that after vLLM prepared a step, requests that dropped
  entries read only what they hold and write their new tokens after it (``seq_lens`` and
  ``slot_mapping``), their positions unchanged, and the backend learns which requests compress in this
  step. Nothing changes for a request that asks for no policy.

What it needs: prefix caching off (a compressed request's blocks no longer hold the prefix their hash
names, and they are rewritten in place) and each prompt prefilled in one step (chunked prefill off);
both are checked, with the setting to change in the error. What it does not do yet: give the freed
blocks back to vLLM's pool (the scheduler still sizes each request by its logical length), validate
settings in the API server (a bad setting fails in the engine), per-layer budgets (refused by
:func:`~kvpolicy_vllm.servable.why_not_servable`).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any

import torch
from kvpolicy.interfaces import Policy

from kvpolicy_vllm.paged import compacted_metadata, kept_entries, request_slots, select_for_request
from kvpolicy_vllm.servable import policy_for_request


@dataclass
class Step:
    """What the backend needs of one engine step: the requests whose prompt compresses in it (batch
    index -> request id and policy), and where each records the entries it dropped."""

    compress: dict[int, tuple[str, Policy]] = field(default_factory=dict)
    dropped: dict[str, int] = field(default_factory=dict)
    num_layers: int = 0


#: The step being run in this process (set by the patched ``_prepare_inputs``, read by the backend).
_STEP: Step | None = None


def _runner_state(runner: Any) -> tuple[dict[str, int], dict[str, Policy | None]]:
    """The model runner's per-request compression state: entries dropped and parsed policy, by request
    id (kept on the runner, beside vLLM's own per-request states)."""
    if not hasattr(runner, "_kvpolicy_dropped"):
        runner._kvpolicy_dropped = {}
        runner._kvpolicy_policies = {}
    return runner._kvpolicy_dropped, runner._kvpolicy_policies


def _prepare_inputs(original: Any, runner: Any, scheduler_output: Any, num_scheduled_tokens: Any) -> Any:
    global _STEP
    dropped, policies = _runner_state(runner)
    for gone in [rid for rid in policies if rid not in runner.requests]:
        policies.pop(gone, None)
        dropped.pop(gone, None)
    result = original(runner, scheduler_output, num_scheduled_tokens)
    num_reqs = runner.input_batch.num_reqs
    req_ids = list(runner.input_batch.req_ids[:num_reqs])
    step = Step(dropped=dropped, num_layers=runner.model_config.get_num_layers(runner.parallel_config))
    cpu = runner.device.type == "cpu"
    for b, rid in enumerate(req_ids):
        if rid not in policies:
            params = runner.requests[rid].sampling_params
            policies[rid] = policy_for_request(getattr(params, "extra_args", None))
        policy = policies[rid]
        if policy is None or rid in dropped:
            continue
        if runner.cache_config.enable_prefix_caching:
            raise ValueError(
                f"request {rid} asks for kvpolicy compression, which rewrites the request's blocks in place: "
                f"start vLLM with prefix caching off (enable_prefix_caching=False, --no-enable-prefix-caching)"
            )
        if not cpu:
            raise ValueError(
                f"request {rid} asks for kvpolicy compression, which runs on vLLM's CPU platform only so far "
                f"(this engine runs on {runner.device.type})"
            )
        state = runner.requests[rid]
        computed, scheduled = int(runner.input_batch.num_computed_tokens_cpu[b]), int(num_scheduled_tokens[b])
        if computed == 0 and scheduled >= state.num_prompt_tokens:
            step.compress[b] = (rid, policy)
        elif computed < state.num_prompt_tokens:
            raise ValueError(
                f"request {rid}: kvpolicy compresses a prompt prefilled in one step, but vLLM split this one "
                f"({state.num_prompt_tokens} tokens) into chunks; start vLLM with enable_chunked_prefill=False and "
                f"max_num_batched_tokens at least the longest prompt"
            )
    drops = [dropped.get(rid, 0) for rid in req_ids]
    if any(drops):
        table = runner.input_batch.block_table[0]
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
            for b, (rid, policy) in step.compress.items():
                rows = slice(starts[b], starts[b + 1])
                k, v = key[rows], value[rows]
                keep = select_for_request(policy, index, step.num_layers, query[rows], k, v, self.scale)
                if keep is None:
                    continue
                kept_keys, kept_values = kept_entries(k, v, keep)
                slots = request_slots(metadata.block_table[b], keep.shape[1], block)
                ops.cpu_attn_reshape_and_cache(
                    kept_keys, kept_values, key_cache, value_cache, slots, layer.isa
                )
                drop = k.shape[0] - keep.shape[1]
                if step.dropped.setdefault(rid, drop) != drop:  # servable_policy refuses per-layer budgets
                    raise ValueError(
                        f"request {rid}: {type(policy.cache).__name__} kept a different number of entries at layer "
                        f"{index}; vLLM's layers share one length per request"
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


def install() -> None:
    """Register the backend and wrap the runner method (once per process; vLLM 0.32.0 only)."""
    from kvpolicy_vllm.version import check_vllm

    check_vllm()
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    register_backend(AttentionBackendEnum.CPU_ATTN, f"{__name__}.KVPolicyCPUBackend")
    current = GPUModelRunner._prepare_inputs
    if getattr(current, "_kvpolicy", False):
        return

    @functools.wraps(current)
    def wrapped(self: Any, scheduler_output: Any, num_scheduled_tokens: Any) -> Any:
        return _prepare_inputs(current, self, scheduler_output, num_scheduled_tokens)

    wrapped._kvpolicy = True  # type: ignore[attr-defined]
    GPUModelRunner._prepare_inputs = wrapped  # the one patched vLLM method (docs/serving.md)
