"""What a user of vLLM's OpenAI-compatible server sees of the integration (``docs/serving.md``).

* **One start-up line** (:func:`announce`, from vLLM's ``InputProcessor``, which every front end builds
  once, before the engine core starts): the plugin is active, and which policy a request that names none
  is served under (``KVPOLICY_DEFAULT``, or full KV). A default this engine cannot compress (prefix
  caching on, another platform) stops the start-up there, naming the setting to change, instead of
  answering every request with a 400.
* **The policy that served a response**, in its ``x-kvpolicy`` header (the spec, or ``fullkv``), and
  counted in vLLM's ``/metrics`` as ``kvpolicy:requests_total{policy="..."}``
  (:class:`KVPolicyMiddleware`).
* **A top-level ``"kvpolicy"`` body field is a 400** naming ``vllm_xargs``: vLLM's request models accept
  unknown fields and ignore them (logged at debug level only), so without this check such a request would
  silently be served under the default.

The middleware is added to vLLM's app by the wrapped ``init_entrypoints_middleware`` (its reference in
``vllm.entrypoints.launchers.app``, the module whose ``build_app`` every server entry point calls), so it
is on for ``vllm serve`` and the modules behind it without a flag. It reads the request's body, which
vLLM then reads as usual, and derives the spec with the same function (:func:`request_spec`, from the
same ``vllm_xargs`` and the same inherited ``KVPOLICY_DEFAULT``) the admission check and the engine use.
"""

from __future__ import annotations

import functools
import json
from typing import Any

from kvpolicy_vllm.servable import DEFAULT_ENV, EXTRA_ARGS_KEY, NotServable, default_spec, request_spec

#: The response header that names the policy a request was served under (``fullkv``: none).
HEADER = "x-kvpolicy"
#: The Prometheus counter, exposed by vLLM's ``/metrics`` as ``kvpolicy:requests_total``.
METRIC = "kvpolicy:requests"
#: The label of requests served with no policy (vLLM's own full KV cache).
FULL_KV = "fullkv"
#: Distinct ``policy`` label values before the rest are counted as ``other`` (each spec string is one
#: series, and specs come from clients).
MAX_LABELS = 64
#: The endpoints whose body carries ``vllm_xargs`` (completions, chat, responses, Anthropic messages,
#: SageMaker's invocations, which routes to the first two).
SERVED_PATHS = ("/v1/completions", "/v1/chat/completions", "/v1/responses", "/v1/messages", "/invocations")

#: The logger under vLLM's, so the line is formatted and shown like vLLM's own.
LOGGER = "vllm.plugins.kvpolicy"


def served_label(spec: str | None) -> str:
    return spec if spec is not None else FULL_KV


def announce(vllm_config: Any) -> str:
    """Log the one line that says the plugin is active and what it serves by default (returned too);
    raise ``ValueError`` when ``KVPOLICY_DEFAULT`` names a policy this engine cannot compress."""
    import logging

    from kvpolicy_vllm.admission import why_engine_cannot_compress
    from kvpolicy_vllm.version import installed_vllm

    dist, version = installed_vllm() or ("vllm", "?")
    default, spec = default_spec(), request_spec(None)
    why = why_engine_cannot_compress(vllm_config)
    if spec is not None and why:
        raise ValueError(f"{DEFAULT_ENV}={default!r}: this engine cannot serve it: {why}")
    logger = logging.getLogger(LOGGER)
    if why:
        line = (
            f"kvpolicy-vllm is installed, but this engine cannot compress ({why}); requests naming a "
            f"policy in vllm_xargs are refused with a 400"
        )
        logger.warning(line)
        return line
    if spec is not None:
        served = f"under {spec} ({DEFAULT_ENV})"
    else:
        served = f"with full KV ({DEFAULT_ENV} {'is ' + repr(default) if default else 'unset'})"
    line = (
        f"kvpolicy-vllm active on {dist} {version}: requests that name no policy are served {served}; "
        f'a request picks one with "vllm_xargs": {{"{EXTRA_ARGS_KEY}": "<spec>"}} ("{FULL_KV}" opts out); '
        f"the server names the policy in each response's {HEADER} header and counts it in /metrics "
        f"({METRIC}_total)"
    )
    logger.info(line)
    return line


@functools.cache
def _counter() -> Any:
    from prometheus_client import Counter

    return Counter(
        METRIC,
        "Requests served by vLLM's OpenAI-compatible server, by the kvpolicy policy that served them "
        f"({FULL_KV}: none)",
        ["policy"],
    )


_labels: set[str] = set()


def count(label: str) -> None:
    """One more request served under ``label`` in :data:`METRIC`."""
    if label not in _labels:
        if len(_labels) >= MAX_LABELS:
            label = "other"
        else:
            _labels.add(label)
    _counter().labels(policy=label).inc()


def inspect_body(body: bytes) -> tuple[dict[str, Any] | None, str | None]:
    """``(error, label)`` for a request body: ``error`` is the 400's body when it has a top-level
    ``"kvpolicy"`` field; ``label`` is the policy it will be served under (``None`` when the body is not
    a JSON object or its setting is bad: vLLM's own checks answer those)."""
    try:
        data = json.loads(body)
    except ValueError:
        return None, None
    if not isinstance(data, dict):
        return None, None
    if EXTRA_ARGS_KEY in data:
        value = json.dumps(data[EXTRA_ARGS_KEY])
        message = (
            f'"{EXTRA_ARGS_KEY}" is not a request field: vLLM ignores unknown fields, so this request would be '
            f'served without it. Name the policy in vllm_xargs: {{"vllm_xargs": {{"{EXTRA_ARGS_KEY}": {value}}}}}'
        )
        error = {
            "error": {"message": message, "type": "BadRequestError", "param": EXTRA_ARGS_KEY, "code": 400}
        }
        return error, None
    xargs = data.get("vllm_xargs")
    if xargs is not None and not isinstance(xargs, dict):
        return None, None
    try:
        return None, served_label(request_spec(xargs))
    except NotServable:
        return None, None


class KVPolicyMiddleware:
    """ASGI middleware on vLLM's app: refuses a top-level ``"kvpolicy"`` field with a 400 naming
    ``vllm_xargs``, and names the policy a successful response was served under in its
    :data:`HEADER` header and in :data:`METRIC`."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if (
            scope["type"] != "http"
            or scope.get("method") != "POST"
            or not scope.get("path", "").endswith(SERVED_PATHS)
        ):
            await self.app(scope, receive, send)
            return
        messages, chunks = [], []
        while True:
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request":
                break
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        error, label = inspect_body(b"".join(chunks))
        if error is not None:
            payload = json.dumps(error).encode()
            await send(
                {
                    "type": "http.response.start",
                    "status": 400,
                    "headers": [
                        (b"content-type", b"application/json"),
                        (b"content-length", str(len(payload)).encode()),
                    ],
                }
            )
            await send({"type": "http.response.body", "body": payload})
            return

        async def replay() -> dict[str, Any]:
            return messages.pop(0) if messages else await receive()

        async def named(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start" and label is not None and message["status"] < 400:
                message = {
                    **message,
                    "headers": [*message.get("headers", []), (HEADER.encode(), label.encode())],
                }
                count(label)
            await send(message)

        await self.app(scope, replay, named)


def _init_entrypoints_middleware(original: Any, args: Any, app: Any, *rest: Any, **kwargs: Any) -> Any:
    # added before vLLM's own middleware, so it runs inside them (after the API key check and CORS)
    app.add_middleware(KVPolicyMiddleware)
    return original(args, app, *rest, **kwargs)


def _input_processor_init(original: Any, processor: Any, *args: Any, **kwargs: Any) -> None:
    original(processor, *args, **kwargs)
    announce(processor.vllm_config)  # an engine's front end builds one, before its engine core starts
