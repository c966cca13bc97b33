"""Plugin robustness beyond tests/test_registry.py: realistic failures, the CLI, names, duplicates.

Each test installs fake distributions (a module plus its ``.dist-info`` with a ``kvpolicy`` entry
point) on a temporary ``sys.path`` entry, as ``pip install`` would.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch

import kvpolicy
from kvpolicy.cli import main
from kvpolicy.registry import BUILTIN, PluginWarning, RegistryError, get_registry, reset_registry
from kvpolicy.testing import one_thread, tiny_llama


def install(root: Path, dist: str, module: str, source: str, version: str = "1.0", target: str = "") -> None:
    """A fake installed distribution ``dist`` whose ``kvpolicy`` entry point is ``module[:target]``."""
    (root / f"{module}.py").write_text(textwrap.dedent(source))
    info = root / f"{dist.replace('-', '_')}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
    value = f"{module}:{target}" if target else module
    (info / "entry_points.txt").write_text(f"[kvpolicy]\n{module} = {value}\n")


def cache_plugin(kind: str, cls: str = "Plug") -> str:
    return f"""
    import torch
    from kvpolicy.hookspecs import hookimpl
    from kvpolicy.interfaces import CachePolicy

    class {cls}(CachePolicy):
        \"\"\"Keeps the first `budget` entries.\"\"\"
        kind = "{kind}"
        budget: int = 4

        def select(self, view, state):
            n = min(self.budget, view.num_tokens)
            return torch.arange(n).expand(view.key.shape[0], view.num_kv_heads, n)

    @hookimpl
    def kvpolicy_register_components():
        return [{cls}]
    """


BROKEN = "import kvpolicy_dependency_that_is_not_installed\n"


@pytest.fixture
def site(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delenv("KVPOLICY_STRICT_PLUGINS", raising=False)
    monkeypatch.delenv("KVPOLICY_DISABLE_PLUGINS", raising=False)
    yield tmp_path
    reset_registry()
    for name in [m for m in sys.modules if m.startswith("xplug")]:
        del sys.modules[name]


def plugin_warnings(build=lambda: get_registry(refresh=True)):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = build()
    return result, [str(w.message) for w in caught if issubclass(w.category, PluginWarning)]


def test_import_failure_is_one_warning_and_everything_else_generates(site):
    install(site, "xplug-good", "xplug_good", cache_plugin("xfirst"), version="2.0")
    install(site, "xplug-broken", "xplug_broken", BROKEN, version="0.3")
    registry, messages = plugin_warnings()
    assert len(messages) == 1
    assert "xplug-broken 0.3" in messages[0]
    assert "ModuleNotFoundError: No module named 'kvpolicy_dependency_that_is_not_installed'" in messages[0]
    assert registry.problems == messages
    # Later lookups reuse the registry: no second warning.
    _, again = plugin_warnings(lambda: (kvpolicy.get_policy("snapkv"), get_registry()))
    assert again == []
    model, ids = tiny_llama(), torch.arange(40)[None]
    for policy in (
        kvpolicy.get_policy("fastkv", tsp_layer=1, tsp_rate=0.5, kv_budget=16),
        kvpolicy.policy_from_dict({"propagation": {"kind": "all"}, "cache": {"kind": "xfirst", "budget": 6}}),
    ):
        with one_thread():
            out = kvpolicy.generate(model, None, input_ids=ids, policy=policy, max_new_tokens=3)
        assert out.token_ids and out.stats.kv_tokens_per_layer == [16 if policy.name else 6] * 4


@pytest.mark.parametrize(
    ("source", "target", "error"),
    [
        ("X = 1\n", "missing", "AttributeError"),
        ("raise RuntimeError('plugin init exploded')\n", "", "RuntimeError: plugin init exploded"),
        ("def broken(:\n", "", "SyntaxError"),
        (
            """
            from kvpolicy.hookspecs import hookimpl

            @hookimpl
            def kvpolicy_register_components(unexpected_argument):
                return []
            """,
            "",
            "unexpected_argument",
        ),
    ],
    ids=["missing-attribute", "raises-on-import", "syntax-error", "bad-hook-signature"],
)
def test_every_kind_of_load_failure_names_the_distribution(site, source, target, error):
    install(site, "xplug-bad", "xplug_bad", source, version="1.2", target=target)
    registry, messages = plugin_warnings()
    assert len(messages) == 1 and "xplug-bad 1.2" in messages[0] and error in messages[0], messages
    assert "snapkv" in registry.presets


@pytest.mark.parametrize(
    ("body", "error"),
    [
        ("return None", "failed in kvpolicy_register_components: TypeError"),
        ("return [object]", "registered an unsupported object"),
        ("return [int]", "registered an unsupported object"),
    ],
)
def test_hooks_returning_garbage_are_isolated(site, body, error):
    source = f"""
    from kvpolicy.hookspecs import hookimpl

    @hookimpl
    def kvpolicy_register_components():
        {body}
    """
    install(site, "xplug-garbage", "xplug_garbage", source)
    registry, messages = plugin_warnings()
    assert len(messages) == 1 and "xplug-garbage 1.0" in messages[0] and error in messages[0], messages
    assert "tsp" in registry.components


def test_strict_mode_is_an_error_for_hooks_and_the_cli(site, monkeypatch, capsys):
    install(site, "xplug-broken", "xplug_broken", BROKEN)
    monkeypatch.setenv("KVPOLICY_STRICT_PLUGINS", "1")
    with pytest.raises(RegistryError, match=r"xplug-broken 1\.0 failed to load: ModuleNotFoundError.*STRICT"):
        get_registry(refresh=True)
    reset_registry()
    assert main(["list", "--json"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("kvpolicy: error: kvpolicy plugin") and "xplug-broken 1.0" in captured.err
    # "0" (or unset) is not strict.
    monkeypatch.setenv("KVPOLICY_STRICT_PLUGINS", "0")
    _, messages = plugin_warnings()
    assert len(messages) == 1


def test_strict_mode_covers_failing_hooks(site, monkeypatch):
    source = """
    from kvpolicy.hookspecs import hookimpl

    @hookimpl
    def kvpolicy_register_adapters():
        raise KeyError("no adapters today")
    """
    install(site, "xplug-hook", "xplug_hook", source)
    monkeypatch.setenv("KVPOLICY_STRICT_PLUGINS", "1")
    with pytest.raises(
        RegistryError, match=r"xplug-hook 1\.0 failed in kvpolicy_register_adapters: KeyError"
    ):
        get_registry(refresh=True)


@pytest.mark.parametrize(
    "setting",
    ["xplug-good", "xplug_good", "XPlug_Good", "other, xplug-good ,more", "xplug.good"],
)
def test_disabled_plugins_are_not_even_imported(site, monkeypatch, setting):
    install(site, "xplug-good", "xplug_good", cache_plugin("xfirst"))
    monkeypatch.setenv("KVPOLICY_DISABLE_PLUGINS", setting)
    registry, messages = plugin_warnings()
    assert messages == [] and "xfirst" not in registry.components
    assert "xplug_good" not in sys.modules
    with pytest.raises(RegistryError, match="unknown policy component 'xfirst'"):
        kvpolicy.policy_from_dict({"propagation": {"kind": "all"}, "cache": {"kind": "xfirst"}})


def test_disable_by_entry_point_name_leaves_other_plugins(site, monkeypatch):
    install(site, "xplug-one", "xplug_one", cache_plugin("xone"))
    install(site, "xplug-two", "xplug_two", cache_plugin("xtwo"))
    monkeypatch.setenv("KVPOLICY_DISABLE_PLUGINS", "xplug_one")  # the entry point's name
    registry = get_registry(refresh=True)
    assert "xone" not in registry.components
    assert registry.components["xtwo"].provider == "xplug-two 1.0"


def test_duplicate_names_name_both_providers_and_the_way_out(site, monkeypatch):
    """Two plugins claiming one name: one warning naming both and the way out; neither is picked
    silently, and everything else works."""
    install(site, "xplug-a", "xplug_a", cache_plugin("xsame"), version="1.0")
    install(site, "xplug-b", "xplug_b", cache_plugin("xsame"), version="3.1")
    registry, messages = plugin_warnings()
    assert len(messages) == 1
    message = messages[0]
    assert "'xsame' is provided twice" in message and "neither is used" in message
    assert "xplug-a 1.0 (xplug_a.Plug)" in message and "xplug-b 3.1 (xplug_b.Plug)" in message
    assert "KVPOLICY_DISABLE_PLUGINS" in message
    assert "xsame" not in registry.components and "snapkv" in registry.presets
    with pytest.raises(RegistryError, match="unknown policy component 'xsame'"):
        kvpolicy.policy_from_dict({"propagation": {"kind": "all"}, "cache": {"kind": "xsame"}})
    monkeypatch.setenv("KVPOLICY_DISABLE_PLUGINS", "xplug-a")
    assert get_registry(refresh=True).components["xsame"].provider == "xplug-b 3.1"
    monkeypatch.delenv("KVPOLICY_DISABLE_PLUGINS")
    monkeypatch.setenv("KVPOLICY_STRICT_PLUGINS", "1")  # strict: the clash is an error
    with pytest.raises(RegistryError, match="'xsame' is provided twice"):
        get_registry(refresh=True)


def test_a_plugin_cannot_shadow_a_builtin(site, capsys):
    """A clash with a built-in costs the plugin's entry only: the built-in keeps its name, and the
    commands (list, the tool to diagnose it, and generate) keep working."""
    install(site, "xplug-shadow", "xplug_shadow", cache_plugin("snapkv", cls="MySnapKV"))
    registry, messages = plugin_warnings()
    assert len(messages) == 1
    assert re.search(
        rf"'snapkv' is provided twice: by {re.escape(BUILTIN)} .* xplug-shadow 1\.0", messages[0]
    )
    assert "the built-in is kept" in messages[0]
    assert registry.components["snapkv"].provider == BUILTIN
    reset_registry()
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert "plugin problems (1" in out and "xplug-shadow 1.0" in out


def test_duplicate_preset_names_name_both(site):
    preset = """
    from kvpolicy.hookspecs import hookimpl
    from kvpolicy.policies.presets import FullKVPreset

    class Again(FullKVPreset):
        kind = "fullkv"

    @hookimpl
    def kvpolicy_register_presets():
        return [Again]
    """
    install(site, "xplug-preset", "xplug_preset", preset)
    registry, messages = plugin_warnings()
    assert len(messages) == 1 and re.search(
        r"preset name 'fullkv' is provided twice: .* xplug-preset 1\.0", messages[0]
    )
    assert registry.presets["fullkv"].provider == BUILTIN


def test_a_component_without_a_kind_costs_one_warning(site, capsys):
    """A plugin that forgets ``kind``: one warning naming the distribution and the class; `list` and
    `generate --policy fullkv` still work."""
    source = cache_plugin("xnokind").replace('kind = "xnokind"', "")
    install(site, "xplug-nokind", "xplug_nokind", source)
    registry, messages = plugin_warnings()
    assert len(messages) == 1 and "xplug-nokind 1.0" in messages[0] and "empty name" in messages[0]
    assert "give it a `kind`" in messages[0] and "snapkv" in registry.presets
    reset_registry()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PluginWarning)
        assert main(["list", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert len(data["problems"]) == 1 and "xplug-nokind" in data["problems"][0]


def test_a_plugin_without_hookimpl_is_told_it_registers_nothing(site):
    source = cache_plugin("xforgot").replace("@hookimpl\n    ", "")
    install(site, "xplug-forgot", "xplug_forgot", source)
    registry, messages = plugin_warnings()
    assert len(messages) == 1 and "xplug-forgot 1.0" in messages[0] and "registers nothing" in messages[0]
    assert "@hookimpl" in messages[0] and "xforgot" not in registry.components


def test_list_json_reports_problems_and_keeps_stdout_clean(site, capsys):
    install(site, "xplug-good", "xplug_good", cache_plugin("xfirst"), version="2.0")
    install(site, "xplug-broken", "xplug_broken", BROKEN)
    reset_registry()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PluginWarning)
        assert main(["list", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert set(data) == {"entries", "problems", "architectures"}
    assert "llama" in data["architectures"]["covered"]
    rows = {(e["category"], e["name"]): e for e in data["entries"]}
    assert rows[("cache", "xfirst")]["provider"] == "xplug-good 2.0"
    assert rows[("cache", "xfirst")]["description"] == "Keeps the first `budget` entries."
    assert rows[("preset", "fastkv")]["provider"] == BUILTIN
    assert len(data["problems"]) == 1 and "xplug-broken 1.0" in data["problems"][0]


def test_list_json_from_a_script(site):
    """What a script sees: exit 0, JSON on stdout, the plugin warning on stderr only."""
    install(site, "xplug-good", "xplug_good", cache_plugin("xfirst"), version="2.0")
    install(site, "xplug-broken", "xplug_broken", BROKEN)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])}
    env.pop("KVPOLICY_STRICT_PLUGINS", None)
    proc = subprocess.run(
        [sys.executable, "-m", "kvpolicy.cli", "list", "--json"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert any(e["name"] == "xfirst" and e["provider"] == "xplug-good 2.0" for e in data["entries"])
    # one plain line, not Python's warning format with an internal path
    lines = [line for line in proc.stderr.splitlines() if "xplug-broken 1.0" in line]
    assert len(lines) == 1 and lines[0].startswith("kvpolicy: warning: kvpolicy plugin"), proc.stderr
    assert "PluginWarning" not in proc.stderr and ".py:" not in proc.stderr


def test_installed_policy_that_raises_at_run_time_names_itself_and_the_layer(site):
    """A third-party policy that fails inside a hook while generating: the error names the policy, its
    hook and the layer; the model is left unchanged and gives the same tokens afterwards."""
    source = cache_plugin("xexplode", "Explode").replace(
        "n = min(self.budget, view.num_tokens)",
        "n = min(self.budget, view.num_tokens)\n            if view.layer == 2:\n"
        "                raise KeyError('lost my table')",
    )
    from kvpolicy.adapters import AdapterError

    install(site, "xplug-explode", "xplug_explode", source)
    get_registry(refresh=True)
    model, ids = tiny_llama(), torch.arange(40)[None]
    with one_thread():
        before = kvpolicy.generate(model, None, input_ids=ids, max_new_tokens=4).token_ids
        policy = kvpolicy.policy_from_dict({"propagation": {"kind": "all"}, "cache": {"kind": "xexplode"}})
        with pytest.raises(
            AdapterError,
            match=r"policy Explode \('xexplode'\) failed in select\(\) at layer 2: KeyError: 'lost my table'",
        ):
            kvpolicy.generate(model, None, input_ids=ids, policy=policy, max_new_tokens=4)
        assert kvpolicy.generate(model, None, input_ids=ids, max_new_tokens=4).token_ids == before
