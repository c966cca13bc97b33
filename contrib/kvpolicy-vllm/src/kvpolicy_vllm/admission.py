"""Each request's ``kvpolicy`` setting checked where vLLM admits requests, so a bad one is a 400 naming
the value, never a crashed engine.

The check needs two things: the setting (:func:`~kvpolicy_vllm.servable.request_spec`: an unknown
policy, a bad value, a policy vLLM's cache cannot hold) and the engine's configuration (prefix caching
off, the CPU platform and V1 model runner, no speculative decoding or KV connector, a decoder whose
layers all attend in full), because a request
the engine cannot compress would otherwise fail inside the engine core, taking every other request
with it. vLLM's one per-request hook a package can register, a logits processor's ``validate_params``,
sees the sampling parameters only; so the check runs in a wrapped ``InputProcessor._validate_params``
(vLLM 0.32.0), which vLLM calls on every request, offline and in the server, with the engine's
configuration at hand, and whose ``VLLMValidationError`` the OpenAI-compatible server answers with 400.
"""

from __future__ import annotations

from typing import Any

from kvpolicy_vllm.servable import EXTRA_ARGS_KEY, NotServable, request_spec


def why_engine_cannot_compress(vllm_config: Any) -> str | None:
    """Why this engine cannot compress a request (``None``: it can), with the setting to change."""
    if vllm_config.cache_config.enable_prefix_caching:
        return (
            "compression rewrites a request's blocks in place, so it needs prefix caching off: start vLLM "
            "with enable_prefix_caching=False (--no-enable-prefix-caching)"
        )
    device = vllm_config.device_config.device_type
    if device != "cpu":
        return f"the vLLM integration compresses on vLLM's CPU platform only so far (this engine runs on {device})"
    if vllm_config.use_v2_model_runner:
        return (
            "the vLLM integration wraps the V1 model runner's _prepare_inputs, and this engine runs the V2 model "
            "runner: unset VLLM_USE_V2_MODEL_RUNNER"
        )
    if vllm_config.speculative_config is not None:
        return "speculative decoding's draft layers would read the compacted cache at their own positions: start vLLM without it"
    if vllm_config.kv_transfer_config is not None:
        return "a KV connector counts a request's blocks by its logical length: start vLLM without --kv-transfer-config"
    model = vllm_config.model_config
    if model.is_encoder_decoder:
        return "encoder-decoder models keep cross-attention caches the integration does not compress"
    if model.is_hybrid or model.get_sliding_window() is not None:
        return (
            "this model has sliding-window or non-attention layers (several KV cache groups); the vLLM "
            "integration compresses models whose layers all attend in full"
        )
    return None


def check_request(params: Any, vllm_config: Any) -> str | None:
    """The request's spec (``None``: no compression), or ``VLLMValidationError`` naming what is wrong."""
    from vllm.exceptions import VLLMValidationError

    extra_args = getattr(params, "extra_args", None)
    try:
        spec = request_spec(extra_args)
    except NotServable as exc:
        value = (extra_args or {}).get(EXTRA_ARGS_KEY)
        raise VLLMValidationError(str(exc), parameter=EXTRA_ARGS_KEY, value=value) from None
    if spec is None:
        return None
    why = why_engine_cannot_compress(vllm_config)
    if why:
        raise VLLMValidationError(f"{EXTRA_ARGS_KEY}={spec!r}: {why}", parameter=EXTRA_ARGS_KEY, value=spec)
    return spec


def _validate_params(original: Any, processor: Any, params: Any, *args: Any, **kwargs: Any) -> Any:
    result = original(processor, params, *args, **kwargs)
    check_request(params, processor.vllm_config)
    return result
