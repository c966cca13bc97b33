"""Hybrid models (issue 22): attention layers mixed with recurrent, linear-attention, convolution and
MLP-only layers (Qwen3-Next / Qwen3.5, Bamba, Falcon-H1, LFM2, Nemotron-H, ...), from tiny random
configs built offline (:func:`kvpolicy.coverage.tiny_config`: recurrent layers 0 and 2, attention 1, 3).

What must hold, beyond the coverage check's "equal to transformers with full KV and keep-all settings":
padding never enters a recurrent state (a batch equals each prompt alone), graph-replayed decode equals
eager, a propagation policy that would cut after a layer without attention is refused naming the layers
that attend, and the stats count the recurrent state a sequence holds (constant in the prompt length).
"""

from __future__ import annotations

import pytest
import torch

import kvpolicy
from kvpolicy.cache import StateLayer
from kvpolicy.cli import main
from kvpolicy.coverage import _build

#: one family per kind of recurrent layer: gated delta-net (linear attention), Mamba 2, Mamba beside
#: attention in every layer, short convolution, Mamba 2 with an MLP-only layer
HYBRIDS = ["qwen3_next", "bamba", "falcon_h1", "lfm2", "nemotron_h"]


@pytest.fixture(scope="module", params=HYBRIDS)
def hybrid(request):
    return _build(request.param)


def _prompts(*lengths: int) -> list[torch.Tensor]:
    return [torch.randint(1, 128, (n,), generator=torch.Generator().manual_seed(n)) for n in lengths]


def test_a_padded_batch_equals_each_prompt_alone(hybrid):
    """Left padding is zeroed before each recurrent mixer (its 2D padding mask), so a batch of prompts of
    different lengths gives each the tokens it gets alone, through a TSP cut that the recurrent layers
    after it follow (they process the propagated tokens in order)."""
    adapter = kvpolicy.get_adapter(hybrid)
    tsp = adapter.attention_layers[0]
    policy = kvpolicy.get_policy("fastkv", kv_budget=12, tsp_layer=tsp, tsp_rate=0.5)
    prompts = _prompts(40, 23, 31)
    alone = [kvpolicy.generate(hybrid, None, input_ids=p, policy=policy, max_new_tokens=8) for p in prompts]
    batch = kvpolicy.generate(hybrid, None, input_ids=prompts, policy=policy, max_new_tokens=8)
    assert [b.token_ids for b in batch] == [a.token_ids for a in alone]
    kept = alone[0].stats.tokens_per_layer
    assert kept[: tsp + 1] == [40] * (tsp + 1) and set(kept[tsp + 1 :]) == {
        policy.propagation.tokens_kept(40)
    }


@pytest.mark.parametrize("model_type", ["qwen3_next", "bamba"])
def test_graph_replayed_decode_equals_eager(model_type):
    """The recurrent state is updated in place at fixed addresses, so a recorded decode step replays
    (the traced stand-in for CUDA graphs on a CPU) and gives eager's tokens."""
    model = _build(model_type)
    ids = _prompts(40)[0]
    policy = kvpolicy.get_policy("snapkv", kv_budget=12)
    eager = kvpolicy.generate(model, None, input_ids=ids, policy=policy, max_new_tokens=12)
    graphs = kvpolicy.generate(model, None, input_ids=ids, policy=policy, max_new_tokens=12, graphs=True)
    assert graphs.token_ids == eager.token_ids


def test_a_cut_after_a_layer_without_attention_is_refused_naming_the_attention_layers():
    model = _build("qwen3_next")  # layers 0 and 2 are gated delta-nets
    ids = _prompts(40)[0]
    for name, options in (("fastkv", {"tsp_layer": 0}), ("gemfilter", {"filter_layer": 2})):
        with pytest.raises(
            ValueError, match=r"layer (0|2) of Qwen3NextForCausalLM has no attention .* \[1, 3\]"
        ):
            kvpolicy.generate(model, None, input_ids=ids, policy=kvpolicy.get_policy(name, **options))


def test_stats_count_the_recurrent_state_held():
    """A recurrent layer holds no entries but its state: the same bytes for any prompt length, while the
    attention layers' keys and values grow with it; policies compress only the attention layers."""
    model = _build("qwen3_next")
    full = kvpolicy.get_policy("fullkv")
    short, long = (
        kvpolicy.generate(model, None, input_ids=p, policy=full, max_new_tokens=1) for p in _prompts(20, 40)
    )
    for i in (0, 2):
        assert short.stats.kv_tokens_per_layer[i] == 0
        assert short.stats.kv_bytes_per_layer[i] == long.stats.kv_bytes_per_layer[i] > 0
    for i in (1, 3):
        assert 2 * short.stats.kv_bytes_per_layer[i] == long.stats.kv_bytes_per_layer[i]
    pre = kvpolicy.prefill(model, _prompts(40)[0][None], kvpolicy.get_policy("snapkv", kv_budget=12))
    assert [isinstance(layer, StateLayer) for layer in pre.cache.layers] == [True, False, True, False]
    assert pre.cache.kv_lengths == [0, 12, 0, 12]


def test_model_generate_refuses_a_hybrid_cache_clearly():
    from kvpolicy.cache import CacheLayoutError

    model = _build("bamba")
    pre = kvpolicy.prefill(model, _prompts(20)[0][None], kvpolicy.get_policy("fullkv"))
    with pytest.raises(CacheLayoutError, match=r"decode with kvpolicy\.generate"):
        pre.cache._check_dense_decoding()


@pytest.fixture(scope="module", params=["qwen3_next", "deepseek_v3"])
def tiny_dir(request, tmp_path_factory):
    """A tiny hybrid (Qwen3-Next) or latent-attention model (DeepSeek V3) with the embedded model's
    tokenizer, saved where ``--model`` loads it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kvpolicy.coverage import tiny_config
    from kvpolicy.models import embedded_model_dir

    tokenizer = AutoTokenizer.from_pretrained(embedded_model_dir())
    config = tiny_config(request.param)
    config.vocab_size = len(tokenizer)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp(f"tiny-{request.param}")
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_the_cli_generates_with_every_preset_on_hybrid_and_latent_models(tiny_dir, capsys):
    """``kvpolicy generate --model <tiny hybrid or MLA model>`` runs every preset: each either generates or is refused
    with the reason (a propagation policy whose layer has no attention; DuoAttention's required head map)."""
    import json

    from kvpolicy.registry import get_registry

    presets = sorted(get_registry().presets)
    ran = []
    for name in presets:
        code = main(
            [
                "generate",
                "--model",
                str(tiny_dir),
                "--policy",
                name,
                "--prompt",
                "a b c d " * 20,
                "--max-new-tokens",
                "4",
                "--no-chat",
                "--json",
            ]
        )
        out, err = capsys.readouterr()
        if code == 0:
            ran.append(name)
            assert json.loads(out)["stats"]["kv_bytes_per_layer"][0] > 0  # a recurrent state, or a latent
        else:
            # not applicable: a layer without attention, a setting the preset cannot default (a head map),
            # or a method that reads what latent attention does not cache (CriticalKV's per-head values)
            assert "has no attention" in err or "Field required" in err or "does not apply" in err, (
                name,
                err,
            )
    assert {"fullkv", "snapkv", "fastkv"} <= set(ran)
