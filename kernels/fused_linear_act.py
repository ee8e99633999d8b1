"""A feed-forward's input projection with its activation in the GEMM epilogue: ``act(x @ W^T + b)``.

The column-parallel ``linear_in`` of a two-stream block's feed-forward. Eager code writes the ``[tokens, 2M/N]``
(SwiGLU) or ``[tokens, M/N]`` (GELU) projection, reads it back for the activation and writes the result: two extra
passes over the largest activation of the block. Here the projection is the MLP tiles of the fused projection
kernel (:mod:`.fused_qkv_mlp_proj`, no Q/K/V heads) and only the activation is written:

* ``"swiglu"`` (FLUX.2, FLUX.3): ``W`` is ``[gate | up]`` (``[2M, K]``, each rank's shard in the same layout); a
  tile holds ``Dh/2`` gate and the matching ``Dh/2`` up columns on one ``n128`` accumulator and writes
  ``silu(gate) * up``.
* ``"gelu_tanh"`` (Qwen-Image): ``W`` is ``[M, K]``; a tile holds 128 consecutive columns and writes
  ``gelu(h, approximate="tanh")``, computed as ``h * sigmoid(2u)`` (one ``exp``; ``(1 + tanh u) / 2 =
  sigmoid(2u)``).

The bias (Qwen-Image's MLPs have one) is added in the epilogue before the activation. Every backend runs as ONE
``torch.library`` op (``tpfuse::fused_linear_act``: fake implementation, registered autograd), so
``torch.compile(fullgraph=True)`` sees one node. Backward: :func:`fused_linear_act_backward` (torch ops, recomputing
the projection rather than saving the ``[tokens, 2M]`` pre-activation).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._autocast import _like, autocast_dtype, autocast_off
from ._checks import check_int32_addressable, check_tensors
from ._dispatch import select_backend
from ._math import compute_dtype
from .fused_qkv_mlp_proj import ACTIVATIONS, fused_proj_triton

__all__ = ["MLP_TILE", "fused_linear_act", "fused_linear_act_backward", "fused_linear_act_reference"]

# The kernel's tile width (its HEAD_DIM): 128 output columns of GELU or 64 gate + 64 up of SwiGLU, one n128 wgmma
# per warpgroup and K step (n64 would re-read A from shared memory twice as often).
MLP_TILE = 128


def fused_linear_act_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                               activation: str = "swiglu") -> torch.Tensor:
    """Plain torch: ``silu(gate) * up`` of ``[gate | up] = x W^T + b``, or ``gelu(x W^T + b, "tanh")``, computed in
    fp32 (fp64 for fp64 inputs), returned in ``x``'s dtype."""
    h = F.linear(x, weight, bias).to(compute_dtype(x))
    if activation == "swiglu":
        gate, up = h.chunk(2, dim=-1)
        return (F.silu(gate) * up).to(x.dtype)
    return F.gelu(h, approximate="tanh").to(x.dtype)


def fused_linear_act_backward(grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                              activation: str, needs=(True, True, True)):
    """``(dx, dweight, dbias)`` (``None`` where ``needs`` is False), recomputing ``x W^T + b``. SwiGLU:
    ``d gate = g up silu'(gate)``, ``d up = g silu(gate)``; GELU: aten's ``gelu_backward`` (tanh)."""
    acc = compute_dtype(x)
    h = F.linear(x, weight, bias).to(acc)
    g = grad.to(acc)
    if activation == "swiglu":
        gate, up = h.chunk(2, dim=-1)
        sig = torch.sigmoid(gate)
        dh = torch.cat([g * up * sig * (1 + gate * (1 - sig)), g * gate * sig], dim=-1)  # silu' = s (1 + z (1 - s))
    else:
        dh = torch.ops.aten.gelu_backward(g, h, approximate="tanh")
    dh = dh.to(x.dtype)
    dx = dh @ weight if needs[0] else None
    dh2 = dh.reshape(-1, dh.shape[-1])
    dweight = dh2.T @ x.reshape(-1, x.shape[-1]) if needs[1] else None
    dbias = dh2.sum(0).to(bias.dtype) if needs[2] and bias is not None else None
    return dx, dweight, dbias


@torch.library.custom_op("tpfuse::fused_linear_act", mutates_args=())
def _fused_linear_act_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, activation: str,
                         backend: str) -> torch.Tensor:
    """Contiguous ``[..., M]`` on every backend."""
    if backend == "torch":
        return fused_linear_act_reference(x, weight, bias, activation).contiguous()
    lead, k = x.shape[:-1], x.shape[-1]
    m = weight.shape[0] // 2 if activation == "swiglu" else weight.shape[0]
    x3 = x.reshape(1, -1, k)  # [1, tokens, K]: no heads, so tiles may span batch entries
    out = torch.empty((1, x3.shape[1], m), device=x.device, dtype=x.dtype)
    # The MLP weight is one row block; SwiGLU's up rows follow its gate rows (the kernel's plane stride is M).
    # The Q/K norm-scale pointers are never read without heads: the weight stands in for them.
    fused_proj_triton(x3, (None, None, None, weight), (None, None, None, bias), weight, weight, None, None, out,
                      0, MLP_TILE, m, 0.0, activation)
    return out.view(*lead, m)


@_fused_linear_act_op.register_fake
def _(x, weight, bias, activation, backend):
    m = weight.shape[0] // 2 if activation == "swiglu" else weight.shape[0]
    return x.new_empty((*x.shape[:-1], m))


def _setup(ctx, inputs, output):
    x, weight, bias, activation, _backend = inputs
    ctx.save_for_backward(x, weight, bias)
    ctx.activation = activation


def _backward(ctx, grad):
    x, weight, bias = ctx.saved_tensors
    dx, dw, db = fused_linear_act_backward(grad, x, weight, bias, ctx.activation, ctx.needs_input_grad[:3])
    return dx, dw, db, None, None


_fused_linear_act_op.register_autograd(_backward, setup_context=_setup)


def _validate(x, weight, bias, activation):
    named = {"x": x, "weight": weight} | ({"bias": bias} if bias is not None else {})
    check_tensors("fused_linear_act", named, x.device if isinstance(x, torch.Tensor) else None, "x")
    if activation not in ACTIVATIONS:
        raise ValueError(f"fused_linear_act: activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
    if x.dim() < 1 or weight.dim() != 2 or weight.shape[1] != x.shape[-1]:
        raise ValueError(f"fused_linear_act: x {tuple(x.shape)} and weight {tuple(weight.shape)} do not chain: "
                         f"weight must be [N, {x.shape[-1] if x.dim() else '?'}]")
    if activation == "swiglu" and weight.shape[0] % 2:
        raise ValueError(f"fused_linear_act: a SwiGLU weight is [gate | up] with an even row count, got "
                         f"{weight.shape[0]}")
    if weight.shape[0] == 0 or x.shape[-1] == 0:
        raise ValueError(f"fused_linear_act: zero-sized feature dims: x {tuple(x.shape)}, weight "
                         f"{tuple(weight.shape)}")
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(f"fused_linear_act: bias must be [{weight.shape[0]}], got {tuple(bias.shape)}")
    for name, t in named.items():
        if t.dtype != x.dtype:
            raise TypeError(f"fused_linear_act: {name} has dtype {t.dtype}, x has {x.dtype}")


def fused_linear_act(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                     activation: str = "swiglu", backend: str | None = None) -> torch.Tensor:
    """``silu(gate) * up`` of ``[gate | up] = x W^T + b`` (``activation="swiglu"``) or ``gelu(x W^T + b, "tanh")``
    (``"gelu_tanh"``), with the activation in the GEMM epilogue on Triton.

    Args:
        x: ``[..., K]``; weight: ``[2M, K]`` (SwiGLU, ``[gate | up]``) or ``[M, K]`` (GELU), ``nn.Linear`` layout;
        bias: ``[rows]`` or ``None``. backend: ``"torch"`` or ``"triton"``; default: triton for CUDA tensors.

    Returns ``[..., M]`` in ``x``'s dtype. Differentiable (a torch backward on every backend).
    """
    cast = autocast_dtype(x.device) if isinstance(x, torch.Tensor) else None
    if cast is not None:  # autocast: the GEMM in the autocast dtype, as F.linear (see kernels/_autocast.py)
        with autocast_off(x.device):
            return fused_linear_act(x.to(cast), weight.to(cast), _like(bias, dtype=cast), activation, backend)
    _validate(x, weight, bias, activation)
    chosen = select_backend("fused_linear_act", x.device, backend)
    if chosen != "torch":
        m = weight.shape[0] // 2 if activation == "swiglu" else weight.shape[0]
        check_int32_addressable("fused_linear_act", {"x": x, "weight": weight},
                                {"out": (*x.shape[:-1], m)})
    return _fused_linear_act_op(x, weight, bias, activation, chosen)
