"""The server middleware (``kvpolicy_vllm.server``) on its own, without vLLM: the header a response gets,
the 400 for a top-level ``"kvpolicy"`` field, the body vLLM then reads, and the counted labels. The
running server is tested in ``test_vllm_cpu.py`` (docs/serving.md's quick start)."""

from __future__ import annotations

import asyncio
import json

import pytest

from kvpolicy_vllm import server


def _call(body, path="/v1/completions", status=200, method="POST", chunks=2):
    """Run the middleware around an app that reads the whole body and answers ``status``: (what the
    client got, the body the app read)."""
    raw = json.dumps(body).encode() if not isinstance(body, bytes) else body
    cut = len(raw) // chunks
    incoming = [
        {"type": "http.request", "body": raw[:cut], "more_body": True},
        {"type": "http.request", "body": raw[cut:], "more_body": False},
    ]
    sent, seen = [], []

    async def receive():
        return incoming.pop(0) if incoming else {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    async def app(scope, receive, send):
        more = True
        while more:
            message = await receive()
            seen.append(message.get("body", b""))
            more = message.get("more_body", False)
        await send({"type": "http.response.start", "status": status, "headers": [(b"content-type", b"x")]})
        await send({"type": "http.response.body", "body": b"ok"})

    scope = {"type": "http", "method": method, "path": path}
    asyncio.run(server.KVPolicyMiddleware(app)(scope, receive, send))
    return sent, b"".join(seen)


@pytest.fixture
def counted(monkeypatch):
    labels = []
    monkeypatch.setattr(server, "count", labels.append)
    monkeypatch.delenv("KVPOLICY_DEFAULT", raising=False)
    return labels


def _header(sent):
    return dict(sent[0]["headers"]).get(b"x-kvpolicy")


def test_a_response_names_the_policy_that_served_it_and_vllm_reads_the_body_unchanged(counted, monkeypatch):
    body = {"prompt": "x" * 1000, "vllm_xargs": {"kvpolicy": "snapkv:kv_budget=0.25"}}
    sent, seen = _call(body)
    assert json.loads(seen) == body
    assert _header(sent) == b"snapkv:kv_budget=0.25" and counted == ["snapkv:kv_budget=0.25"]
    sent, _ = _call({"prompt": "x"}, path="/v1/chat/completions")
    assert _header(sent) == b"fullkv"
    monkeypatch.setenv("KVPOLICY_DEFAULT", "streamingllm:kv_budget=0.5")
    sent, _ = _call({"prompt": "x"})
    assert _header(sent) == b"streamingllm:kv_budget=0.5"
    sent, _ = _call({"prompt": "x", "vllm_xargs": {"kvpolicy": "none"}})
    assert _header(sent) == b"fullkv"
    assert counted == ["snapkv:kv_budget=0.25", "fullkv", "streamingllm:kv_budget=0.5", "fullkv"]


def test_errors_other_requests_and_bad_settings_get_no_header(counted):
    # vLLM's own 400 (here the admission check's, for a bad setting): nothing was served
    sent, _ = _call({"vllm_xargs": {"kvpolicy": "snapkv"}}, status=400)
    assert _header(sent) is None
    sent, _ = _call({"vllm_xargs": {"kvpolicy": "snapkv:kv_budget=-1"}})
    assert _header(sent) is None
    sent, _ = _call({"input": "x"}, path="/v1/embeddings")
    assert _header(sent) is None
    sent, seen = _call(b"not json")
    assert _header(sent) is None and seen == b"not json"
    assert counted == []


def test_a_top_level_kvpolicy_field_is_a_400_naming_vllm_xargs(counted):
    sent, seen = _call({"prompt": "x", "kvpolicy": "snapkv:kv_budget=0.25"})
    assert sent[0]["status"] == 400 and seen == b""  # vLLM never sees the request
    error = json.loads(sent[1]["body"])["error"]
    assert error["param"] == "kvpolicy" and error["code"] == 400
    assert '{"vllm_xargs": {"kvpolicy": "snapkv:kv_budget=0.25"}}' in error["message"]
    assert counted == []


def test_the_metric_keeps_a_bounded_number_of_policy_labels(monkeypatch):
    class Counter:
        def __init__(self):
            self.labels_seen = []

        def labels(self, policy):
            self.labels_seen.append(policy)
            return self

        def inc(self):
            pass

    counter = Counter()
    monkeypatch.setattr(server, "_counter", lambda: counter)
    monkeypatch.setattr(server, "_labels", set())
    for i in range(server.MAX_LABELS + 2):
        server.count(f"snapkv:kv_budget={i}")
    server.count("snapkv:kv_budget=0")
    assert counter.labels_seen[-3:] == ["other", "other", "snapkv:kv_budget=0"]


def test_the_readmes_server_command_is_the_documented_quick_start():
    """The README repeats docs/serving.md's quick start, which test_vllm_cpu.py runs as written: the
    two stay the same text."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[3]
    docs, readme = (root / "docs" / "serving.md").read_text(), (root / "README.md").read_text()
    quickstart = re.search(r"```bash\n(.*?)```", docs[docs.index("<!-- serve-quickstart") :], re.S).group(1)
    serving = readme[readme.index("## Serving with vLLM") :]
    assert re.search(r"```bash\n(.*?)```", serving, re.S).group(1) == quickstart
