"""Packaging: every sub-package ships, and no generic top-level names are claimed."""

from __future__ import annotations

from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

ROOT = Path(__file__).resolve().parents[1]


def test_every_package_directory_is_listed():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(config["packages"])
    mapping = config["package-dir"]
    found = set()
    for name, folder in mapping.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / folder)
            found.add(".".join([name, *rel.parts]))
    assert found <= listed, f"packages missing from pyproject: {sorted(found - listed)}"
    assert all(name == "kvpolicy" or name.startswith("kvpolicy.") for name in listed)


def test_calibrated_configs_ship_and_load():
    """Every measured config ships, loads as a --policy-config file, and names a packaged model."""
    import kvpolicy
    from kvpolicy.calibrated import CONFIGS
    from kvpolicy.models import PACKAGED

    files = sorted(CONFIGS.glob("*/*.json"))
    assert files and all(f.parent.name in PACKAGED for f in files)
    for f in files:
        assert kvpolicy.load_policy_config(f).name == f.stem
    fastkv = kvpolicy.load_policy_config(CONFIGS / "SmolLM2-135M-Instruct" / "fastkv.json")
    assert fastkv.propagation.layer == 23
