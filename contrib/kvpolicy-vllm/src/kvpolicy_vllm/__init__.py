"""kvpolicy's cache policies inside vLLM (issue 20; ``docs/serving.md`` has the status).

Installing this package registers a vLLM plugin (entry point ``vllm.general_plugins``) that, on vLLM's
CPU platform, compresses each request that names a policy after its prefill and gives the freed blocks
back to vLLM's pool (:mod:`kvpolicy_vllm.engine`). A request names its policy through
``SamplingParams.extra_args`` (the OpenAI server's ``vllm_xargs``): ``{"kvpolicy": "snapkv:kv_budget=0.25"}``;
:func:`~kvpolicy_vllm.servable.servable_policy` says which policies vLLM can serve and why the others
cannot; :mod:`kvpolicy_vllm.version` pins the vLLM release.
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
