"""Input checks shared by the layers and the blocks: clear errors naming the offending value."""

from __future__ import annotations

import torch
from tpfuse.kernels._autocast import autocast_dtype


def check_like(x, ref: torch.Tensor, subject: str, owner: str) -> None:
    """Raise unless ``x`` is a tensor on ``ref``'s device (``meta`` weights accept any) with ``ref``'s dtype (any
    floating dtype under autocast, which decides the compute dtype itself).

    ``owner`` reads as a subject with its verb, e.g. ``"the weight is"``, ``"the block's weights are"``.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{subject} must be a torch.Tensor, got {type(x).__name__}")
    if ref.device.type != "meta" and x.device != ref.device:
        raise ValueError(f"{subject} is on {x.device} but {owner} on {ref.device}")
    if x.dtype != ref.dtype and not (autocast_dtype(x.device) is not None and x.is_floating_point()):
        raise TypeError(f"{subject} has dtype {x.dtype} but {owner} {ref.dtype}")


def json_kind(value) -> str:
    """What a value parsed from JSON (config.json, an index) is, for error messages: ``null``, ``a bool``, ``an
    int``, ``a float``, ``a string``, ``a list``, ``an object``."""
    if value is None:
        return "null"
    return {bool: "a bool", int: "an int", str: "a string", float: "a float", list: "a list", tuple: "a list",
            dict: "an object"}.get(type(value), f"a {type(value).__name__}")
