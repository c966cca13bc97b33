"""vLLM's CPU build on the embedded model (SmolLM2-135M-Instruct, the folder kvpolicy converts and
caches): the baseline every compressed-serving test compares against. Runs where vLLM is installed
(``make test-vllm`` builds that venv); skipped elsewhere.

vLLM's own greedy output equals kvpolicy's full-KV greedy output on needle prompts, token for token, so
a difference under a policy is the policy's, not the two stacks'; and requests served under a policy
(``extra_args={"kvpolicy": ...}``, the plugin installed) give exactly ``kvpolicy.generate``'s tokens
under the same policy, in one batch with requests that ask for none.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

vllm = pytest.importorskip("vllm")

from kvpolicy_vllm import check_vllm  # noqa: E402

LENGTHS = (1000, 2000)
DEPTHS = (0.1, 0.5, 0.9)
NEW = 16


@pytest.fixture(scope="module")
def needle_prompts():
    from kvpolicy.eval import needle
    from kvpolicy.models import embedded_model_dir
    from transformers import AutoTokenizer

    path = embedded_model_dir()
    tokenizer = AutoTokenizer.from_pretrained(path)
    haystack = needle.load_haystack(needle.find_haystack_dir())
    prompts = [
        needle.build_sample(tokenizer, length, depth, haystack).input_ids
        for length in LENGTHS
        for depth in DEPTHS
    ]
    return path, prompts


def _engine(path: Path, **options: object) -> object:
    """vLLM's engine on the embedded model, in this process, with ``options`` (``kv_cache_dtype``)."""
    check_vllm()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB: plenty for a 135M model's prompts
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine in this process
    # no prefix caching (what kvpolicy's compression needs); prompts prefilled in chunks of at most 512
    # tokens, so a 2,000-token prompt takes four steps and the policy selects from all of them
    return vllm.LLM(
        model=str(path),
        dtype="float32",
        max_model_len=4096,
        enable_chunked_prefill=True,
        max_num_batched_tokens=512,
        enable_prefix_caching=False,
        enforce_eager=True,
        seed=0,
        **options,
    )


@pytest.fixture(scope="module")
def llm(needle_prompts):
    path, _ = needle_prompts
    return _engine(path)


def test_vllm_greedy_equals_kvpolicy_full_kv(llm, needle_prompts):
    import kvpolicy
    from kvpolicy.models import load_model

    _, prompts = needle_prompts
    params = vllm.SamplingParams(max_tokens=NEW, temperature=0.0)
    served = llm.generate([vllm.TokensPrompt(prompt_token_ids=p) for p in prompts], params)
    model, tokenizer = load_model()
    for prompt, out in zip(prompts, served, strict=True):
        ours = kvpolicy.generate(model, tokenizer, input_ids=prompt, policy="fullkv", max_new_tokens=NEW)
        assert list(out.outputs[0].token_ids) == ours.token_ids


def test_a_keep_all_policy_is_vllms_own_greedy_output(llm, needle_prompts):
    """A policy whose budget holds the whole prompt keeps every entry: the request is served as vLLM
    serves it (no compaction, no freed blocks), token for token."""
    _, prompts = needle_prompts
    batch = [vllm.TokensPrompt(prompt_token_ids=p) for p in prompts[:3]]
    plain = llm.generate(batch, vllm.SamplingParams(max_tokens=NEW, temperature=0.0))
    kept = llm.generate(
        batch,
        vllm.SamplingParams(
            max_tokens=NEW, temperature=0.0, extra_args={"kvpolicy": "snapkv:kv_budget=100000"}
        ),
    )
    assert [o.outputs[0].token_ids for o in kept] == [o.outputs[0].token_ids for o in plain]


def _ours(prompts, specs):
    """``kvpolicy.generate``'s greedy tokens for each prompt under its spec (``None``: full KV)."""
    import kvpolicy
    from kvpolicy.models import load_model

    from kvpolicy_vllm import servable_policy

    model, tokenizer = load_model()
    return [
        kvpolicy.generate(
            model, tokenizer, input_ids=p, policy=servable_policy(s) if s else "fullkv", max_new_tokens=NEW
        ).token_ids
        for p, s in zip(prompts, specs, strict=True)
    ]


def test_requests_under_a_policy_get_kvpolicys_tokens_beside_requests_without(llm, needle_prompts):
    """One batch mixing SnapKV at a quarter of the prompt, StreamingLLM and no policy: each request gets
    the tokens kvpolicy gives it under its policy (and the compressed ones differ from full KV somewhere,
    so the compression really ran)."""
    _, prompts = needle_prompts
    specs = ["snapkv:kv_budget=0.25", None, "streamingllm:kv_budget=0.25"] * 2
    params = [
        vllm.SamplingParams(max_tokens=NEW, temperature=0.0, extra_args={"kvpolicy": s} if s else None)
        for s in specs
    ]
    served = llm.generate([vllm.TokensPrompt(prompt_token_ids=p) for p in prompts], params)
    got = [list(out.outputs[0].token_ids) for out in served]
    assert got == _ours(prompts, specs)
    assert got != _ours(prompts, [None] * len(prompts))


def test_compacted_entries_written_by_vllm_attend_as_the_kept_entries():
    """The compression step against vLLM's own CPU cache writer and attention kernel: a request's
    prefill keys and values, SnapKV's selection, the kept entries written as tokens to the request's
    first slots (each KV head its own entries), the next token written where the compacted metadata
    says; then a decode query attends with vLLM's kernel exactly as over the kept entries and the new
    one (torch reference, per head)."""
    import kvpolicy
    import torch
    from vllm import _custom_ops as ops
    from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

    from kvpolicy_vllm.paged import compacted_metadata, kept_entries, request_slots, select_for_request

    heads, q_heads, dim, block, tokens = 2, 6, 64, 16, 45
    gen = torch.Generator().manual_seed(0)
    keys, values = (
        torch.randn(tokens, heads, dim, generator=gen),
        torch.randn(tokens, heads, dim, generator=gen),
    )
    query = torch.randn(tokens, q_heads, dim, generator=gen)
    scale = dim**-0.5
    keep = select_for_request(kvpolicy.get_policy("snapkv", kv_budget=20), 0, 2, query, keys, values, scale)
    assert keep is not None and keep.shape == (heads, 20) and not torch.equal(keep[0], keep[1])

    isa = _get_attn_isa(torch.float32, block, dim)
    cache = torch.zeros(8, heads, block, 2 * dim)  # vLLM's CPU layout: (blocks, H_kv, block_size, 2 * d)
    key_cache, value_cache = cache.view(8, heads, 2 * block, dim).chunk(2, dim=2)
    blocks = torch.tensor([5, 2, 6], dtype=torch.int32)
    kept_keys, kept_values = kept_entries(keys, values, keep)
    ops.cpu_attn_reshape_and_cache(
        kept_keys, kept_values, key_cache, value_cache, request_slots(blocks, 20, block), isa
    )

    # the next token, at logical position 45: the metadata reads 21 held entries and writes at the 21st
    new_key, new_value = torch.randn(1, heads, dim, generator=gen), torch.randn(1, heads, dim, generator=gen)
    start = torch.tensor([0, 1], dtype=torch.int32)
    held, slot = compacted_metadata(
        torch.tensor([tokens + 1]), start, blocks[None], torch.tensor([tokens - 20]), block
    )
    ops.cpu_attn_reshape_and_cache(new_key, new_value, key_cache, value_cache, slot, isa)
    seq_lens = held.to(torch.int32)
    decode = torch.randn(1, q_heads, dim, generator=gen)
    meta = ops.cpu_attn_get_scheduler_metadata(
        1, q_heads, heads, dim, seq_lens, torch.float32, start, True, -1, isa, False
    )
    out = torch.empty_like(decode)
    ops.cpu_attention_with_kv_cache(
        decode,
        key_cache,
        value_cache,
        out,
        start,
        seq_lens,
        scale,
        True,
        None,
        -1,
        blocks[None],
        0,
        meta,
        None,
    )
    rep = q_heads // heads
    held_keys, held_values = torch.cat([kept_keys, new_key]), torch.cat([kept_values, new_value])
    for h in range(q_heads):
        k, v = held_keys[:, h // rep], held_values[:, h // rep]
        want = ((decode[0, h] @ k.t()) * scale).softmax(-1) @ v
        torch.testing.assert_close(out[0, h], want, rtol=1e-4, atol=1e-4)


def _scheduler(llm):
    """The engine's scheduler (the engine runs in this process: VLLM_ENABLE_V1_MULTIPROCESSING=0)."""
    return llm.llm_engine.engine_core.engine_core.scheduler


def _blocks_of(scheduler, request_id):
    """The blocks vLLM's KV cache manager holds for a request (vLLM suffixes the ids it is given)."""
    manager = scheduler.kv_cache_manager.coordinator.single_type_managers[0]
    return sum(len(b) for rid, b in manager.req_to_blocks.items() if rid.startswith(request_id))


def test_a_compressed_requests_tail_blocks_go_back_to_vllms_pool(llm, needle_prompts):
    """vLLM's own block accounting: a 2,000-token prompt under SnapKV at a quarter holds every block
    through its prefill (four chunks), the blocks of the entries it kept from the next step on (the freed ones back in
    the pool: vLLM's cache usage drops by their share), grows from there as it decodes, and gives
    everything back when it finishes."""
    from kvpolicy_vllm.servable import kept_count

    _, prompts = needle_prompts
    prompt = prompts[3]  # 2,000 tokens
    spec = "snapkv:kv_budget=0.25"
    engine, scheduler = llm.llm_engine, _scheduler(llm)
    pool = scheduler.kv_cache_manager.block_pool
    free_before = pool.get_num_free_blocks()
    block = scheduler.kv_cache_manager.coordinator.single_type_managers[0].block_size
    engine.add_request(
        "freed",
        vllm.TokensPrompt(prompt_token_ids=prompt),
        vllm.SamplingParams(
            max_tokens=block // 2, temperature=0.0, ignore_eos=True, extra_args={"kvpolicy": spec}
        ),
    )
    (rid,) = [r for r in scheduler.requests if r.startswith("freed")]
    steps = 0
    while scheduler.requests[rid].num_computed_tokens < len(prompt):  # the prefill, in chunks of 512
        engine.step()
        steps += 1
    assert steps == 4
    full = -(-len(prompt) // block)
    assert _blocks_of(scheduler, "freed") == full
    usage_full = scheduler.kv_cache_manager.usage
    engine.step()  # the first decode step: the scheduler gave the tail back before scheduling it
    kept = kept_count(spec, len(prompt))
    assert kept == round(0.25 * len(prompt))
    held = _blocks_of(scheduler, "freed")
    assert held == -(-(kept + 1) // block)
    assert free_before - pool.get_num_free_blocks() == held
    assert scheduler.kv_cache_manager.usage == pytest.approx(usage_full * held / full)
    outputs, grown = [], False
    while engine.has_unfinished_requests():
        outputs += engine.step()
        # decode grows the request from what it holds: one block per block_size new tokens
        now = _blocks_of(scheduler, "freed")
        assert now in (0, held, held + 1)
        grown |= now == held + 1
    assert grown, "decode never needed a new block: make max_tokens cross a block boundary"
    assert len(outputs[-1].outputs[0].token_ids) == block // 2
    assert pool.get_num_free_blocks() == free_before


def test_32_concurrent_requests_of_mixed_lengths_and_policies_all_complete_as_kvpolicy_gives_them(
    llm, needle_prompts
):
    """32 requests at once, 100 to 1,000 tokens, under five settings (three SnapKV budgets,
    StreamingLLM, none): every one completes (its token budget or its end of text), and each answer is the one
    ``kvpolicy.generate`` gives its prompt under its policy; nothing is lost when the engine interleaves
    prefills, frees tail blocks and decodes in one batch."""
    _, prompts = needle_prompts
    specs = [
        "snapkv:kv_budget=0.1",
        "snapkv:kv_budget=0.25",
        None,
        "snapkv:kv_budget=0.5",
        "streamingllm:kv_budget=0.25",
    ]
    lengths = [100 + (900 * i) // 31 for i in range(32)]
    batch = [prompts[i % len(prompts)][-n:] for i, n in enumerate(lengths)]
    chosen = [specs[i % len(specs)] for i in range(32)]
    params = [
        vllm.SamplingParams(max_tokens=NEW, temperature=0.0, extra_args={"kvpolicy": s} if s else None)
        for s in chosen
    ]
    served = llm.generate([vllm.TokensPrompt(prompt_token_ids=p) for p in batch], params)
    assert len(served) == 32
    assert all(out.finished and out.outputs[0].finish_reason in ("length", "stop") for out in served)
    assert [list(out.outputs[0].token_ids) for out in served] == _ours(batch, chosen)
    pool = _scheduler(llm).kv_cache_manager.block_pool
    assert pool.get_num_free_blocks() == pool.num_gpu_blocks - 1  # all back (vLLM keeps one null block)


@pytest.mark.parametrize(
    ("setting", "named"),
    [
        ("snapkv:kv_budget=-1", "kv_budget"),
        ("nosuchpolicy", "nosuchpolicy"),
        ("ada-snapkv:kv_budget=0.25", "per KV head"),
        ("fastkv", "propagation"),
        (3, "3"),
    ],
)
def test_a_bad_setting_is_refused_at_admission_naming_it_and_the_engine_serves_on(
    llm, needle_prompts, setting, named
):
    """The check vLLM runs on every request before its engine sees it (its wrapped
    ``InputProcessor._validate_params``): a bad setting raises vLLM's validation error (the server's
    400) naming the value; the engine is untouched and serves the next request."""
    from vllm.exceptions import VLLMValidationError

    _, prompts = needle_prompts
    with pytest.raises((ValueError, VLLMValidationError), match=named):
        llm.generate(
            [vllm.TokensPrompt(prompt_token_ids=prompts[0][-200:])],
            vllm.SamplingParams(max_tokens=2, extra_args={"kvpolicy": setting}),
        )
    out = llm.generate(
        [vllm.TokensPrompt(prompt_token_ids=prompts[0][-200:])],
        vllm.SamplingParams(max_tokens=2, temperature=0.0),
    )
    assert len(out[0].outputs[0].token_ids) == 2


def _request(port, path, body=None):
    """GET (``body`` None) or POST JSON to the server: (status, body text, headers)."""
    import json
    import urllib.error
    import urllib.request

    request = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}",
        data=None if body is None else json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=300) as response:
            return response.status, response.read().decode(), response.headers
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode(), err.headers


def _post(port, body):
    """POST ``/v1/completions``: (status, parsed body, the ``x-kvpolicy`` header or None)."""
    import json

    status, text, headers = _request(port, "/v1/completions", body)
    return status, json.loads(text or "{}"), headers.get("x-kvpolicy")


DOCS = Path(__file__).resolve().parents[3] / "docs" / "serving.md"
#: The comment in docs/serving.md that marks the quick start's command, which the server fixture runs.
QUICKSTART = "<!-- serve-quickstart"
QUICKSTART_PORT = 8000  # the command's (vLLM's default port)


def quickstart_command():
    """The bash block after :data:`QUICKSTART` in ``docs/serving.md``, as a user copies it."""
    text = DOCS.read_text()
    assert QUICKSTART in text, f"{DOCS} lost its {QUICKSTART} marker"
    block = re.search(r"```bash\n(.*?)```", text[text.index(QUICKSTART) :], re.S)
    assert block, f"no bash block after {QUICKSTART} in {DOCS}"
    return block.group(1)


@pytest.fixture(scope="module")
def server(needle_prompts, tmp_path_factory):
    """docs/serving.md's quick start, run as written (bash, from the repository root, in a user's
    environment: no VLLM_* or KVPOLICY_DEFAULT of this test process) in its own processes; its log goes
    to a file shown when it fails to come up. Yields (port, model, log, seconds until /health answered)."""
    import signal
    import socket
    import subprocess
    import time
    import urllib.request

    path, _ = needle_prompts
    with socket.socket() as sock:
        if sock.connect_ex(("127.0.0.1", QUICKSTART_PORT)) == 0:
            pytest.fail(f"port {QUICKSTART_PORT}, which the documented command serves on, is taken")
    log = tmp_path_factory.mktemp("serve") / "vllm-serve.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("VLLM_") and k != "KVPOLICY_DEFAULT"}
    started = time.monotonic()
    with open(log, "w") as out:
        proc = subprocess.Popen(
            ["bash", "-c", quickstart_command()],
            cwd=DOCS.parents[1],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: bash, the API server, engine core, worker
        )
    try:
        deadline = started + 300
        while True:
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"the documented server did not come up:\n{log.read_text()[-4000:]}")
            try:
                url = f"http://127.0.0.1:{QUICKSTART_PORT}/health"
                with urllib.request.urlopen(url, timeout=5) as response:
                    if response.status == 200:
                        break
            except OSError:
                time.sleep(1)
        seconds = time.monotonic() - started
        print(f"the documented server answered /health after {seconds:.0f} s")
        yield QUICKSTART_PORT, str(path), log, seconds
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


def test_the_documented_server_compresses_by_default_names_the_policy_and_answers_bad_settings_with_400(
    server, llm, needle_prompts
):
    """docs/serving.md's quick start (``KVPOLICY_DEFAULT=snapkv:kv_budget=0.25``): a request without a
    setting gets SnapKV's tokens (the offline engine's under the same policy) and says so in its
    ``x-kvpolicy`` header, one that says ``vllm_xargs: {"kvpolicy": "fullkv"}`` gets full KV's
    (``x-kvpolicy: fullkv``), and a bad setting is a 400 naming the value."""
    port, model, _, _ = server
    _, prompts = needle_prompts
    prompt = prompts[1]

    def offline(spec):
        params = vllm.SamplingParams(max_tokens=NEW, temperature=0.0, extra_args={"kvpolicy": spec})
        return list(
            llm.generate([vllm.TokensPrompt(prompt_token_ids=prompt)], params)[0].outputs[0].token_ids
        )

    base = {"model": model, "prompt": prompt, "max_tokens": NEW, "temperature": 0.0, "return_token_ids": True}
    status, body, served = _post(port, base)
    assert status == 200, body
    assert served == "snapkv:kv_budget=0.25"
    default = body["choices"][0]["token_ids"]
    assert default == offline("snapkv:kv_budget=0.25")
    status, body, served = _post(port, {**base, "vllm_xargs": {"kvpolicy": "fullkv"}})
    assert status == 200, body
    assert served == "fullkv"
    assert body["choices"][0]["token_ids"] == offline("fullkv") != default
    status, body, served = _post(port, {**base, "vllm_xargs": {"kvpolicy": "snapkv:kv_budget=-1"}})
    assert status == 400 and served is None
    assert "kv_budget" in str(body) and "-1" in str(body)
    status, _, _ = _post(port, base)  # the engine serves on
    assert status == 200


def test_the_documented_server_refuses_a_top_level_kvpolicy_field_naming_vllm_xargs(server):
    """vLLM's request models ignore unknown fields (logged at debug level): a top-level ``"kvpolicy"``
    would be served under the default without a word, so it is a 400 that says where the setting goes."""
    port, model, _, _ = server
    setting = {"model": model, "max_tokens": 2, "kvpolicy": "streamingllm:kv_budget=0.25"}
    for path, body in (
        ("/v1/completions", {**setting, "prompt": "Hello"}),
        ("/v1/chat/completions", {**setting, "messages": [{"role": "user", "content": "Hello"}]}),
    ):
        status, text, headers = _request(port, path, body)
        assert status == 400, text
        assert "vllm_xargs" in text and "streamingllm:kv_budget=0.25" in text
        assert headers.get("x-kvpolicy") is None


def _served_counts(port):
    """``kvpolicy:requests_total`` by policy label, from the server's /metrics."""
    status, text, _ = _request(port, "/metrics")
    assert status == 200
    found = re.findall(r'^kvpolicy:requests_total\{policy="([^"]*)"\} ([0-9.e+]+)$', text, re.M)
    return {label: float(value) for label, value in found}


def test_the_documented_server_says_once_that_the_plugin_is_active_and_counts_served_policies(server):
    """One start-up line names the plugin and the default it serves; a streamed response carries the
    policy's header too; and ``/metrics`` counts each response under the policy that served it."""
    port, model, log, _ = server
    lines = [line for line in log.read_text().splitlines() if "kvpolicy-vllm active" in line]
    assert len(lines) == 1, lines
    assert "served under snapkv:kv_budget=0.25 (KVPOLICY_DEFAULT)" in lines[0]
    assert "x-kvpolicy" in lines[0] and "kvpolicy:requests_total" in lines[0]
    before = _served_counts(port)
    base = {"model": model, "prompt": "The capital of France is", "max_tokens": 2}
    status, text, headers = _request(port, "/v1/completions", {**base, "stream": True})
    assert status == 200 and "data:" in text
    assert headers.get("x-kvpolicy") == "snapkv:kv_budget=0.25"
    for spec in ("streamingllm:kv_budget=0.25", "fullkv"):
        status, _, headers = _request(port, "/v1/completions", {**base, "vllm_xargs": {"kvpolicy": spec}})
        assert status == 200 and headers.get("x-kvpolicy") == spec
    after = _served_counts(port)
    for label in ("snapkv:kv_budget=0.25", "streamingllm:kv_budget=0.25", "fullkv"):
        assert after[label] - before.get(label, 0.0) == 1.0, (label, before, after)


def test_a_default_this_engine_cannot_compress_stops_start_up_and_the_line_says_what_is_served(
    llm, monkeypatch
):
    """The start-up line (``kvpolicy_vllm.server.announce``, run where vLLM builds an engine's input
    processor, before its engine core starts): which policy requests that name none get; with prefix
    caching on, a warning that compressed requests are refused, and a ``KVPOLICY_DEFAULT`` is an error
    naming the setting to change instead of a 400 on every request."""
    from vllm.v1.engine.input_processor import InputProcessor

    from kvpolicy_vllm.server import announce

    assert getattr(InputProcessor.__init__, "_kvpolicy", False)
    config = llm.llm_engine.vllm_config
    monkeypatch.delenv("KVPOLICY_DEFAULT", raising=False)
    assert "served with full KV (KVPOLICY_DEFAULT unset)" in announce(config)
    monkeypatch.setenv("KVPOLICY_DEFAULT", "streamingllm:kv_budget=0.5")
    assert "served under streamingllm:kv_budget=0.5 (KVPOLICY_DEFAULT)" in announce(config)
    monkeypatch.setattr(config.cache_config, "enable_prefix_caching", True)
    with pytest.raises(ValueError, match="--no-enable-prefix-caching"):
        announce(config)
    monkeypatch.delenv("KVPOLICY_DEFAULT")
    assert "refused with a 400" in announce(config)


def test_an_engine_with_prefix_caching_refuses_compressed_requests_at_admission(llm, monkeypatch):
    """The admission check reads the engine's configuration: with prefix caching on (vLLM's default)
    a request naming a policy is vLLM's validation error saying which setting to change, and one naming
    none is served."""
    from vllm.exceptions import VLLMValidationError

    from kvpolicy_vllm.admission import check_request

    config = llm.llm_engine.vllm_config
    monkeypatch.setattr(config.cache_config, "enable_prefix_caching", True)
    with pytest.raises(VLLMValidationError, match="--no-enable-prefix-caching"):
        llm.generate(
            [vllm.TokensPrompt(prompt_token_ids=[1, 2, 3])],
            vllm.SamplingParams(max_tokens=1, extra_args={"kvpolicy": "snapkv"}),
        )
    assert check_request(vllm.SamplingParams(max_tokens=1), config) is None


def test_an_fp8_kv_cache_composes_with_a_policy(needle_prompts):
    """vLLM's fp8 KV cache (``kv_cache_dtype='fp8'``, e4m3: how kvpolicy's ``kv_bits`` is served) under a
    policy: a keep-all policy is the fp8 engine's own output token for token (the compaction and writes
    go through vLLM's fp8 writer with the layer's scales), and SnapKV at half the prompt still finds
    the needle where the fp8 engine with full KV does."""
    path, prompts = needle_prompts
    llm = _engine(path, kv_cache_dtype="fp8")
    batch = [vllm.TokensPrompt(prompt_token_ids=p) for p in prompts[:3]]

    def served(spec):
        extra = {"extra_args": {"kvpolicy": spec}} if spec else {}
        params = vllm.SamplingParams(max_tokens=30, temperature=0.0, **extra)  # the whole needle
        return [list(o.outputs[0].token_ids) for o in llm.generate(batch, params)]

    plain = served(None)
    assert served("snapkv:kv_budget=100000") == plain
    from kvpolicy.eval.needle import needle_found

    tokenizer = llm.get_tokenizer()
    found = [needle_found(tokenizer.decode(t)) for t in plain]
    half = [needle_found(tokenizer.decode(t)) for t in served("snapkv:kv_budget=0.5")]
    assert any(found) and half == found
