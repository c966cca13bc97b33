"""Plugin hooks: how built-in and third-party packages register what they provide.

A package exposes a module (or object) with ``@hookimpl`` functions under the ``kvpolicy``
entry-point group::

    [project.entry-points.kvpolicy]
    keynorm = "kvpolicy_keynorm.plugin"

Each hook *returns* what it registers (as conda's and llm's do), so the registry can attribute every
name to the distribution that provided it and isolate a failing plugin.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    from kvpolicy.adapters.base import DecoderAdapter
    from kvpolicy.interfaces import CachePolicy, PropagationPolicy
    from kvpolicy.presets import Preset

PROJECT = "kvpolicy"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


class PluginWarning(UserWarning):
    """A plugin failed to load or register; the other plugins still work. (Defined here, with the
    plugin contract, so that the CLI can filter it without loading the registry.)"""


@hookspec
def kvpolicy_register_components() -> Sequence[type[PropagationPolicy] | type[CachePolicy]]:
    """Propagation and cache policy classes, addressable by their ``kind`` (e.g. ``"tsp"``)."""
    raise NotImplementedError


@hookspec
def kvpolicy_register_presets() -> Sequence[type[Preset]]:
    """Named compositions (e.g. ``"fastkv"``) that :func:`kvpolicy.get_policy` builds."""
    raise NotImplementedError


@hookspec
def kvpolicy_register_adapters() -> Sequence[type[DecoderAdapter]]:
    """Model-family adapters."""
    raise NotImplementedError
