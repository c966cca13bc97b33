"""The CLI's first answers (issue 28): typos answered from the kept listing before torch loads, a hub
id with no hub refused at once, help and listings in plain text with their defaults, the measured
settings of the embedded model shown by ``list NAME``, and no ``Loading weights`` bar."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kvpolicy.cli import main

ROOT = Path(__file__).resolve().parents[1]

#: Runs the CLI in a fresh interpreter, then says (on stderr's last line) what it returned and whether
#: torch or transformers were imported.
_PROBE = """
import json, sys
from kvpolicy.cli import main
try:
    code = main(sys.argv[1:])
except SystemExit as exc:  # --help
    code = exc.code
heavy = {m: m in sys.modules for m in ("torch", "transformers")}
print(json.dumps({"code": code, **heavy}), file=sys.stderr)
"""


def _run(cache: Path, *argv: str, env: dict[str, str] | None = None) -> tuple[str, str, dict, float]:
    """``(stdout, stderr, probe, seconds)`` of ``kvpolicy ARGV`` with its own kept listing."""
    full = {**os.environ, "KVPOLICY_CACHE": str(cache), **(env or {})}
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-c", _PROBE, *argv], capture_output=True, text=True, env=full, timeout=300
    )
    seconds = time.perf_counter() - start
    *lines, last = proc.stderr.strip().splitlines()
    return proc.stdout, "\n".join(lines), json.loads(last), seconds


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    """A cache folder whose listing is kept (the first ``list`` builds it, loading torch once)."""
    folder = tmp_path_factory.mktemp("kvpolicy-cache")
    _, _, probe, _ = _run(folder, "list", "--json")
    assert probe["code"] == 0
    return folder


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["generate", "--policy", "fastkvv", "--prompt", "hi"],
            "unknown policy 'fastkvv' (did you mean 'fastkv'?); known: ",
        ),
        (
            ["generate", "--policy", "fastkv", "--kv-budgt", "0.1", "--prompt", "hi"],
            "invalid settings for fastkv: unknown setting 'kv_budgt' (did you mean 'kv_budget'?)",
        ),
        (
            ["generate", "--policy", "fastkv", "--tsp-rate", "1.5", "--prompt", "hi"],
            "invalid settings for fastkv: tsp_rate=1.5: Input should be less than or equal to 1",
        ),
        (
            ["bench", "e2e", "--policy", "snapkv:kv_budgt=0.1"],
            "invalid settings for snapkv: unknown setting 'kv_budgt' (did you mean 'kv_budget'?)",
        ),
        (
            ["eval", "needle", "--policy", "snapkv", "--kv-budget", "256.0"],
            "kv_budget=256.0: a fractional budget must lie in (0, 1], got 256.0 (for 256 tokens write the int 256)",
        ),
        (["list", "fastkvv"], "unknown policy 'fastkvv' (did you mean 'fastkv'?)"),
        (
            ["generate", "--policy", "snapkv", "--kv-bits", "3", "--prompt", "hi"],
            "invalid settings for snapkv: kv_bits=3 is not a storage width; use one of 16",
        ),
    ],
    ids=["policy", "setting", "value", "bench-spec", "eval-budget", "list", "kv-bits"],
)
def test_typos_are_answered_without_torch(cache, argv, message):
    """A misspelt policy or setting, or a value out of range, is one line from the kept listing: no
    torch, no transformers (the wall time is printed, not asserted)."""
    _, err, probe, seconds = _run(cache, *argv)
    print(f"kvpolicy {' '.join(argv)}: {seconds:.2f} s")
    assert probe == {"code": 2, "torch": False, "transformers": False}, err
    assert err.startswith("kvpolicy: error: ") and message in err and "Traceback" not in err


#: Values tried on every setting of every preset: each message the listing gives must be the one the
#: registry gives.
_VALUES = [0, 1, -1, 2, 7, 256, 0.0, 0.5, 1.0, 1.5, -0.5, 256.0, math.inf, "abc", "max", True, None, [1]]


def test_listing_messages_are_the_registrys():
    """:func:`kvpolicy.listing.check_policy` (no torch) and :func:`kvpolicy.get_policy` agree: where the
    listing refuses, the registry refuses with the same words; what the listing cannot tell, it passes."""
    from kvpolicy.listing import SettingsError, build, check_policy
    from kvpolicy.registry import PolicyConfigError, RegistryError, get_policy, get_registry

    data = json.loads(json.dumps(build()))  # as it is kept on disk
    refused = 0
    cases = [
        (name, {field: value})
        for name, entry in get_registry().presets.items()
        for field in entry.obj.model_fields
        for value in _VALUES
    ]
    cases += [
        ("cake", {"gamma": -1, "windw": 3, "kv_budget": 0}),
        ("fastkv", {"tsp_rate": 1.5, "window": 0, "kv_budgt": 1}),
        ("fastkvv", {}),
        ("nothing-like-it", {}),
        ("snapkv", {"kv_bits": 3}),
        ("fastkv", {"kv_bits": "int3", "kv_budget": 0.5}),
        ("snapkv", {"kv_bits": "fp8"}),
    ]
    for name, options in cases:
        try:
            check_policy(name, options, data)
        except SettingsError as exc:
            refused += 1
            with pytest.raises((PolicyConfigError, RegistryError)) as slow:
                get_policy(name, **options)
            assert str(slow.value) == str(exc), (name, options)
    assert refused > 100  # it does answer most typos


def test_a_hub_id_without_a_hub_fails_at_once(cache, tmp_path):
    """A model id that is no local folder, no packaged model and not cached, with the hub refusing
    connections (a closed local port): one clear error in about a second, not a minute of retries,
    and no torch loaded for it."""
    env = {
        "HF_ENDPOINT": "http://127.0.0.1:9",
        "HF_HUB_OFFLINE": "0",
        "HF_HOME": str(tmp_path / "hf"),
    }
    argv = ["generate", "--model", "someone/not-here", "--prompt", "hi"]
    _, err, probe, seconds = _run(cache, *argv, env=env)
    print(f"hub refused: {seconds:.2f} s (transformers' retries took 53 s)")
    assert probe == {"code": 2, "torch": False, "transformers": False}, err
    assert "Retry" not in err and "Traceback" not in err
    assert "model 'someone/not-here' is neither a local folder nor a packaged model" in err
    assert "http://127.0.0.1:9 could not be reached" in err and "HF_HUB_OFFLINE=1" in err
    assert seconds < 20  # a behaviour, not a benchmark: the retries alone took 53 s
    _, err, probe, seconds = _run(cache, *argv, env={**env, "HF_HUB_OFFLINE": "1"})
    print(f"HF_HUB_OFFLINE=1: {seconds:.2f} s")
    assert probe["code"] == 2 and "not in the Hugging Face cache" in err and "HF_HUB_OFFLINE is set" in err


def test_a_cached_hub_id_loads_from_the_cache_when_the_hub_is_away(tmp_path, monkeypatch):
    """With no hub to ask, a model already in huggingface_hub's cache is read from it alone
    (``local_files_only``), with no retries."""
    from huggingface_hub import constants

    import kvpolicy.models as models

    snapshot = tmp_path / "models--someone--cached" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    (tmp_path / "models--someone--cached" / "refs").mkdir()
    (tmp_path / "models--someone--cached" / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert models.check_source("someone/cached") == {"local_files_only": True}
    with pytest.raises(models.ModelLoadError, match="'someone/other' is neither a local folder"):
        models.check_source("someone/other")
    assert models.check_source("smollm2") == {}  # a packaged name never asks the hub
    with pytest.raises(models.ModelLoadError, match="model path does not exist"):
        models.check_source(str(tmp_path / "nope"))


def test_help_names_every_command_in_plain_text(capsys):
    """``kvpolicy --help`` names all six commands, each with its line; no reST markup anywhere in
    help; ``generate --help`` shows the defaults."""
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    from kvpolicy.cli import SUBCOMMANDS

    for name in ["list", "generate", "demo", *SUBCOMMANDS]:
        assert f"    {name}" in out and name in out.split("positional arguments")[0]
    assert "``" not in out
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    out = capsys.readouterr().out
    assert "(default: 64)" in out and "(default: fullkv)" in out and "(default: fp32)" in out
    assert "``" not in out and "`kvpolicy list`" not in out


def test_list_shows_whole_sentences_without_markup(capsys):
    """Descriptions are whole first sentences, never cut where the docstring's first line ends."""
    assert main(["list", "--json"]) == 0
    entries = json.loads(capsys.readouterr().out)["entries"]
    for entry in entries:
        assert "``" not in entry["description"] and ":class:" not in entry["description"], entry
    duo = next(e for e in entries if e["name"] == "duoattention" and e["category"] == "cache")
    assert duo["description"].endswith("most recent entries."), duo
    assert main(["list"]) == 0
    assert "``" not in capsys.readouterr().out


def test_list_name_shows_the_measured_settings_of_the_embedded_model(tmp_path):
    """``list fastkv`` says what ``generate`` runs on the embedded model (the shipped measured
    settings), from the kept listing without torch."""
    measured = json.loads(
        (ROOT / "kvpolicy" / "configs" / "SmolLM2-135M-Instruct" / "fastkv.json").read_text()
    )
    chosen = ", ".join(f"{k}={v}" for k, v in measured.items() if k not in ("policy", "name"))
    _run(tmp_path, "list", "--json")  # builds the kept listing
    out, _, probe, _ = _run(tmp_path, "list", "fastkv")
    assert probe == {"code": 0, "torch": False, "transformers": False}
    assert (
        f"on the embedded model SmolLM2-135M-Instruct, generate (and eval, bench, demo) uses the measured {chosen}"
        in out
    )
    out, _, _, _ = _run(tmp_path, "list", "fastkv", "--json")
    assert (
        json.loads(out)["measured"]["SmolLM2-135M-Instruct"]["settings"]["tsp_layer"] == measured["tsp_layer"]
    )


def test_loading_a_model_shows_no_progress_bar(tmp_path, capfd, embedded_tokenizer):
    """transformers' ``Loading weights`` bar is off for kvpolicy's loads, and its setting is restored."""
    from conftest import tiny_llama
    from transformers.utils import logging as hf_logging

    from kvpolicy.models import load_model

    tiny_llama().save_pretrained(tmp_path)
    embedded_tokenizer.save_pretrained(tmp_path)
    capfd.readouterr()
    before = hf_logging.is_progress_bar_enabled()
    model, _ = load_model(str(tmp_path))
    assert model is not None and hf_logging.is_progress_bar_enabled() == before
    captured = capfd.readouterr()
    assert "Loading weights" not in captured.err + captured.out
