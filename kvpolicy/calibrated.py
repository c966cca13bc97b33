"""Measured preset settings for the packaged models, applied where a preset meets its model.

A preset's defaults are the reference's, chosen for 8B models; on the 135M embedded model some lose
the task (FastKV's mid-depth TSP layer finds the needle 1 time in 5). Settings measured on a packaged
model ship as ``kvpolicy/configs/<model>/<preset>.json`` (each a ``--policy-config`` file:
``kvpolicy calibrate``'s recommendation, or a sweep's result, docs/calibration.md). When the CLI,
``kvpolicy.eval.run_eval`` or the demo build a preset *by name* for that model, the measured settings
fill whatever the user did not set, and a note says so; a user's own setting always wins, and
``kvpolicy.get_policy`` (which knows no model) never changes.

Measured data too large for a setting ships beside the config and the setting names it: the
embedded model's Q-Filters (``kvpolicy calibrate --qfilters``) are ``<model>/qfilters_filters.json``,
itself a policy config with the filters embedded, and ``qfilters.json`` sets
``packaged_filters=<model>``. A user's filters (``filters_file`` or ``filters``) replace the shipped
ones: settings a preset lists as alternatives (``alternative_settings``) count as one.

The resolved settings (user's, measured, then the preset's defaults, with model-dependent values such
as a default TSP layer worked out for the model) also name the run in every table and plot title.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kvpolicy.interfaces import Policy
from kvpolicy.listing import STORAGE_OPTION

CONFIGS = Path(__file__).parent / "configs"


def packaged_model_name(model: Any) -> str | None:
    """The packaged model (``kvpolicy.models.PACKAGED``) that ``model`` was loaded as, else ``None``."""
    from kvpolicy.models import packaged_name_of

    source = str(getattr(getattr(model, "config", None), "_name_or_path", "") or "")
    return packaged_name_of(source) if source else None


def measured_file(model: Any, preset: str) -> Path | None:
    """The measured settings of ``preset`` on ``model``, if any ship."""
    name = packaged_model_name(model)
    path = CONFIGS / name / f"{preset}.json" if name else None
    return path if path is not None and path.is_file() else None


@dataclass
class ResolvedPreset:
    """A preset built for one model: the policy, every resolved setting, and which were measured."""

    name: str
    policy: Policy
    settings: dict[str, Any]
    measured: dict[str, Any] = field(default_factory=dict)
    source: Path | None = None
    model: str | None = None
    given: dict[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> str:
        """``fastkv tsp_layer=23 tsp_rate=0.1 kv_budget=1.0 ...``: every setting that has a value."""
        parts = [f"{k}={v}" for k, v in self.settings.items() if v is not None]
        return " ".join([self.name, *parts])

    @property
    def short_label(self) -> str:
        """``fastkv tsp_layer=20``: the name and the settings the user gave (a stable folder name)."""
        return " ".join([self.name, *(f"{k}={v}" for k, v in sorted(self.given.items()))])

    @property
    def note(self) -> str | None:
        """What the measured settings changed, for the user to read (``None``: nothing did)."""
        if not self.measured:
            return None
        chosen = ", ".join(f"{k}={v}" for k, v in self.measured.items())
        where = f"kvpolicy/configs/{self.source.parent.name}/{self.source.name}" if self.source else "?"
        return (
            f"{self.name} on {self.model}: {chosen} as measured for this model ({where}); "
            "set any of them to override"
        )


def resolve_preset(name: str, options: dict[str, Any] | None = None, model: Any = None) -> ResolvedPreset:
    """Preset ``name`` with the user's ``options``, the measured settings for ``model`` where they
    ship, then the preset's defaults. Validation errors name the bad setting as ``get_policy`` does."""
    from kvpolicy.registry import get_policy, preset_class

    options = dict(options or {})
    source = measured_file(model, name) if model is not None else None
    measured: dict[str, Any] = {}
    if source is not None:
        data = json.loads(source.read_text(encoding="utf-8"))
        # Settings that are alternatives to one the user gave (Q-Filters from a file, not the shipped
        # ones) are the user's choice too.
        groups = getattr(preset_class(name), "alternative_settings", ())
        taken = set(options) | {k for g in groups if set(options) & g for k in g}
        measured = {k: v for k, v in data.items() if k not in ("policy", "name") and k not in taken}
    merged = {**measured, **options}
    policy = get_policy(name, **merged)
    own = {k: v for k, v in merged.items() if k != STORAGE_OPTION}  # every preset's, not the preset's own
    preset = preset_class(name).model_validate(own)
    layers = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    resolved = getattr(preset, "resolved_settings", None)
    settings = resolved(layers) if callable(resolved) else preset.model_dump()
    if policy.storage.quantized:
        settings = {**settings, STORAGE_OPTION: policy.storage.label}
    return ResolvedPreset(
        name, policy, settings, measured, source, packaged_model_name(model) if source else None, options
    )


def resolve_policy(
    policy: Policy | str | dict[str, Any] | None = "fullkv",
    options: dict[str, Any] | None = None,
    policy_config: str | Path | None = None,
    model: Any = None,
) -> tuple[Policy, str, str | None, str]:
    """The policy to run, a readable label for it, a note for the user (or ``None``) and the short
    name of its run folder (the preset and the settings the user gave).

    What ``generate``, ``eval`` and ``run_eval`` run. A preset name is built for ``model``
    (:func:`resolve_preset`): settings
    measured for a packaged model fill what the user did not set (the note says which), and the
    label lists every resolved setting (``fastkv tsp_layer=23 tsp_rate=0.1 kv_budget=1.0 ...``)."""
    from kvpolicy.registry import load_policy_config, policy_from_dict

    options = dict(options or {})
    if policy_config is not None:
        if options:
            raise ValueError(f"--policy-config takes no policy options; got {sorted(options)}")
        return load_policy_config(policy_config), Path(policy_config).stem, None, Path(policy_config).stem
    if isinstance(policy, Policy):
        if options:
            raise ValueError("policy options apply to a preset name, not to a Policy object")
        return policy, policy.name or "custom", None, policy.name or "custom"
    if isinstance(policy, dict):
        if options:
            raise ValueError("policy options apply to a preset name, not to a policy dict")
        name = str(policy.get("name") or policy.get("policy") or "custom")
        return policy_from_dict(policy), name, None, name
    resolved = resolve_preset(policy or "fullkv", options, model)
    return resolved.policy, resolved.label, resolved.note, resolved.short_label
