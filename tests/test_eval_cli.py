"""``kvpolicy eval``: a tiny slice of each benchmark end to end through the command line (a tiny random
Llama saved with the embedded model's tokenizer), policy options, compare, and resume after SIGKILL."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest
from conftest import tiny_llama_for

from kvpolicy.cli import main
from kvpolicy.eval.tasks import NeedleTask


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A tiny random Llama plus the real SmolLM2 tokenizer, saved where ``--model`` can load it."""
    from transformers import AutoTokenizer

    from kvpolicy.models import embedded_model_dir

    tokenizer = AutoTokenizer.from_pretrained(embedded_model_dir())
    path = tmp_path_factory.mktemp("tiny-llama")
    tiny_llama_for(tokenizer).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _meta(out, benchmark):
    (run_json,) = (out / benchmark).glob("*/run.json")
    return json.loads(run_json.read_text()), run_json.parent


def _records(run_dir):
    return [json.loads(line) for line in (run_dir / "records.jsonl").read_text().splitlines()]


def test_needle_slice_with_policy_options(tiny_dir, tmp_path):
    out = tmp_path / "out"
    argv = ["eval", "needle", "--model", str(tiny_dir), "--policy", "fastkv", "--kv-budget", "64"]
    argv += ["--tsp-rate", "0.5", "--tsp-layer", "2", "--lengths", "256", "--depths", "2"]
    argv += ["--max-new-tokens", "4", "--out", str(out), "--quiet"]
    assert main(argv) == 0
    meta, run_dir = _meta(out, "needle")
    # every resolved setting names the run, the user's and the preset's defaults alike
    assert meta["label"] == "fastkv tsp_layer=2 tsp_rate=0.5 kv_budget=64 window=8 kernel=7 pooling=max"
    assert run_dir.name.startswith("fastkv_kv_budget=64_tsp_layer=2_tsp_rate=0.5-")  # what the user gave
    assert meta["policy"]["cache"]["budget"] == 64
    assert meta["policy"]["propagation"]["layer"] == 2 and meta["policy"]["propagation"]["rate"] == 0.5
    assert meta["model"]["name"] == str(tiny_dir)
    assert {"python", "torch", "transformers", "kvpolicy"} <= set(meta["versions"])
    assert "git" in meta and meta["status"] == "complete"
    assert len(_records(run_dir)) == 2


def test_ruler_slice_every_task(tiny_dir, tmp_path):
    out = tmp_path / "out"
    argv = ["eval", "ruler", "--model", str(tiny_dir), "--policy", "snapkv", "--kv-budget", "128"]
    argv += ["--lengths", "768", "--samples", "1", "--max-new-tokens", "3", "--out", str(out), "--quiet"]
    assert main(argv) == 0
    meta, run_dir = _meta(out, "ruler")
    records = _records(run_dir)
    assert sorted(r["task"] for r in records) == sorted(meta["config"]["settings"]["tasks"])
    assert len(records) == 11 and all(r["prompt_tokens"] <= 768 and r["reference"] for r in records)
    assert set(meta["summary"]["by_task"]) == {r["task"] for r in records}


def test_longbench_slice(tiny_dir, tmp_path):
    data = tmp_path / "lb"
    data.mkdir()
    rows = [
        {
            "input": f"Which river is number {i}?",
            "context": " ".join(f"Passage {j}: river {j} flows north." for j in range(30)),
            "answers": [f"river {i}"],
            "length": 300,
            "dataset": "hotpotqa",
            "language": "en",
            "all_classes": None,
            "_id": f"id{i}",
        }
        for i in range(3)
    ]
    (data / "hotpotqa.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\nnot json\n")
    out = tmp_path / "out"
    argv = ["eval", "longbench", "--model", str(tiny_dir), "--data-dir", str(data), "--samples", "2"]
    argv += ["--max-new-tokens", "3", "--out", str(out), "--quiet"]
    assert main(argv) == 0
    meta, run_dir = _meta(out, "longbench")
    assert [r["_id"] for r in _records(run_dir)] == ["id0", "id1"]
    assert meta["data_notes"]["malformed_lines"]["hotpotqa"]["count"] == 1
    assert main([*argv, "--strict"]) == 2  # the malformed line is now an error naming it


def test_policy_config_and_errors(tiny_dir, tmp_path, capsys):
    import kvpolicy

    config = tmp_path / "mine.json"
    policy = kvpolicy.get_policy("snapkv", kv_budget=48)
    config.write_text(json.dumps(policy.to_dict()))
    out = tmp_path / "out"
    base = ["eval", "needle", "--model", str(tiny_dir), "--lengths", "256", "--depths", "1"]
    base += ["--max-new-tokens", "2", "--out", str(out), "--quiet"]
    assert main([*base, "--policy-config", str(config)]) == 0
    meta, _ = _meta(out, "needle")
    assert meta["label"] == "mine" and meta["policy"] == policy.to_dict()

    assert main([*base, "--policy", "nosuchpolicy"]) == 2
    assert "unknown policy 'nosuchpolicy'" in capsys.readouterr().err
    assert main([*base, "--policy", "snapkv", "--kv-budget", "-3"]) == 2
    assert "invalid settings for snapkv" in capsys.readouterr().err
    assert main([*base, "--policy-config", str(config), "--kv-budget", "64"]) == 2
    assert "--policy-config takes no policy options" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["eval", "compare", str(out), "--kv-budget", "64"])


def test_third_party_policy_by_name(tiny_dir, tmp_path, monkeypatch):
    from kvpolicy.interfaces import Policy
    from kvpolicy.policies.full import AllTokens
    from kvpolicy.policies.snapkv import SnapKV
    from kvpolicy.presets import Preset
    from kvpolicy.registry import Entry, get_registry

    class TinySnap(Preset):
        """A third-party preset, registered as a plugin's would be."""

        kind = "tiny-snap"
        kv_budget: int = 40

        def build(self) -> Policy:
            return Policy(AllTokens(), SnapKV(budget=self.kv_budget))

    monkeypatch.setitem(
        get_registry().presets, "tiny-snap", Entry("tiny-snap", TinySnap, "example-plugin 1.0", "preset")
    )
    out = tmp_path / "out"
    argv = ["eval", "needle", "--model", str(tiny_dir), "--policy", "tiny-snap", "--kv-budget", "24"]
    argv += ["--lengths", "256", "--depths", "1", "--max-new-tokens", "2", "--out", str(out), "--quiet"]
    assert main(argv) == 0
    meta, _ = _meta(out, "needle")
    assert meta["policy"]["name"] == "tiny-snap" and meta["policy"]["cache"]["budget"] == 24


def test_compare_table_and_plots(tiny_dir, tmp_path, capsys):
    out = tmp_path / "out"
    common = ["--model", str(tiny_dir), "--max-new-tokens", "2", "--out", str(out), "--quiet"]
    for policy in (["--policy", "fullkv"], ["--policy", "snapkv", "--kv-budget", "64"]):
        assert main(["eval", "needle", *policy, "--lengths", "256", "384", "--depths", "2", *common]) == 0
    assert (
        main(
            [
                "eval",
                "ruler",
                "--tasks",
                "niah_single_1",
                "fwe",
                "--lengths",
                "512",
                "--samples",
                "1",
                *common,
            ]
        )
        == 0
    )
    capsys.readouterr()
    assert main(["eval", "compare", str(out), "--out", str(tmp_path / "cmp")]) == 0
    printed = capsys.readouterr().out
    assert "fullkv" in printed and "snapkv kv_budget=64 window=8 kernel=7 pooling=max" in printed
    md = (tmp_path / "cmp" / "compare.md").read_text()
    assert "## needle" in md and "## ruler" in md
    needle_rows = [
        line for line in md.splitlines() if line.startswith("| fullkv") or line.startswith("| snapkv")
    ]
    assert len(needle_rows) == 3  # two needle runs, one RULER run
    for name in (
        "needle-fullkv.png",
        "needle-snapkv_kv_budget=64_window=8_kernel=7_pooling=max.png",
        "needle-by-length.png",
        "ruler-by-task.png",
    ):
        assert (tmp_path / "cmp" / name).stat().st_size > 1000


def test_sigkill_mid_run_then_resume(tiny_dir, tmp_path):
    """Kill an eval process with SIGKILL mid-run; rerunning finishes it without losing or redoing samples."""
    out = tmp_path / "out"
    args = ["eval", "needle", "--model", str(tiny_dir), "--lengths", "256", "384", "512", "--depths", "6"]
    args += ["--max-new-tokens", "12", "--out", str(out), "--quiet"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "kvpolicy.cli", *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    deadline = time.monotonic() + 180
    done_before = 0
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            files = list(out.glob("needle/*/records.jsonl"))
            if files and files[0].read_bytes().count(b"\n") >= 2:
                break
            time.sleep(0.01)
    finally:
        proc.send_signal(signal.SIGKILL)
        stderr = proc.communicate()[1].decode()
    assert proc.returncode == -signal.SIGKILL, f"the eval ended before it was killed: {stderr[-2000:]}"
    meta, run_dir = _meta(out, "needle")
    assert meta["status"] == "running"
    done_before = (run_dir / "records.jsonl").read_bytes().count(b"\n")
    expected = [i.id for i in NeedleTask(lengths=[256, 384, 512], depths=6).items()]
    assert 2 <= done_before < len(expected)

    assert main(args) == 0
    meta, _ = _meta(out, "needle")
    ids = [r["id"] for r in _records(run_dir)]
    assert ids == expected  # every sample once, in order: nothing lost, nothing repeated
    assert meta["status"] == "complete" and meta["history"][-1]["resumed_from"] == done_before
    assert meta["summary"]["n"] == len(expected)
