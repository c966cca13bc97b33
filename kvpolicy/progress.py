"""Progress of long work (demo, eval, bench) where people look: a bar in a terminal, plain lines in a log.

Why not rich's bar alone: when the output is not a terminal (CI logs, ``nohup``, a pipe), rich shows
nothing until the end, so minutes of work look like a hang; and its remaining-time column reads
``-:--:--`` until its speed estimate settles, which with a few slow items is most of the run. Here the
estimate is the plain one, elapsed time per finished item times the items left, shown from the first
finished item on, in the bar's description and in the plain lines (at most one every
:data:`LOG_EVERY` seconds, and one at the end).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

#: Seconds between plain progress lines when the output is not a terminal.
LOG_EVERY = 10.0


def _clock(seconds: float) -> str:
    whole = round(seconds)
    hours, rest = divmod(whole, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


class Tracker:
    """What the work reports: :meth:`advance` after each item, :meth:`describe` for what runs now."""

    def __init__(self, label: str, total: int, completed: int, console: Any, bar: Any, task: Any) -> None:
        self.label, self.total, self.done = label, total, completed
        self.start_done = completed
        self.console, self.bar, self.task = console, bar, task
        self.start = self.last_line = time.monotonic()
        self.what = ""

    def eta(self) -> str:
        """``elapsed, about M:SS left`` (the estimate from the items finished in this run)."""
        elapsed = time.monotonic() - self.start
        text = f"{_clock(elapsed)} elapsed"
        finished = self.done - self.start_done
        if finished > 0 and self.done < self.total:
            text += f", about {_clock(elapsed / finished * (self.total - self.done))} left"
        return text

    def status(self) -> str:
        share = f" ({100 * self.done // self.total} %)" if self.total else ""
        now = f": {self.what}" if self.what else ""
        return f"{self.label}{now}: {self.done}/{self.total}{share}, {self.eta()}"

    def describe(self, what: str) -> None:
        self.what = what
        self._show(force=False)

    def advance(self, n: int = 1) -> None:
        self.done += n
        self._show(force=self.done >= self.total)

    def _show(self, force: bool) -> None:
        if self.bar is not None:
            self.bar.update(
                self.task, completed=self.done, description=f"{self.label} {self.what} [{self.eta()}]"
            )
        elif self.console is not None and (force or time.monotonic() - self.last_line >= LOG_EVERY):
            self.last_line = time.monotonic()
            print(self.status(), file=self.console, flush=True)


@contextmanager
def track(
    label: str, total: int, completed: int = 0, quiet: bool = False, console: Any = None
) -> Iterator[Tracker]:
    """Report progress of ``total`` items (``completed`` already done, e.g. a resumed eval).

    ``console``: a rich Console (its file decides terminal or not) or ``None`` for stderr. ``quiet``:
    report nothing. In a terminal a transient bar; elsewhere plain lines to the console's file."""
    if quiet:
        yield Tracker(label, total, completed, None, None, None)
        return
    stream = getattr(console, "file", None) or sys.stderr
    terminal = console.is_terminal if console is not None else stream.isatty()
    if not terminal:
        tracker = Tracker(label, total, completed, stream, None, None)
        print(tracker.status(), file=stream, flush=True)
        yield tracker
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    columns = [TextColumn("[progress.description]{task.description}"), BarColumn(), MofNCompleteColumn()]
    with Progress(*columns, console=console, transient=True) as bar:
        task = bar.add_task(label, total=total, completed=completed)
        tracker = Tracker(label, total, completed, console, bar, task)
        tracker._show(force=True)
        yield tracker
