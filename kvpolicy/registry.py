"""The registry: every policy component, preset and adapter, and who provided it.

Built lazily on first use (importing kvpolicy has no side effects). Built-ins register through the
same hooks as third-party packages; third-party packages are found through the ``kvpolicy``
entry-point group. One failing plugin never takes the others down: it costs one warning naming the
distribution and its error (``KVPOLICY_STRICT_PLUGINS=1`` makes that an error), and
``KVPOLICY_DISABLE_PLUGINS=name,name`` skips plugins by entry-point or distribution name.
"""

from __future__ import annotations

import difflib
import json
import os
import re
import threading
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import pluggy
from pydantic import ValidationError
from torch import nn

from kvpolicy import hookspecs
from kvpolicy.config import Settings
from kvpolicy.hookspecs import PluginWarning
from kvpolicy.interfaces import CachePolicy, Policy, PropagationPolicy
from kvpolicy.storage import KVStorage

BUILTIN = "kvpolicy (built-in)"
ENTRY_POINT_GROUP = hookspecs.PROJECT


class RegistryError(ValueError):
    """A name is unknown, provided twice, or a plugin could not be loaded in strict mode."""


class PolicyConfigError(ValueError):
    """Settings failed validation; the message names each bad field and value."""


@dataclass(frozen=True)
class Entry:
    """One registered thing: its name, the object, and the distribution that provided it."""

    name: str
    obj: Any
    provider: str
    category: str  # "preset", "propagation", "cache" or "adapter"

    @property
    def description(self) -> str:
        doc = getattr(self.obj, "description", "") or (self.obj.__doc__ or "")
        return doc.strip().splitlines()[0] if doc.strip() else ""


class _Clash(Entry):
    """A name two plugins provide, kept only until the registry is built (then dropped)."""


@dataclass
class Registry:
    presets: dict[str, Entry] = field(default_factory=dict)
    components: dict[str, Entry] = field(default_factory=dict)
    adapters: dict[str, Entry] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    def entries(self) -> list[Entry]:
        return [*self.presets.values(), *self.components.values(), *self.adapters.values()]

    def add(self, table: dict[str, Entry], entry: Entry) -> None:
        """Add ``entry``; raise :class:`RegistryError` (and add nothing) for an empty name or a name
        already taken by another object. A clash between two plugins leaves the name marked, so that
        neither is picked silently (the registry drops it when it is built); a built-in keeps its name."""
        if not entry.name:
            raise RegistryError(
                f"{entry.provider} registered a {entry.category} with an empty name "
                f"({_qualname(entry.obj)}: give it a `kind`)"
            )
        other = table.get(entry.name)
        if other is not None and other.obj is not entry.obj:
            if other.provider != BUILTIN:
                table[entry.name] = _Clash(entry.name, other.obj, other.provider, other.category)
            kept = "the built-in is kept" if other.provider == BUILTIN else "neither is used"
            raise RegistryError(
                f"{entry.category} name {entry.name!r} is provided twice: by {other.provider} "
                f"({_qualname(other.obj)}) and by {entry.provider} ({_qualname(entry.obj)}); {kept}: uninstall one "
                "or skip it with KVPOLICY_DISABLE_PLUGINS=<distribution name>"
            )
        table[entry.name] = entry


_lock = threading.Lock()
_registry: Registry | None = None


def get_registry(refresh: bool = False) -> Registry:
    """The process-wide registry, built on first call (or again with ``refresh=True``)."""
    global _registry
    with _lock:
        if _registry is None or refresh:
            _registry = _build()
        return _registry


def reset_registry() -> None:
    """Forget the registry; the next lookup rebuilds it (e.g. after installing a plugin)."""
    global _registry
    with _lock:
        _registry = None


def _qualname(obj: Any) -> str:
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', repr(obj))}"


def _normalize(name: str) -> str:
    """Compare plugin names as pip does (PEP 503): ``KVPolicy_KeyNorm`` is ``kvpolicy-keynorm``."""
    return re.sub(r"[-_.]+", "-", name).lower()


def _disabled() -> set[str]:
    raw = os.environ.get("KVPOLICY_DISABLE_PLUGINS", "")
    return {_normalize(name.strip()) for name in raw.split(",") if name.strip()}


def _problem(registry: Registry, message: str) -> None:
    if os.environ.get("KVPOLICY_STRICT_PLUGINS", "") not in ("", "0"):
        raise RegistryError(message + " (KVPOLICY_STRICT_PLUGINS is set)")
    registry.problems.append(message)
    warnings.warn(message, PluginWarning, stacklevel=3)


def _build() -> Registry:
    import kvpolicy.adapters
    import kvpolicy.policies

    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    providers: dict[str, str] = {}
    for module in (kvpolicy.policies, kvpolicy.adapters):
        name = pm.register(module, name=f"builtin:{module.__name__}")
        providers[str(name)] = BUILTIN

    registry = Registry()
    disabled = _disabled()
    for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
        dist = ep.dist
        dist_label = (
            f"{dist.metadata['Name']} {dist.version}" if dist is not None else "an unknown distribution"
        )
        dist_name = dist.metadata["Name"] if dist is not None else ""
        if _normalize(ep.name) in disabled or (dist_name and _normalize(dist_name) in disabled):
            continue
        try:
            plugin = ep.load()
            plugin_name = pm.register(plugin, name=f"{dist_name or '?'}:{ep.name}")
        except Exception as exc:
            _problem(
                registry,
                f"kvpolicy plugin {ep.name!r} from {dist_label} failed to load: {type(exc).__name__}: {exc}",
            )
            continue
        if plugin_name is not None:
            providers[str(plugin_name)] = dist_label
            if not pm.get_hookcallers(plugin):
                _problem(
                    registry,
                    f"kvpolicy plugin {ep.name!r} from {dist_label} registers nothing: it has no "
                    f"@hookimpl-decorated kvpolicy_register_* function (from kvpolicy.hookspecs import hookimpl)",
                )

    tables = {"preset": registry.presets, "adapter": registry.adapters}
    hooks = (
        ("kvpolicy_register_components", None),
        ("kvpolicy_register_presets", "preset"),
        ("kvpolicy_register_adapters", "adapter"),
    )
    for hook_name, category in hooks:
        # built-ins first: a plugin's name clash is then the plugin's problem, never the built-in's
        impls = sorted(
            getattr(pm.hook, hook_name).get_hookimpls(),
            key=lambda impl: providers.get(impl.plugin_name) != BUILTIN,
        )
        for impl in impls:
            provider = providers.get(impl.plugin_name, impl.plugin_name)
            try:
                provided = list(impl.function())
            except Exception as exc:
                _problem(
                    registry, f"kvpolicy plugin {provider} failed in {hook_name}: {type(exc).__name__}: {exc}"
                )
                continue
            for obj in provided:
                entry = _entry_for(obj, provider, category)
                if entry is None:
                    _problem(
                        registry, f"kvpolicy plugin {provider} registered an unsupported object: {obj!r}"
                    )
                    continue
                try:
                    registry.add(tables.get(entry.category, registry.components), entry)
                except RegistryError as exc:  # one plugin's bad entry costs that entry, not the registry
                    _problem(registry, f"kvpolicy plugin {provider}: {exc}")
    for table in (registry.presets, registry.components, registry.adapters):
        for name in [n for n, e in table.items() if isinstance(e, _Clash)]:
            del table[name]  # two plugins claim it: neither is picked silently
    return registry


def _entry_for(obj: Any, provider: str, category: str | None) -> Entry | None:
    from kvpolicy.adapters.base import DecoderAdapter
    from kvpolicy.presets import Preset

    if not isinstance(obj, type):
        return None
    if category is None:
        if issubclass(obj, PropagationPolicy):
            return Entry(obj.kind, obj, provider, "propagation")
        if issubclass(obj, CachePolicy):
            return Entry(obj.kind, obj, provider, "cache")
        return None
    if category == "preset" and issubclass(obj, Preset):
        return Entry(obj.kind, obj, provider, "preset")
    if category == "adapter" and issubclass(obj, DecoderAdapter):
        return Entry(obj.name, obj, provider, "adapter")
    return None


# -- lookups ------------------------------------------------------------------------------------
def _did_you_mean(name: str, known: Iterable[str]) -> str:
    """``" (did you mean 'x'?)"`` for the closest known name, or nothing when none is close."""
    close = difflib.get_close_matches(name, list(known), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _unknown(what: str, name: str, known: Iterable[str]) -> RegistryError:
    names = sorted(known)
    return RegistryError(
        f"unknown {what} {name!r}{_did_you_mean(name, names)}; known: {', '.join(names) or '(none)'}"
    )


def validate_settings(cls: type[Settings], values: dict[str, Any], label: str | None = None) -> Any:
    """Build ``cls(**values)``, turning pydantic's error into one naming each bad field and value."""
    try:
        return cls(**values)
    except ValidationError as exc:
        raise PolicyConfigError(_explain(label or cls.kind or cls.__name__, exc, cls)) from None


def _explain(label: str, exc: ValidationError, cls: type[Settings] | None = None) -> str:
    parts = []
    fields = list(cls.model_fields) if cls is not None else []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"] if not str(p).startswith(("constrained-", "function-")))
        loc = loc.split(".")[0] if loc else ""
        if err["type"] == "extra_forbidden":
            parts.append(f"unknown setting {loc!r}{_did_you_mean(loc, fields)}")
        elif loc:
            parts.append(f"{loc}={err.get('input')!r}: {err['msg'].removeprefix('Value error, ')}")
        else:
            parts.append(err["msg"].removeprefix("Value error, "))
    unique = list(dict.fromkeys(parts))
    return f"invalid settings for {label}: " + "; ".join(unique)


def preset_class(name: str) -> type:
    registry = get_registry()
    if name not in registry.presets:
        raise _unknown("policy", name, registry.presets)
    return registry.presets[name].obj


def get_policy(name: str, **overrides: Any) -> Policy:
    """The named preset with validated ``overrides``, e.g. ``get_policy("fastkv", kv_budget=256)``.

    ``kv_bits`` (any preset) sets how kept entries are stored, not which are kept: ``16`` (the model's
    dtype), ``8``, ``"fp8"``, ``4``, ``2`` (:class:`~kvpolicy.storage.KVStorage`)."""
    overrides = dict(overrides)
    storage = _storage(name, overrides.pop("kv_bits", None))
    preset = validate_settings(preset_class(name), overrides, label=name)
    try:
        policy = preset.build()  # the components' own validators (e.g. window vs budget) run here
    except ValidationError as exc:
        raise PolicyConfigError(_explain(name, exc)) from None
    return Policy(propagation=policy.propagation, cache=policy.cache, name=name, storage=storage)


def _storage(name: str, value: Any) -> KVStorage:
    """``kv_bits`` as a :class:`KVStorage`, its error a :class:`PolicyConfigError` naming the preset."""
    try:
        return KVStorage.parse(value)
    except (ValueError, ValidationError) as exc:
        raise PolicyConfigError(f"invalid settings for {name}: {exc}") from None


def component_from_dict(data: dict[str, Any]) -> Settings:
    """Rebuild one propagation or cache policy from its ``to_dict()`` form."""
    registry = get_registry()
    values = dict(data)
    kind = values.pop("kind", None)
    if kind not in registry.components:
        raise _unknown("policy component", str(kind), registry.components)
    return validate_settings(registry.components[kind].obj, values)


def policy_from_dict(data: dict[str, Any]) -> Policy:
    """Rebuild a :class:`Policy` from :meth:`Policy.to_dict` output (or a preset reference).

    Accepts ``{"propagation": {...}, "cache": {...}}`` or ``{"policy": "fastkv", ...overrides}``.
    """
    if "policy" in data:
        values = dict(data)
        return get_policy(values.pop("policy"), **values)
    for key in ("propagation", "cache"):
        if key not in data:
            raise PolicyConfigError(f"policy config needs a {key!r} entry (or a 'policy' preset name)")
    prop = component_from_dict(data["propagation"])
    cache = component_from_dict(data["cache"])
    storage = _storage(str(data.get("name") or "policy"), data.get("storage"))
    return Policy(propagation=prop, cache=cache, name=data.get("name"), storage=storage)  # type: ignore[arg-type]


def load_policy_config(path: str | Path) -> Policy:
    """Read a policy config JSON file (see :func:`policy_from_dict`)."""
    p = Path(path)
    try:
        data = json.loads(p.read_text())
    except FileNotFoundError:
        raise PolicyConfigError(f"policy config file not found: {p}") from None
    except json.JSONDecodeError as exc:
        raise PolicyConfigError(f"policy config {p} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise PolicyConfigError(f"policy config {p} must hold a JSON object, got {type(data).__name__}")
    return policy_from_dict(data)


def get_adapter(model: nn.Module) -> Any:
    """An adapter instance for ``model``; an unsupported class gets an error listing supported ones."""
    registry = get_registry()
    for entry in registry.adapters.values():
        if entry.obj.supports(model):
            return entry.obj(model)
    supported = sorted({arch for e in registry.adapters.values() for arch in e.obj.architectures})
    reasons = [
        f"{e.obj.name}: {why}"
        for e in registry.adapters.values()
        if (why := getattr(e.obj, "why_not", lambda _m: None)(model))
    ]
    generic = [e.obj.covers for e in registry.adapters.values() if getattr(e.obj, "covers", None)]
    raise RegistryError(
        f"unsupported model class {type(model).__name__}"
        + (f" ({'; '.join(reasons)})" if reasons else "")
        + f"; supported architectures: {', '.join(supported)}"
        + (f", and {'; '.join(generic)}" if generic else "")
    )
