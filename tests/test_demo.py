"""``kvpolicy demo``'s table: full KV, SnapKV and FastKV calibrated and with its cache cut, the KV each
keeps beside full KV's, and the threads and machine load the timings were taken under (on a tiny model
with the embedded model's tokenizer: the rows, not the accuracy, are under test here)."""

from __future__ import annotations

import pytest

from kvpolicy.demo import demo_policies, run_demo
from kvpolicy.threads import CpuLoad, set_threads


def test_demo_rows_show_both_halves_of_fastkv(embedded_tokenizer, haystack, tmp_path, capsys, single_thread):
    from conftest import tiny_llama_for

    from kvpolicy.models import embedded_model_dir

    (tmp_path / "essay.txt").write_text(haystack[:20000])
    model = tiny_llama_for(embedded_tokenizer, layers=30)  # the embedded model's depth: TSP layer 23 exists
    model.config.name_or_path = str(
        embedded_model_dir()
    )  # so the measured settings apply, as on the real one
    rows = dict(demo_policies(model))
    calibrated, cut = rows["FastKV (calibrated)"].policy, rows["FastKV (KV 0.5)"].policy
    assert calibrated.propagation == cut.propagation  # the same measured TSP (layer 23, rate 0.1) ...
    assert calibrated.cache.budget == 1.0 and cut.cache.budget == 0.5  # ... the cache cut only in one
    assert run_demo(model, embedded_tokenizer, length=300, n_depths=1, haystack_dir=tmp_path) == 0
    out = capsys.readouterr().out
    for label in ("full KV", "SnapKV", "FastKV (calibrated)", "FastKV (KV 0.5)"):
        assert label in out
    assert "timed on" in out and "load" in out


def test_threads_and_load_are_reported_and_checked():
    before = set_threads(None)
    try:
        assert set_threads(1) == 1
        cpu = CpuLoad.now()
        assert cpu.threads == 1 and cpu.cores >= 1
        assert cpu.describe().startswith("1 thread, load ")
        busy = CpuLoad(threads=2, load=7.5, cores=2)
        assert (
            busy.busy
            and "load (7.5) exceeds its 2 cores" in busy.warning()
            and "--threads 1" in busy.warning()
        )
        assert CpuLoad(threads=2, load=0.5, cores=2).warning() is None
        assert "--threads 1" not in CpuLoad(threads=1, load=7.5, cores=2).warning()
        with pytest.raises(ValueError, match="--threads must be >= 1, got 0"):
            set_threads(0)
    finally:
        set_threads(before)
