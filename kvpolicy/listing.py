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
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

#: Bumped when the shape of the kept listing changes.
_FORMAT = 2
_GROUP = "kvpolicy"
_ENV = ("KVPOLICY_STRICT_PLUGINS", "KVPOLICY_DISABLE_PLUGINS")


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
    from kvpolicy.describe import describe_preset, preset_settings
    from kvpolicy.registry import get_registry

    registry = get_registry()
    entries = [
        {"name": e.name, "category": e.category, "provider": e.provider, "description": e.description}
        for e in registry.entries()
    ]
    presets = {
        name: {"text": describe_preset(name), "settings": [asdict(s) for s in preset_settings(entry.obj)]}
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
