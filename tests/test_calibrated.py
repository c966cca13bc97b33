"""Measured settings for packaged models: applied where a preset meets its model, never over the
user's own settings, said aloud, and every resolved setting in the run's name."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
from conftest import tiny_llama

from kvpolicy.calibrated import measured_file, packaged_model_name, resolve_preset
from kvpolicy.models import cache_root


def embedded_stand_in(layers: int = 30):
    """A model whose config says it was loaded from the embedded model's cache folder."""
    return SimpleNamespace(
        config=SimpleNamespace(
            _name_or_path=str(cache_root() / "models" / "SmolLM2-135M-Instruct"), num_hidden_layers=layers
        )
    )


def test_the_embedded_model_gets_its_measured_fastkv():
    model = embedded_stand_in()
    assert packaged_model_name(model) == "SmolLM2-135M-Instruct"
    resolved = resolve_preset("fastkv", {}, model)
    assert resolved.policy.propagation.layer == 23 and resolved.policy.propagation.rate == 0.1
    assert resolved.measured == {"tsp_layer": 23, "tsp_rate": 0.1, "kv_budget": 1.0}
    assert "tsp_layer=23" in resolved.label and "tsp_rate=0.1" in resolved.label
    assert "as measured for this model" in resolved.note and "fastkv.json" in resolved.note


def test_a_users_setting_wins_and_the_note_lists_only_what_was_filled():
    resolved = resolve_preset("fastkv", {"tsp_layer": 20}, embedded_stand_in())
    assert resolved.policy.propagation.layer == 20
    assert "tsp_layer" not in resolved.measured and "tsp_layer=20" in resolved.label
    assert "tsp_layer" not in resolved.note


def test_other_models_get_the_defaults_and_their_resolved_layer_in_the_label():
    model = tiny_llama(layers=8)
    assert packaged_model_name(model) is None and measured_file(model, "fastkv") is None
    resolved = resolve_preset("fastkv", {}, model)
    assert resolved.note is None and resolved.policy.propagation.layer is None  # worked out per model
    assert "tsp_layer=3" in resolved.label  # N/2 - 1 of 8 layers
    assert "filter_layer=" in resolve_preset("gemfilter", {}, model).label


def test_a_bad_setting_is_named_before_anything_else(tmp_path):
    with pytest.raises(ValueError, match="tsp_rate"):
        resolve_preset("fastkv", {"tsp_rate": 7}, embedded_stand_in())


def test_eval_names_the_run_with_the_resolved_settings(tmp_path, embedded_tokenizer, capsys):
    """`kvpolicy eval --policy fastkv` on the embedded model runs the measured TSP layer, says so,
    and the table title and run.json carry every resolved setting (a 30-layer tiny stand-in)."""
    from conftest import tiny_llama_for

    from kvpolicy.eval.runner import run_eval

    model = tiny_llama_for(embedded_tokenizer, layers=30)  # the embedded model's depth
    model.config._name_or_path = str(cache_root() / "models" / "SmolLM2-135M-Instruct")
    result = run_eval(
        "needle", model, embedded_tokenizer, policy="fastkv", lengths=[200], depths=1, out=tmp_path
    )
    out = capsys.readouterr().out
    assert "as measured for this model" in out and "fastkv.json" in out
    assert "tsp_layer=23" in result.label and "tsp_rate=0.1" in result.label
    meta = json.loads((result.run_dir / "run.json").read_text())
    assert meta["label"] == result.label and meta["config"]["policy"]["propagation"]["layer"] == 23
    title = " ".join(out.split())
    assert f"needle: {result.label}" in title
