"""Autocast for tpfuse's ops: what ``torch.autocast`` would do to the eager ops each one fuses.

A fused op is one node to autocast, so it gets one policy, applied in its launcher before validation, after
which the op runs with autocast off (its kernels and references then see exactly the dtypes chosen here):

* GEMM ops (``fused_qkv_mlp_proj``, ``row_parallel_matmul``): the activation and the weight are cast to the
  autocast dtype, as for ``F.linear``. Norm scales are left as they are (fp32 math in the epilogue);
  ``row_parallel_matmul``'s gate and residual are applied after the GEMM in torch, with type promotion, as dense
  code applies them outside the linear (an fp32 residual stream stays fp32).
* Norm ops (``layernorm_modulate``, ``qk_norm_rope``): the auxiliary inputs are cast to the activation's dtype
  and the math stays fp32 inside, as ``F.layer_norm``/``F.rms_norm`` on CPU autocast (on CUDA autocast
  they return fp32; the fused op returns the activation's dtype, one rounding further, which the next op's cast
  would do anyway).

The csrc custom ops also register an fp32 autocast rule (``torch.library.register_autocast``) for callers that
reach them directly.
"""

from __future__ import annotations

import torch

__all__ = ["_like", "autocast_dtype", "autocast_off"]


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The dtype autocast would run a linear in on ``device``, or ``None`` when autocast is off there."""
    kind = device.type
    if kind == "meta":
        return None
    try:
        if not torch.is_autocast_enabled(kind):
            return None
    except (RuntimeError, TypeError):  # a device type autocast does not know
        return None
    return torch.get_autocast_dtype(kind)


def autocast_off(device: torch.device):
    """A context that turns autocast off for ``device`` (the op runs in the dtypes its launcher chose)."""
    return torch.autocast(device.type, enabled=False)


def _like(t, ref: torch.Tensor | None = None, dtype: torch.dtype | None = None):
    """``t`` in ``ref``'s (or ``dtype``) dtype when it is a floating tensor; anything else unchanged (so the op's
    own validation still names a bad argument)."""
    if not isinstance(t, torch.Tensor) or not t.is_floating_point():
        return t
    return t.to(dtype if dtype is not None else ref.dtype)
