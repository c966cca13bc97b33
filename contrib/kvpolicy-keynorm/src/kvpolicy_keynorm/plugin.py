"""What this package registers with kvpolicy.

``pyproject.toml`` names this module under the ``kvpolicy`` entry-point group; kvpolicy loads it
the first time its registry is used and calls these hooks. Each returns the classes it provides,
so ``kvpolicy list`` can show them with this distribution's name and version.
"""

from __future__ import annotations

from kvpolicy.hookspecs import hookimpl

from kvpolicy_keynorm.policy import KeyNorm
from kvpolicy_keynorm.preset import KeyNormPreset


@hookimpl
def kvpolicy_register_components() -> list[type]:
    return [KeyNorm]


@hookimpl
def kvpolicy_register_presets() -> list[type]:
    return [KeyNormPreset]
