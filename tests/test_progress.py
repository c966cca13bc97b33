"""Progress where people look: plain lines with elapsed time and an estimate when the output is not a
terminal (logs, CI), a bar in a terminal, nothing when quiet."""

from __future__ import annotations

import io

from rich.console import Console

import kvpolicy.progress as progress
from kvpolicy.progress import track


class Clock:
    now = 0.0

    def __call__(self) -> float:
        return self.now


def test_plain_lines_with_an_estimate_when_not_a_terminal(monkeypatch):
    clock = Clock()
    monkeypatch.setattr(progress.time, "monotonic", clock)
    out = io.StringIO()
    console = Console(file=out, force_terminal=False)
    with track("eval needle", 4, console=console) as p:
        p.describe("sample-0")
        for _ in range(4):
            clock.now += 15.0  # an item every 15 s: a line at most every 10 s
            p.advance()
    lines = out.getvalue().splitlines()
    assert lines[0] == "eval needle: 0/4 (0 %), 0:00 elapsed"  # at once: the work has started
    # an estimate as soon as one item finished: elapsed per item times the items left
    assert lines[1] == "eval needle: sample-0: 1/4 (25 %), 0:15 elapsed, about 0:45 left", lines
    assert lines[-1].startswith("eval needle: sample-0: 4/4 (100 %), 1:00 elapsed")  # always the end


def test_a_resumed_run_estimates_from_this_run_only(monkeypatch):
    clock = Clock()
    monkeypatch.setattr(progress.time, "monotonic", clock)
    tracker = progress.Tracker("eval", 10, 8, None, None, None)  # 8 done before this run
    clock.now = 10.0
    tracker.done = 9  # one item in 10 s, one left
    assert tracker.eta() == "0:10 elapsed, about 0:10 left"


def test_quiet_prints_nothing(capsys):
    out = io.StringIO()
    with track("bench", 3, quiet=True, console=Console(file=out)) as p:
        p.advance(3)
    assert out.getvalue() == "" and capsys.readouterr().err == ""


def test_a_terminal_gets_a_bar_with_the_estimate_in_its_description():
    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=120)
    with track("demo", 2, console=console) as p:
        p.advance()
        assert p.bar is not None and "elapsed" in p.bar.tasks[0].description
        p.advance()
