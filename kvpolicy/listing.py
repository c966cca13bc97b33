"""What ``kvpolicy list`` prints, kept so that the command answers without loading torch.

Listing the registry means loading every plugin, and every policy module imports torch (about two
seconds before anything prints). The listing is a pure function of the installed packages and the
plugins' source files, so the last complete one is kept in ``$KVPOLICY_CACHE/listing.json`` under a
fingerprint of exactly those inputs: the interpreter, every ``sys.path`` folder's modification time
(an install or uninstall changes it), the ``kvpolicy`` entry points with their distributions'
versions, the modification time of every file of kvpolicy and of each plugin's package (an edit to an
editable install), and the plugin environment variables. Any change rebuilds it. A listing with plugin
problems is never kept, so a broken plugin is reported on every call until it is fixed; a process
that has already built its registry lists that one.

The kept listing also answers the first question of ``generate``, ``eval`` and ``bench``: is the
policy name known, and are its settings plausible? :func:`check_policy` refuses an unknown name, an
unknown setting, and a value that is surely out of range (from each setting's JSON schema and the
budget rule), with the message the full validation gives, before torch is imported; whatever it
cannot decide without the preset's own validators is left to them (``kernel`` odd, ``window`` within
the budget).
"""

from __future__ import annotations

import difflib
import hashlib
import importlib.util
import json
import math
import os
import re
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

#: Bumped when the shape of the kept listing changes.
_FORMAT = 3
_GROUP = "kvpolicy"
_ENV = ("KVPOLICY_STRICT_PLUGINS", "KVPOLICY_DISABLE_PLUGINS")


#: The option every preset takes beside its own settings: how kept entries are stored (``kv_bits``,
#: :class:`kvpolicy.storage.KVStorage`; named here too so the listing stays free of torch).
STORAGE_OPTION = "kv_bits"
#: What ``kv_bits`` reads (lower-cased text): the model's dtype, int8, fp8 e4m3, and 4 and 2 bits in KIVI's
#: layout (the default: keys per channel, a full-precision residual of recent entries) or per token (int4,
#: int2).
STORAGE_WIDTHS = {
    **{"16": 16, "8": 8, "int8": 8, "fp8": 8, "4": 4, "int4": 4, "2": 2, "int2": 2},
    **{"kivi4": 4, "kivi2": 2},
}


def storage_problem(value: object) -> str | None:
    """Why ``kv_bits=value`` is not a storage width (``None``: it is), in the words
    :meth:`kvpolicy.storage.KVStorage.parse` raises too."""
    if value is None or (not isinstance(value, bool) and str(value).strip().lower() in STORAGE_WIDTHS):
        return None
    return (
        f"kv_bits={value!r} is not a storage width; use one of 16 (the model's dtype), 8 or 'int8', "
        f"'fp8' (e4m3), 4 or 'kivi4' (KIVI's layout), 'int4' (per token), 2 or 'kivi2', 'int2'"
    )


def _tree_stamp(root: Path, out: list[str]) -> None:
    if root.is_file():
        out.append(f"{root}:{root.stat().st_mtime_ns}")
        return
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d != "__pycache__")
        for name in sorted(files):
            if name.endswith((".py", ".json")):
                path = os.path.join(folder, name)
                out.append(f"{path}:{os.stat(path).st_mtime_ns}")


def _source_roots(module: str) -> list[Path]:
    """The file or folders of ``module``'s top-level package (every portion of a namespace package),
    found without importing it."""
    try:
        spec = importlib.util.find_spec(module.split(".")[0])
    except (ImportError, ValueError):
        return []
    if spec is None:
        return []
    if spec.submodule_search_locations:
        return [Path(p) for p in spec.submodule_search_locations]
    return [Path(spec.origin)] if spec.origin else []


def fingerprint() -> str:
    """A digest of everything the listing depends on (see the module docstring)."""
    parts = [sys.executable, sys.version, str(_FORMAT), *(f"{k}={os.environ.get(k, '')}" for k in _ENV)]
    for entry in sys.path:
        if not entry or Path(entry).resolve() == Path.cwd().resolve():
            parts.append(entry)  # the working folder: its own edits say nothing about plugins
            continue
        try:
            parts.append(f"{entry}:{os.stat(entry or '.').st_mtime_ns}")
        except OSError:
            parts.append(f"{entry}:-")
    # kvpolicy's own built-ins: the package and its sub-packages that live elsewhere in a checkout
    # (policies/ and adapters/ at the repository root)
    roots = [Path(__file__).resolve().parent]
    for sub in ("kvpolicy.policies", "kvpolicy.adapters"):
        spec = importlib.util.find_spec(sub)  # imports kvpolicy (light), not the sub-package
        roots += [Path(p) for p in (spec.submodule_search_locations or [])] if spec else []
    for ep in sorted(metadata.entry_points(group=_GROUP), key=lambda e: (e.name, e.value)):
        dist = ep.dist
        label = f"{dist.metadata['Name']}=={dist.version}" if dist is not None else "?"
        parts.append(f"{ep.name}={ep.value}@{label}")
        roots += _source_roots(ep.value.split(":")[0])
    for root in roots:
        _tree_stamp(root, parts)
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def build() -> dict[str, Any]:
    """The listing from the registry itself (loads every plugin)."""
    from dataclasses import asdict

    from kvpolicy.coverage import recorded
    from kvpolicy.describe import describe_preset, measured_settings, preset_settings, summary
    from kvpolicy.models import EMBEDDED
    from kvpolicy.registry import get_registry

    registry = get_registry()
    entries = [
        {"name": e.name, "category": e.category, "provider": e.provider, "description": summary(e.obj)}
        for e in registry.entries()
    ]
    presets = {
        name: {
            "text": describe_preset(name),
            "settings": [asdict(s) for s in preset_settings(entry.obj)],
            "measured": measured_settings(name),
            "checks": _checks(entry.obj),
        }
        for name, entry in registry.presets.items()
    }
    results = recorded()
    architectures = {
        "covered": {r.model_type: r.architecture for r in results.values() if r.status == "covered"},
        "refused": {r.model_type: r.detail for r in results.values() if r.status == "refused"},
    }
    return {
        "entries": entries,
        "presets": presets,
        "embedded_model": EMBEDDED.name,
        "architectures": architectures,
        "problems": list(registry.problems),
    }


def _path() -> Path:
    from kvpolicy.fetch import cache_root

    return cache_root() / "listing.json"


def listing() -> dict[str, Any]:
    """The listing: the registry's own when this process has built it, else the kept one when its
    fingerprint still matches, else built (and kept when no plugin had a problem)."""
    registry_module = sys.modules.get("kvpolicy.registry")
    if registry_module is not None and getattr(registry_module, "_registry", None) is not None:
        return build()
    key = fingerprint()
    path = _path()
    try:
        kept = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(kept, dict) and kept.get("fingerprint") == key:
            return kept
    except (OSError, ValueError):
        pass
    data = build()
    if not data["problems"]:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            staged = path.with_name(f".{path.name}.{os.getpid()}")
            staged.write_text(json.dumps({**data, "fingerprint": key}), encoding="utf-8")
            os.replace(staged, path)
        except OSError:
            pass  # a read-only cache costs speed, never the listing
    return data


# -- answering from the listing, without torch ------------------------------------------------------
class SettingsError(ValueError):
    """An unknown policy, an unknown setting or a value out of range, found from the kept listing."""


def plain(text: str) -> str:
    """reST markup as plain text, for what users read: ``x`` -> x, :func:`y` -> y."""
    return re.sub(r":\w+:`~?([^`]+)`", r"\1", text).replace("``", "")


def did_you_mean(name: str, known: Any) -> str:
    """``" (did you mean 'x'?)"`` for the closest known name (as :mod:`kvpolicy.registry` says it)."""
    close = difflib.get_close_matches(name, list(known), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def unknown(what: str, name: str, known: Any) -> SettingsError:
    """The registry's unknown-name error, word for word (``kvpolicy.registry._unknown``)."""
    names = sorted(known)
    return SettingsError(
        f"unknown {what} {name!r}{did_you_mean(name, names)}; known: {', '.join(names) or '(none)'}"
    )


def _uses(annotation: Any, func: Any) -> bool:
    """Whether ``annotation`` (or a type inside it) carries a validator calling ``func``."""
    from typing import get_args

    if getattr(annotation, "func", None) is func:
        return True
    return any(_uses(arg, func) for arg in get_args(annotation))


def _checks(preset: type) -> dict[str, Any]:
    """Per setting of ``preset``: its JSON schema and whether it is a budget (``kvpolicy.config.Budget``,
    whose own validator words the errors). A setting whose schema cannot be made gets none (only its
    name is checked)."""
    from kvpolicy.config import _check_budget

    try:
        properties = preset.model_json_schema().get("properties", {})
    except Exception:
        properties = {}
    return {
        name: {
            "schema": properties.get(name),
            "budget": any(_uses(m, _check_budget) for m in [field.annotation, *field.metadata]),
        }
        for name, field in preset.model_fields.items()
    }


def _number(value: Any) -> str:
    """A bound as pydantic words it: ``1.0`` -> ``1``, ``0.5`` -> ``0.5``."""
    return str(int(value)) if isinstance(value, float) and value.is_integer() else str(value)


def _budget_problem(value: Any) -> str | None:
    """``kvpolicy.config._check_budget``'s message for ``value``, or ``None`` when it passes (kept word
    for word with it; ``tests/test_first_contact.py`` compares the two)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return (
            "a budget is a token count (an int >= 1) or a fraction of the prompt (a float in (0, 1]), "
            f"got {type(value).__name__} {value!r}"
        )
    if isinstance(value, int) and value < 1:
        return f"a token budget must be at least 1, got {value}"
    if isinstance(value, float) and not 0.0 < value <= 1.0:
        hint = (
            f" (for {int(value)} tokens write the int {int(value)})"
            if value > 1 and value.is_integer()
            else ""
        )
        return f"a fractional budget must lie in (0, 1], got {value}{hint}"
    return None


def _value_problem(check: dict[str, Any], value: Any) -> str | None:
    """Pydantic's message for a value that surely fails ``check``; ``None`` when it passes or when the
    schema alone cannot tell (a bool, a float for an int, a union of several types, a validator of the
    preset's own): the full validation decides those."""
    schema = check.get("schema") or {}
    branches = schema.get("anyOf")
    if branches is not None:
        if value is None and {"type": "null"} in branches:
            return None
        others = [b for b in branches if b != {"type": "null"}]
        if check.get("budget"):
            return _budget_problem(value)
        if len(others) != 1:
            return None
        schema = others[0]
    elif check.get("budget"):
        return _budget_problem(value)
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        return None
    if "enum" in schema:
        options = [repr(v) for v in schema["enum"]]
        if value in schema["enum"] or not all(isinstance(v, str) for v in schema["enum"]):
            return None
        listed = options[0] if len(options) == 1 else f"{', '.join(options[:-1])} or {options[-1]}"
        return f"Input should be {listed}"
    kind = schema.get("type")
    if (
        isinstance(value, str)
        or kind not in ("integer", "number")
        or (kind == "integer" and isinstance(value, float))
    ):
        return None
    if isinstance(value, float) and math.isnan(value):
        return None
    for key, words, fails in (
        ("exclusiveMinimum", "greater than", lambda v, b: not v > b),
        ("minimum", "greater than or equal to", lambda v, b: not v >= b),
        ("exclusiveMaximum", "less than", lambda v, b: not v < b),
        ("maximum", "less than or equal to", lambda v, b: not v <= b),
    ):
        bound = schema.get(key)
        if isinstance(bound, (int, float)) and fails(value, bound):
            return f"Input should be {words} {_number(bound)}"
    return None


def check_policy(name: str, options: dict[str, Any], data: dict[str, Any] | None = None) -> None:
    """Refuse preset ``name`` with ``options`` where the kept listing can tell it is wrong, with the
    error the registry would give (:class:`SettingsError`); pass everything else on to it."""
    data = listing() if data is None else data
    # how entries are stored is every preset's option, not one of the preset's own settings
    problem = storage_problem(options.get(STORAGE_OPTION))
    if problem is not None:
        raise SettingsError(f"invalid settings for {name}: {problem}")
    options = {key: value for key, value in options.items() if key != STORAGE_OPTION}
    preset = data["presets"].get(name)
    if preset is None:
        raise unknown("policy", name, data["presets"])
    checks: dict[str, Any] = preset.get("checks") or {s["name"]: {} for s in preset["settings"]}
    if any(s["default"] == "(required)" and s["name"] not in options for s in preset["settings"]):
        return  # pydantic reports the missing one first, in its own words: the registry says it
    parts = [
        f"{key}={options[key]!r}: {problem}"
        for key, check in checks.items()
        if key in options and (problem := _value_problem(check, options[key])) is not None
    ]
    parts += [f"unknown setting {key!r}{did_you_mean(key, checks)}" for key in options if key not in checks]
    if parts:
        raise SettingsError(f"invalid settings for {name}: " + "; ".join(dict.fromkeys(parts)))
