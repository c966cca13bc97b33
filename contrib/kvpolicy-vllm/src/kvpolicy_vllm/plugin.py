"""The vLLM plugin (entry point group ``vllm.general_plugins``): vLLM loads it in each of its processes.

It installs kvpolicy's compression (:func:`kvpolicy_vllm.engine.install`) on vLLM's CPU platform. A
request without a ``kvpolicy`` setting is served exactly as vLLM serves it; on another platform a
request with one is refused (the compression runs in the CPU attention backend only, so far)."""

from __future__ import annotations


def register() -> None:
    from kvpolicy_vllm.engine import install
    from kvpolicy_vllm.servable import request_spec

    request_spec(None)  # a bad server-wide default (KVPOLICY_DEFAULT) stops vLLM at start-up, named
    install()
