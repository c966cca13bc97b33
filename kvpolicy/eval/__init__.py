"""Evaluation: needle-in-a-haystack, RULER and LongBench under any policy, as FastKV's reference runs them.

``kvpolicy.eval.run_eval(benchmark, model, tokenizer, policy=..., out=...)`` runs one benchmark and stores
its results (resumable, keyed by the full configuration); ``kvpolicy.eval.compare(dirs, out)`` tabulates
and plots runs side by side. The same from the command line: ``kvpolicy eval needle|ruler|longbench|compare``.
``needle`` holds the needle prompt builder and scores that ``kvpolicy demo`` uses.
"""

from __future__ import annotations

from typing import Any

__all__ = ["EvalResult", "compare", "run_eval"]


def __getattr__(name: str) -> Any:  # imported lazily: `import kvpolicy.eval.needle` stays light
    if name in ("run_eval", "EvalResult"):
        from kvpolicy.eval import runner

        return getattr(runner, name)
    if name == "compare":
        from kvpolicy.eval.report import compare

        return compare
    raise AttributeError(f"module 'kvpolicy.eval' has no attribute {name!r}")
