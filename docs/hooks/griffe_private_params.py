"""Griffe extension for the API reference: no private fields in dataclass signatures.

A dataclass field named ``_something`` (``LayerView._window_cache``, ``DecodeView._dense``) is
internal: the adapter fills it, callers never pass it, and ``filters: ["!^_"]`` already hides it from
the members. Griffe's ``dataclasses`` extension still puts it in the ``__init__`` it writes, which
``merge_init_into_class`` shows as the class signature. This drops such parameters from those written
``__init__`` signatures (a hand-written ``__init__`` is left as it is).

Registered in ``mkdocs.yml`` (mkdocstrings' python handler, ``extensions``) after ``dataclasses``, so
the ``__init__`` it edits exists when it runs.
"""

from __future__ import annotations

from typing import Any

import griffe


def _hide(obj: griffe.Module | griffe.Class, seen: set[str]) -> None:
    if obj.path in seen:
        return
    seen.add(obj.path)
    if isinstance(obj, griffe.Class) and "dataclass" in obj.labels:
        init = obj.members.get("__init__")
        # griffe's dataclasses extension writes __init__ at line 0; a real one has its source line
        if isinstance(init, griffe.Function) and not init.lineno:
            for parameter in list(init.parameters):
                if parameter.name.startswith("_"):
                    del init.parameters[parameter.name]
    for member in obj.members.values():
        if not member.is_alias and isinstance(member, (griffe.Module, griffe.Class)):
            _hide(member, seen)


class HidePrivateParameters(griffe.Extension):
    def on_package(self, *, pkg: griffe.Module, **kwargs: Any) -> None:
        _hide(pkg, set())
