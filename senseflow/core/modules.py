"""Helpers on ``torch.nn`` modules that every layer uses."""
from __future__ import annotations

from typing import Any

from torch import nn

__all__ = ["unwrap"]


def unwrap(net: Any) -> nn.Module:
    """The plain model inside DDP-style (``.module``) and ``torch.compile`` (``._orig_mod``) wrappers, however nested;
    a module that is not wrapped (FSDP2 modules are their own module) is returned as it is."""
    while True:
        if hasattr(net, "_orig_mod"):
            net = net._orig_mod
        elif isinstance(getattr(net, "module", None), nn.Module):
            net = net.module
        else:
            return net
