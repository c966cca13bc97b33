"""The command line: errors are one clear line (exit 2), never a traceback."""

from __future__ import annotations

import json

import pytest

from kvpolicy.cli import main, parse_overrides


def test_parse_overrides_json_values():
    assert parse_overrides(
        ["--kv-budget", "256", "--tsp-rate=0.2", "--tsp-layer", "null", "--pooling", "avg"]
    ) == {
        "kv_budget": 256,
        "tsp_rate": 0.2,
        "tsp_layer": None,
        "pooling": "avg",
    }


def test_list_shows_presets_and_providers(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert "fastkv" in out and "kvpolicy (built-in)" in out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--policy", "fastkv", "--kv-budget", "-3"], "kv_budget=-3"),
        (["--policy", "fastkv", "--tsp-rate", "2"], "tsp_rate=2"),
        (["--policy", "nosuch"], "unknown policy 'nosuch'; known:"),
        (["--policy", "fastkv", "--frobnicate", "1"], "unknown setting 'frobnicate'"),
        (["--policy", "fastkv", "--kv-budget"], "option --kv-budget needs a value"),
    ],
)
def test_generate_bad_settings(tmp_path, capsys, args, message):
    prompt = tmp_path / "p.txt"
    prompt.write_text("hello")
    assert main(["generate", *args, "--prompt-file", str(prompt)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("kvpolicy: error:") and message in err
    assert "Traceback" not in err


def test_generate_bad_prompt_files(tmp_path, capsys):
    binary = tmp_path / "b.bin"
    binary.write_bytes(b"\xff\xfe\x00\x01")
    assert main(["generate", "--prompt-file", str(binary)]) == 2
    assert "is not UTF-8 text: byte 0xff at offset 0" in capsys.readouterr().err
    empty = tmp_path / "e.txt"
    empty.write_text("  \n")
    assert main(["generate", "--prompt-file", str(empty)]) == 2
    assert "is empty" in capsys.readouterr().err
    assert main(["generate", "--prompt-file", str(tmp_path / "missing.txt")]) == 2
    assert "prompt file not found" in capsys.readouterr().err


def test_missing_model_path(tmp_path, capsys):
    assert main(["generate", "--prompt", "hi", "--model", str(tmp_path / "nope")]) == 2
    assert "model path does not exist" in capsys.readouterr().err


def test_corrupted_gguf(tmp_path, capsys):
    (tmp_path / "bad.gguf").write_bytes(b"GGUF" + b"\x00" * 64)
    assert main(["generate", "--prompt", "hi", "--model", str(tmp_path), "--gguf-file", "bad.gguf"]) == 2
    err = capsys.readouterr().err
    assert "could not load model" in err and "Traceback" not in err


def test_policy_config_file(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    assert main(["generate", "--policy-config", str(bad), "--prompt", "hi"]) == 2
    assert "is not valid JSON" in capsys.readouterr().err


@pytest.mark.slow
def test_generate_on_real_model(tmp_path, capsys, real_model, monkeypatch):
    import torch

    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)  # --threads 1 below: not for later tests
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    prompt = tmp_path / "p.txt"
    prompt.write_text("What is the capital of France?")
    code = main(
        [
            "generate",
            "--policy",
            "fastkv",
            "--tsp-rate",
            "0.2",
            "--kv-budget",
            "256",
            "--prompt-file",
            str(prompt),
            "--threads",
            "1",
        ]
    )
    captured = capsys.readouterr()
    assert code == 0 and "Paris" in captured.out
    assert "prefill" in captured.err and "KV" in captured.err
    assert "1 thread, load " in captured.err  # what the timings were taken under


def test_threads_below_one_are_refused(capsys):
    assert main(["generate", "--prompt", "hi", "--threads", "0"]) == 2
    assert "--threads must be >= 1, got 0" in capsys.readouterr().err


def test_list_name_prints_every_setting_documented(capsys):
    """`kvpolicy list NAME`: each setting with its option, type, default and meaning, for every
    built-in preset (the meanings come from the docstrings of the preset and its components)."""
    from kvpolicy.describe import preset_settings
    from kvpolicy.registry import BUILTIN, get_registry

    for name, entry in get_registry().presets.items():
        if entry.provider != BUILTIN:
            continue
        settings = preset_settings(entry.obj)
        assert all(s.doc for s in settings), (name, [s.name for s in settings if not s.doc])
    assert main(["list", "fastkv"]) == 0
    out = capsys.readouterr().out
    assert "--tsp-rate (tsp_rate): float, default 0.2" in out
    assert "--kv-budget (kv_budget): int (tokens) | float (fraction of the prompt), default 0.1" in out
    assert "fraction of the prompt that propagates" in out
    assert main(["list", "snapkv", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert {s["name"] for s in data["settings"]} == {"kv_budget", "window", "kernel", "pooling"}
    assert main(["list", "fastkb"]) == 2
    assert "did you mean 'fastkv'?" in capsys.readouterr().err


def test_generate_help_with_a_policy_lists_its_settings(capsys):
    assert main(["generate", "--policy", "h2o", "--help"]) == 0
    out = capsys.readouterr().out
    assert "--max-new-tokens" in out  # the command's own help
    assert "preset h2o" in out and "--evict-during-decode (evict_during_decode): bool, default False" in out


_PROBE = """
import json, sys
from kvpolicy.cli import main
try:
    code = main(sys.argv[1:])
except SystemExit as exc:  # --help
    code = exc.code
print(json.dumps({"code": code, "torch": "torch" in sys.modules}), file=sys.stderr)
"""


def _probe(tmp_path, *argv):
    import json
    import os
    import subprocess
    import sys

    env = {**os.environ, "KVPOLICY_CACHE": str(tmp_path / "cache")}
    proc = subprocess.run(
        [sys.executable, "-c", _PROBE, *argv], capture_output=True, text=True, env=env, timeout=300
    )
    return proc.stdout, json.loads(proc.stderr.strip().splitlines()[-1])


def test_help_and_list_answer_without_loading_torch(tmp_path):
    """`kvpolicy --help` never loads torch; `list` loads it once to build the listing, then answers
    from the kept one, with the same output (each within a fraction of a second)."""
    _, helped = _probe(tmp_path, "--help")
    assert helped == {"code": 0, "torch": False}
    first_out, first = _probe(tmp_path, "list", "--json")
    again_out, again = _probe(tmp_path, "list", "--json")
    assert first == {"code": 0, "torch": True} and again == {"code": 0, "torch": False}
    assert again_out == first_out and '"fastkv"' in again_out
    described, probe = _probe(tmp_path, "list", "snapkv")
    assert probe == {"code": 0, "torch": False} and "--kv-budget" in described


def test_the_kept_listing_follows_installs_and_edits(tmp_path, monkeypatch):
    """The listing's fingerprint changes when a plugin is installed, when its source is edited, and
    with the plugin environment variables; nothing else needs clearing by hand."""
    import os

    from kvpolicy.listing import fingerprint

    site = tmp_path / "site"
    site.mkdir()
    monkeypatch.syspath_prepend(str(site))
    before = fingerprint()
    assert fingerprint() == before  # stable while nothing changes
    (site / "xlist_plug.py").write_text("X = 1\n")
    info = site / "xlist_plug-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: xlist-plug\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[kvpolicy]\nxlist_plug = xlist_plug\n")
    installed = fingerprint()
    assert installed != before
    stat = (site / "xlist_plug.py").stat()
    os.utime(site / "xlist_plug.py", ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert fingerprint() != installed  # an editable plugin's source changed
    monkeypatch.setenv("KVPOLICY_DISABLE_PLUGINS", "xlist_plug")
    assert fingerprint() not in (before, installed)
