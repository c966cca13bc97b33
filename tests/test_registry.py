"""Registry and plugins: built-ins through the hooks, fake installed distributions, failures isolated."""

from __future__ import annotations

import json
import sys
import textwrap
import warnings
from pathlib import Path

import pytest

import kvpolicy
from kvpolicy.registry import BUILTIN, PluginWarning, RegistryError, get_registry, reset_registry


def make_dist(root: Path, dist: str, module: str, source: str, version: str = "1.0") -> None:
    """A minimal installed distribution: a module plus its dist-info with a kvpolicy entry point."""
    (root / f"{module}.py").write_text(textwrap.dedent(source))
    info = root / f"{dist.replace('-', '_')}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
    (info / "entry_points.txt").write_text(f"[kvpolicy]\n{module} = {module}\n")


GOOD = """
    import torch
    from kvpolicy.hookspecs import hookimpl
    from kvpolicy.interfaces import CachePolicy

    class KeepFirst(CachePolicy):
        \"\"\"Keeps the first tokens.\"\"\"
        kind = "keepfirst"
        budget: int = 4

        def select(self, view, state):
            n = min(self.budget, view.num_tokens)
            return torch.arange(n).expand(view.key.shape[0], view.num_kv_heads, n)

    @hookimpl
    def kvpolicy_register_components():
        return [KeepFirst]
"""


@pytest.fixture
def plugin_path(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    reset_registry()
    for name in [m for m in sys.modules if m.startswith("fakeplug")]:
        del sys.modules[name]


def test_builtins_register_through_hooks():
    registry = get_registry(refresh=True)
    assert {"fullkv", "snapkv", "fastkv"} <= set(registry.presets)
    assert {"all", "full", "tsp", "snapkv"} <= set(registry.components)
    assert "llama" in registry.adapters
    assert registry.presets["fastkv"].provider == BUILTIN


def test_third_party_plugin_is_listed_with_its_distribution(plugin_path):
    make_dist(plugin_path, "fake-plug-good", "fakeplug_good", GOOD, version="2.3")
    registry = get_registry(refresh=True)
    entry = registry.components["keepfirst"]
    assert entry.provider == "fake-plug-good 2.3" and entry.category == "cache"
    policy = kvpolicy.policy_from_dict(
        {"propagation": {"kind": "tsp", "layer": 1}, "cache": {"kind": "keepfirst", "budget": 6}}
    )
    assert policy.cache.budget == 6


def test_broken_plugin_warns_once_and_others_work(plugin_path):
    make_dist(plugin_path, "fake-plug-good", "fakeplug_good", GOOD)
    make_dist(plugin_path, "fake-plug-broken", "fakeplug_broken", "raise ImportError('no such thing')\n")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        registry = get_registry(refresh=True)
    messages = [str(w.message) for w in caught if issubclass(w.category, PluginWarning)]
    assert len(messages) == 1
    assert "fake-plug-broken 1.0" in messages[0] and "no such thing" in messages[0]
    assert "keepfirst" in registry.components and "fastkv" in registry.presets


def test_plugin_whose_hook_raises_is_isolated(plugin_path):
    make_dist(
        plugin_path,
        "fake-plug-raises",
        "fakeplug_raises",
        """
        from kvpolicy.hookspecs import hookimpl

        @hookimpl
        def kvpolicy_register_presets():
            raise RuntimeError("hook exploded")
        """,
    )
    with pytest.warns(PluginWarning, match="fake-plug-raises 1.0 failed in kvpolicy_register_presets"):
        registry = get_registry(refresh=True)
    assert "fastkv" in registry.presets


def test_strict_mode_turns_failures_into_errors(plugin_path, monkeypatch):
    make_dist(plugin_path, "fake-plug-broken", "fakeplug_broken", "raise ImportError('nope')\n")
    monkeypatch.setenv("KVPOLICY_STRICT_PLUGINS", "1")
    with pytest.raises(RegistryError, match="fake-plug-broken"):
        get_registry(refresh=True)


def test_disabled_plugins_are_skipped(plugin_path, monkeypatch):
    make_dist(plugin_path, "fake-plug-broken", "fakeplug_broken", "raise ImportError('nope')\n")
    monkeypatch.setenv("KVPOLICY_DISABLE_PLUGINS", "fake-plug-broken")
    with warnings.catch_warnings():
        warnings.simplefilter("error", PluginWarning)
        get_registry(refresh=True)


def test_duplicate_names_name_both_providers(plugin_path):
    make_dist(plugin_path, "fake-plug-a", "fakeplug_a", GOOD)
    make_dist(plugin_path, "fake-plug-b", "fakeplug_b", GOOD)
    with pytest.warns(
        PluginWarning, match=r"'keepfirst' is provided twice: by fake-plug-(a|b) 1.0 .* by fake-plug-(a|b)"
    ):
        registry = get_registry(refresh=True)
    assert "keepfirst" not in registry.components and "snapkv" in registry.components


def test_list_json_for_scripts(capsys):
    from kvpolicy.cli import main

    assert main(["list", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    names = {(e["category"], e["name"]) for e in data["entries"]}
    assert ("preset", "fastkv") in names and ("adapter", "llama") in names
