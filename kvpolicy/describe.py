"""What a preset's settings are, for ``kvpolicy list NAME`` and ``generate --policy NAME --help``.

Preset fields carry no descriptions of their own: their meanings (and the reference each default
comes from) are written once, in the ``Attributes:`` section of the docstrings of the preset and of
the components it builds. This module finds each field's line there (``kv_budget`` is a cache's
``budget``, ``tsp_layer`` the TSP component's ``layer``), so nothing is written twice.
"""

from __future__ import annotations

import contextlib
import inspect
import re
import types
from dataclasses import dataclass
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from pydantic import StrictFloat, StrictInt
from pydantic_core import PydanticUndefined

from kvpolicy.config import Settings

#: Preset-field prefixes that name the component field they set (``tsp_rate`` is TSP's ``rate``).
_PREFIXES = ("kv_", "tsp_", "filter_", "cache_")


@dataclass(frozen=True)
class Setting:
    """One preset setting: its option, type, default and the documented meaning."""

    name: str
    option: str
    type: str
    default: str
    doc: str


def attributes(cls: type) -> dict[str, str]:
    """``{name: text}`` of the ``Attributes:`` section of ``cls``'s docstring (Google style)."""
    doc = inspect.getdoc(cls) or ""
    out: dict[str, str] = {}
    section = re.split(r"^Attributes:\s*$", doc, maxsplit=1, flags=re.M)
    if len(section) < 2:
        return out
    current = None
    for line in section[1].splitlines():
        if line and not line.startswith(" "):
            break  # the next section
        match = re.match(r"^ {4}(\w+)(?: \([^)]*\))?: (.*)$", line)
        if match:
            current = match.group(1)
            out[current] = match.group(2).strip()
        elif current and line.strip():
            out[current] += " " + line.strip()
    return out


def preset_settings(preset: type) -> list[Setting]:
    """Every setting of ``preset`` (a :class:`~kvpolicy.presets.Preset` subclass), documented from the
    docstrings of the preset and of the components its defaults build."""
    from kvpolicy.registry import get_registry

    docs: list[dict[str, str]] = [attributes(preset)]
    try:
        built = preset().build()
        for part in (built.cache, built.propagation):
            docs.append(attributes(type(part)))
            # components wrapping another (AdaKV around SnapKV): the wrapped one's settings too
            docs += [attributes(type(v)) for v in vars(part).values() if isinstance(v, Settings)]
    except Exception:  # settings without defaults (a required file): the component of the same kind
        same = get_registry().components.get(getattr(preset, "kind", ""))
        if same is not None:
            docs.append(attributes(same.obj))
    out = []
    for name, field in preset.model_fields.items():
        keys = [name] + [name[len(p) :] for p in _PREFIXES if name.startswith(p)]
        text = _plain(next((d[k] for k in keys for d in docs if k in d), ""))
        default = "(required)" if field.default is PydanticUndefined else repr(field.default)
        out.append(Setting(name, "--" + name.replace("_", "-"), _type_name(field.annotation), default, text))
    return out


def _plain(text: str) -> str:
    """Docstring markup as plain text: ``x`` -> x, :func:`y` -> y."""
    from kvpolicy.listing import plain

    return plain(text)


def summary(obj: Any) -> str:
    """What ``kvpolicy list`` says ``obj`` is: a preset's ``description``, else the first sentence of
    its docstring, whole (a docstring's first line may stop mid-sentence), as plain text."""
    text = getattr(obj, "description", "")
    if not isinstance(text, str) or not text.strip():
        text = inspect.cleandoc(obj.__doc__ or "") if isinstance(obj.__doc__, str) else ""
    paragraph = " ".join(text.strip().split("\n\n", 1)[0].split())
    sentence = re.match(r"(.+?[.!?])(?=\s+[A-Z]|$)", _plain(paragraph))
    return sentence.group(1) if sentence else _plain(paragraph)


def measured_settings(name: str) -> dict[str, dict[str, Any]]:
    """``{model: {"settings": {...}, "file": "kvpolicy/configs/<model>/<name>.json"}}``: the settings
    measured for preset ``name`` on each packaged model (:mod:`kvpolicy.calibrated`), which
    ``generate``, ``eval``, ``bench`` and the demo use there for whatever the user does not set."""
    import json

    from kvpolicy.calibrated import CONFIGS

    out: dict[str, dict[str, Any]] = {}
    for path in sorted(CONFIGS.glob(f"*/{name}.json")):
        with contextlib.suppress(OSError, ValueError):
            data = json.loads(path.read_text(encoding="utf-8"))
            settings = {k: v for k, v in data.items() if k not in ("policy", "name")}
            out[path.parent.name] = {
                "settings": settings,
                "file": f"kvpolicy/configs/{path.parent.name}/{path.name}",
            }
    return out


def measured_lines(measured: dict[str, dict[str, Any]], embedded: str | None) -> list[str]:
    """``on the embedded model SmolLM2-135M-Instruct, generate uses the measured tsp_layer=23, ...``."""
    lines = []
    for model, found in measured.items():
        chosen = ", ".join(f"{k}={v}" for k, v in found["settings"].items())
        which = "the embedded model" if model == embedded else "the packaged model"
        lines.append(
            f"on {which} {model}, generate (and eval, bench, demo) uses the measured {chosen} "
            f"({found['file']}); a setting you give wins"
        )
    return lines


def _type_name(annotation: Any) -> str:
    """A readable type: ``int | None``, ``'max' | 'avg'``; a budget says what its two forms mean."""
    origin, args = get_origin(annotation), get_args(annotation)
    if origin is Annotated:
        inner = _type_name(args[0])
        return "int (tokens) | float (fraction of the prompt)" if inner == "int | float" else inner
    if origin is Literal:
        return " | ".join(repr(a) for a in args)
    if origin in (Union, types.UnionType):
        text = " | ".join(dict.fromkeys(_type_name(a) for a in args))
        return "int (tokens) | float (fraction of the prompt)" if text == "int | float" else text
    if annotation is type(None):
        return "None"
    if annotation in (StrictInt, StrictFloat):
        return "int" if annotation is StrictInt else "float"
    return getattr(annotation, "__name__", None) or str(annotation)


def describe_preset(name: str) -> str:
    """The text ``kvpolicy list NAME`` prints: what the preset builds and each setting."""
    from kvpolicy.registry import get_registry

    registry = get_registry()
    entry = registry.presets[name]
    preset = entry.obj
    from kvpolicy.models import EMBEDDED

    lines = [f"{name} ({entry.provider}): {summary(preset)}"]
    with contextlib.suppress(Exception):  # settings without defaults: nothing to build
        lines.append(f"with its defaults: {preset().build().describe()}")
    lines += measured_lines(measured_settings(name), EMBEDDED.name)
    settings = preset_settings(preset)
    if not settings:
        lines.append("no settings")
        return "\n".join(lines)
    lines.append("settings (options of generate, eval and bench; keyword arguments of kvpolicy.get_policy):")
    for s in settings:
        lines.append(f"  {s.option} ({s.name}): {s.type}, default {s.default}")
        if s.doc:
            lines.append(f"      {s.doc}")
    return "\n".join(lines)
