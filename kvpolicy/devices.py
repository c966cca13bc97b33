"""Where a module computes, including under accelerate's ``device_map`` (split across devices,
or offloaded to CPU or disk)."""

from __future__ import annotations

import torch
from torch import nn


def module_device(module: nn.Module) -> torch.device:
    """The device ``module`` computes on.

    Under accelerate's ``device_map`` a module carries a hook whose ``execution_device`` says where it
    runs; with offloading (``"cpu"``/``"disk"`` in the map) its weights sit on the meta device until
    the hook loads them, so the weights' device would be wrong. Without a hook: its first parameter's.
    """
    for candidate in (module, *module.children()):
        device = getattr(getattr(candidate, "_hf_hook", None), "execution_device", None)
        if device is not None:
            return torch.device(f"cuda:{device}" if isinstance(device, int) else device)
    for param in module.parameters():
        if param.device.type != "meta":
            return param.device
    raise ValueError(
        f"{type(module).__name__} has only meta-device weights and no accelerate hook to load them"
    )
