"""Splitting one evaluation across processes or machines: ``--shard i/n``.

Shard ``i`` of ``n`` (0-based) runs every ``n``-th sample starting at ``i``, in a run folder of its
own (keyed by the whole run's configuration plus the shard), so shards never write the same files and
each resumes on its own. ``kvpolicy eval compare`` merges the shards of one configuration into one
row, marked unfinished until every shard is complete. ``--shard env`` takes ``i/n`` from the launcher:
``RANK``/``WORLD_SIZE`` (``torchrun``, ``accelerate launch``) or a Slurm job array
(``SLURM_ARRAY_TASK_ID - SLURM_ARRAY_TASK_MIN`` of ``SLURM_ARRAY_TASK_COUNT``).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping

Shard = tuple[int, int]

_SPEC = re.compile(r"^\s*(\d+)\s*/\s*(\d+)\s*$")


def parse_shard(spec: str | Shard | None, environ: Mapping[str, str] | None = None) -> Shard | None:
    """``(index, count)`` from ``"i/n"``, ``(i, n)``, ``"env"`` or ``None`` (no sharding).

    ``1/1`` is the whole run and returns ``None``, so it shares the unsharded run's folder.
    """
    if spec is None:
        return None
    if isinstance(spec, str) and spec.strip() == "env":
        return _from_env(os.environ if environ is None else environ)
    if isinstance(spec, str):
        match = _SPEC.match(spec)
        if not match:
            raise ValueError(f"--shard {spec!r}: expected i/n (0-based shard i of n, e.g. 0/4) or 'env'")
        index, count = int(match[1]), int(match[2])
    else:
        index, count = spec
    if count < 1 or not 0 <= index < count:
        raise ValueError(
            f"--shard {index}/{count}: the shard index must be in 0..{count - 1} (0-based) and n >= 1"
        )
    return None if count == 1 else (index, count)


def _from_env(env: Mapping[str, str]) -> Shard | None:
    if "WORLD_SIZE" in env and "RANK" in env:
        return parse_shard(f"{env['RANK']}/{env['WORLD_SIZE']}")
    if "SLURM_ARRAY_TASK_ID" in env and "SLURM_ARRAY_TASK_COUNT" in env:
        first = int(env.get("SLURM_ARRAY_TASK_MIN", "0"))
        return parse_shard(f"{int(env['SLURM_ARRAY_TASK_ID']) - first}/{env['SLURM_ARRAY_TASK_COUNT']}")
    raise ValueError(
        "--shard env: found neither RANK and WORLD_SIZE (torchrun, accelerate launch) nor "
        "SLURM_ARRAY_TASK_ID and SLURM_ARRAY_TASK_COUNT (a Slurm job array) in the environment"
    )


def local_device(environ: Mapping[str, str] | None = None) -> str | None:
    """``cuda:<LOCAL_RANK>`` when a launcher started one process per GPU and CUDA is there, else None."""
    env = os.environ if environ is None else environ
    if "LOCAL_RANK" not in env:
        return None
    import torch

    return f"cuda:{int(env['LOCAL_RANK'])}" if torch.cuda.is_available() else None
