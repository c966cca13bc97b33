"""CPU threads and machine load, reported beside every timing (``--threads`` on demo, bench, generate).

Why: torch uses one thread per core by default. On a shared machine (other jobs on the same two cores)
those threads wait on each other: decode on the embedded model was measured at 728-1,498 ms per token
with torch's default threads against 128-134 ms with one thread (40-62 ms on a quiet machine), and
FastKV decoded slower than full KV. A timing without the threads and the load beside it cannot be read.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch


def cores() -> int:
    """CPU cores this process may run on (its affinity, where the OS says; else all of them)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def set_threads(threads: int | None) -> int:
    """Use ``threads`` intra-op threads (``None``: leave torch's choice); returns the count in force.
    A value below 1 raises, naming it."""
    if threads is not None:
        if threads < 1:
            raise ValueError(f"--threads must be >= 1, got {threads}")
        torch.set_num_threads(threads)
    return torch.get_num_threads()


@dataclass(frozen=True)
class CpuLoad:
    """The threads torch uses, the machine's 1-minute load average and its cores, read once."""

    threads: int
    load: float | None
    cores: int

    @classmethod
    def now(cls) -> CpuLoad:
        try:
            load: float | None = os.getloadavg()[0]
        except (AttributeError, OSError):  # no load average on this OS
            load = None
        return cls(threads=torch.get_num_threads(), load=load, cores=cores())

    @property
    def busy(self) -> bool:
        """The load exceeds the cores: other work competes for them, timings are unreliable."""
        return self.load is not None and self.load > self.cores

    def describe(self) -> str:
        load = "unknown" if self.load is None else f"{self.load:.1f}"
        return f"{self.threads} thread{'s' if self.threads != 1 else ''}, load {load} on {self.cores} cores"

    def warning(self) -> str | None:
        """What to tell a user whose machine is busier than its cores, or ``None``."""
        if not self.busy:
            return None
        advice = (
            f"; with {self.threads} threads each step waits on the busiest core (try --threads 1)"
            if self.threads > 1
            else ""
        )
        return (
            f"warning: the machine's load ({self.load:.1f}) exceeds its {self.cores} cores: other jobs share "
            f"the CPU, so these timings are slower and noisier than on a quiet machine{advice}"
        )


def report(console: Any) -> CpuLoad:
    """Print what the timings above were taken under (and the warning, on a busy machine) to a rich
    ``console``; returns the reading (for a JSON record)."""
    cpu = CpuLoad.now()
    console.print(f"timed on {cpu.describe()}", markup=False)
    if cpu.warning():
        console.print(cpu.warning(), style="yellow", markup=False)
    return cpu
