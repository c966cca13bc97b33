"""kvpolicy's cache policies inside vLLM (issue 20, in progress).

What works so far: which policies vLLM can serve and why the others cannot
(:func:`~kvpolicy_vllm.servable.servable_policy`), the per-request setting as vLLM carries it
(``SamplingParams.extra_args`` / the OpenAI server's ``vllm_xargs``: ``{"kvpolicy": "snapkv:kv_budget=0.25"}``),
the pinned vLLM release (:mod:`kvpolicy_vllm.version`), the compression step's building blocks
(:mod:`kvpolicy_vllm.paged`), and the test harness that runs vLLM's CPU build on the embedded model. The compression inside vLLM's engine is not there yet: this package
registers no vLLM plugin, so installing it changes nothing in vLLM (``docs/serving.md`` has the design
and the status).
"""

from kvpolicy_vllm.servable import EXTRA_ARGS_KEY, NotServable, policy_for_request, servable_policy
from kvpolicy_vllm.version import PINNED_VLLM, check_vllm

__all__ = [
    "EXTRA_ARGS_KEY",
    "PINNED_VLLM",
    "NotServable",
    "check_vllm",
    "policy_for_request",
    "servable_policy",
]
