"""Named presets: a validated set of settings that builds a :class:`~kvpolicy.interfaces.Policy`.

``kvpolicy.get_policy("fastkv", tsp_rate=0.2, kv_budget=256)`` validates the overrides against the
preset's fields (unknown or out-of-range values are errors naming them) and calls :meth:`build`.
Every preset takes ``kv_budget`` as its cache-budget override.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar

from kvpolicy.config import Settings
from kvpolicy.interfaces import Policy


class Preset(Settings, ABC):
    """Base of named presets. Subclasses set ``kind`` (the registry name) and ``description``."""

    description: ClassVar[str] = ""

    @abstractmethod
    def build(self) -> Policy:
        """The composition these settings describe."""

    def resolved_settings(self, num_layers: int | None = None) -> dict[str, Any]:
        """Every setting as the preset runs on a model of ``num_layers`` layers. Presets that work a
        value out from the model (a default layer) fill it in, so that the name of a run in a table
        or plot title says what ran (``fastkv tsp_layer=14 ...``), not ``tsp_layer=None``."""
        values = self.model_dump()
        own = [name for name in vars(type(self)).get("__annotations__", {}) if name in values]
        return {name: values[name] for name in [*own, *(n for n in values if n not in own)]}
