"""Griffe extension for the API reference: kvpolicy's package layout and its docstrings' roles.

* ``pyproject.toml`` installs the repository's ``policies/`` and ``adapters/`` folders as
  sub-packages of ``kvpolicy`` (``[tool.setuptools] package-dir``). Griffe, which reads the source
  without importing it, looks for them under ``kvpolicy/`` and would not find them; this loads each
  folder and attaches it to the ``kvpolicy`` package under its installed name.
* Docstrings use Sphinx roles (``:class:`~kvpolicy.interfaces.LayerView```), which Markdown would
  show verbatim; they are rendered as code spans (``LayerView``).

Registered in ``mkdocs.yml`` (mkdocstrings' python handler, ``extensions``).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import griffe

#: Installed sub-package name -> folder, relative to the repository root (pyproject's package-dir).
PACKAGE_DIR = {"policies": "policies", "adapters": "adapters"}


_ROLE = re.compile(r":(?:class|meth|func|attr|mod|data|exc|obj):`(~?)([^`]+)`")


def _role(match: re.Match[str]) -> str:
    target = match.group(2)
    return f"`{target.rsplit('.', 1)[-1] if match.group(1) else target}`"


class PackageDir(griffe.Extension):
    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = _ROLE.sub(_role, obj.docstring.value)

    def on_package(self, *, pkg: griffe.Module, loader: griffe.GriffeLoader, **kwargs: Any) -> None:
        if pkg.name != "kvpolicy" or pkg.filepath is None or isinstance(pkg.filepath, list):
            return
        root = Path(pkg.filepath).parent.parent
        for name, folder in PACKAGE_DIR.items():
            if name in pkg.members:
                continue
            sub = loader.load(str(root / folder), find_stubs_package=False)
            assert isinstance(sub, griffe.Module)
            pkg.set_member(name, sub)
