"""Where a module computes, including under accelerate's ``device_map`` (split across devices,
or offloaded to CPU or disk)."""

from __future__ import annotations

import torch
from torch import nn


def module_device(module: nn.Module, default: torch.device | None = None) -> torch.device:
    """The device ``module`` computes on (``default`` for a module without weights, e.g. OLMo's
    parameter-free layer norm: it computes wherever its input is).

    Under accelerate's ``device_map`` a module carries a hook whose ``execution_device`` says where it
    runs; with offloading (``"cpu"``/``"disk"`` in the map) its weights sit on the meta device until
    the hook loads them, so the weights' device would be wrong. Without a hook: its first parameter's.
    """
    for candidate in (module, *module.children()):
        device = getattr(getattr(candidate, "_hf_hook", None), "execution_device", None)
        if device is not None:
            return torch.device(f"cuda:{device}" if isinstance(device, int) else device)
    params = list(module.parameters())
    for param in params:
        if param.device.type != "meta":
            return param.device
    if not params and default is not None:
        return default
    raise ValueError(
        f"{type(module).__name__} has only meta-device weights and no accelerate hook to load them"
    )
