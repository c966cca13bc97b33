"""The per-request setting checked where vLLM admits a request, so a bad one is a 400, not a crash.

vLLM's only per-request validation hook that a package can register is a logits processor's
``validate_params`` (entry point group ``vllm.logits_processors``): vLLM's ``InputProcessor`` runs it on
every request's ``SamplingParams`` before the request reaches the engine, and turns the ``ValueError`` it
raises into a ``VLLMValidationError``, which the OpenAI-compatible server answers with HTTP 400. So this
logits processor changes no logits (``apply`` returns them as they are, and it declares itself
argmax-invariant, so greedy sampling skips it): it is there for its check, which parses the request's
``kvpolicy`` setting (or the server-wide default) exactly as the engine will.
"""

from __future__ import annotations

from typing import Any

import torch
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor

from kvpolicy_vllm.servable import request_spec


class KVPolicySettings(LogitsProcessor):
    """Checks each request's ``kvpolicy`` setting at admission; leaves the logits alone."""

    @classmethod
    def validate_params(cls, sampling_params: Any) -> None:
        request_spec(getattr(sampling_params, "extra_args", None))  # NotServable is a ValueError

    def __init__(self, vllm_config: Any, device: torch.device, is_pin_memory: bool) -> None:
        pass

    def is_argmax_invariant(self) -> bool:
        return True

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        pass

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        return logits
