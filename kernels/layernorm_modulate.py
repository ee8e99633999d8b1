"""``(1 + scale) * LayerNorm(x) + shift``: FLUX.2's adaLN modulation, one pass over ``x``.

LayerNorm has no affine parameters; ``shift``/``scale`` are per (batch, feature) -- ``[B, D]`` or ``[B, 1, D]`` --
or per token -- ``[B, S, D]``, FLUX.3's and FLUX.2's KV-extract mode's modulation -- with ``B`` = 1 broadcasting
over the batch in either. Eager torch reads ``x`` for the norm, writes it, reads it again for the modulation and
writes again (plus the fp32 upcast copies); the kernel reads ``x`` once and writes the result once: it is
memory-bound, so its target is the device-to-device copy bandwidth. Per token it also reads the two modulation rows
of each token (twice the traffic of per batch, where a program loads them once for all its rows): a ``PER_TOKEN``
constexpr, so the per-batch kernel compiles as before (sm_90, bf16, 4096 tokens: 0.085-0.091 warp instructions per
DRAM byte at 3072/4096/6144 per batch, 0.056-0.060 per token; no spills).

Every backend runs as ONE ``torch.library`` op (``tpfuse::layernorm_modulate``: fake implementation, registered
autograd), so ``torch.compile(fullgraph=True)`` sees one node; the launcher validates and picks the backend, the op
runs it. Backward: :func:`layernorm_modulate_backward` (torch ops, traced into a compiled backward graph) on every
backend.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._autocast import _like, autocast_dtype, autocast_off
from ._checks import check_eps, check_int32_addressable, check_tensors
from ._dispatch import select_backend
from ._math import compute_dtype
from ._triton import tl, triton

__all__ = ["layernorm_modulate", "layernorm_modulate_backward", "layernorm_modulate_reference", "ln_mod_config"]

# Rows up to this width are supported (FLUX.2-dev's hidden size is 6144).
MAX_D = 16384
# Feature chunks a row is held in: D = CHUNKS x CHUNK with CHUNK a power of two (tl.arange); FLUX.2's 3072 and
# 6144 are 3 x 1024 and 3 x 2048, so no lane idles on padding (one 4096-wide padded block idled a quarter).
MAX_CHUNKS = 4


def ln_mod_config(d: int) -> dict:
    """Rows per program and the row's chunking: each program holds ROWS whole rows in registers and loads the
    shift/scale vectors once for all of them. 4 warps with 64-128 fp32 values per thread: fewer, fuller threads
    spread the per-warp setup over more bytes (sm_90, klein-4B: 0.089 warp instructions per byte against 0.105
    at 8 warps x 48 values and 0.233 for one padded row per program). Widths that are no multiple of a large
    enough power of two run as one padded chunk."""
    chunk = d & -d  # the largest power of two dividing d
    chunks = d // chunk
    if chunks > MAX_CHUNKS or chunk < 32:
        chunk, chunks = triton.next_power_of_2(d), 1
    num_warps = max(1, min(4, d // 256))
    rows = max(1, min(8, 128 * 32 * num_warps // (chunk * chunks)))
    rows = 1 << (rows.bit_length() - 1)  # a power of two (tl.arange)
    return {"CHUNK": chunk, "CHUNKS": chunks, "ROWS": rows, "num_warps": num_warps}


@triton.jit
def _ln_load(x_ptr, rows_off, c0, cols, D, rmask, PADDED: tl.constexpr):
    offs = c0 + cols
    mask = rmask[:, None] & (offs < D)[None, :] if PADDED else rmask[:, None]
    return tl.load(x_ptr + rows_off[:, None] + offs[None, :], mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _ln_store(y_ptr, rows_off, c0, cols, D, rmask, xc, rstd, shift_ptr, scale_ptr, mod_off, PADDED: tl.constexpr,
              PER_TOKEN: tl.constexpr):
    offs = c0 + cols
    cmask = (offs < D) | (not PADDED)
    if PER_TOKEN:  # mod_off: [ROWS] row offsets, each row's own modulation
        mmask = rmask[:, None] & cmask[None, :]
        scale1 = 1.0 + tl.load(scale_ptr + mod_off[:, None] + offs[None, :], mask=mmask, other=0.0).to(tl.float32)
        shift = tl.load(shift_ptr + mod_off[:, None] + offs[None, :], mask=mmask, other=0.0).to(tl.float32)
        y = (xc * rstd[:, None]) * scale1 + shift
    else:  # mod_off: one scalar, the batch entry's row, loaded once per program for all its rows
        scale1 = 1.0 + tl.load(scale_ptr + mod_off + offs, mask=cmask, other=0.0).to(tl.float32)
        shift = tl.load(shift_ptr + mod_off + offs, mask=cmask, other=0.0).to(tl.float32)
        y = (xc * rstd[:, None]) * scale1[None, :] + shift[None, :]
    tl.store(y_ptr + rows_off[:, None] + offs[None, :], y.to(y_ptr.dtype.element_ty),
             mask=rmask[:, None] & cmask[None, :])


@triton.jit
def _ln_center(x, c0, cols, D, mean, PADDED: tl.constexpr):
    if PADDED:  # padding lanes stay 0 so they add nothing to the variance
        return tl.where((c0 + cols < D)[None, :], x - mean[:, None], 0.0)
    return x - mean[:, None]


@triton.jit
def _ln_mod_fwd_kernel(
    x_ptr, shift_ptr, scale_ptr, y_ptr,
    S, D,
    stride_xb, stride_xs, stride_yb, stride_ys, stride_mb, stride_ms,
    eps,
    ROWS: tl.constexpr, CHUNK: tl.constexpr, CHUNKS: tl.constexpr, PADDED: tl.constexpr, PER_TOKEN: tl.constexpr,
):
    # Row tiles never straddle two batch entries, so the batch index, and per batch the modulation row, is one
    # scalar per program; per token (PER_TOKEN, stride_ms the modulation's token stride) each row has its own. int32
    # offsets (the launcher checks the extents). The per-batch code is unchanged by PER_TOKEN (a constexpr).
    tiles = tl.cdiv(S, ROWS)
    b = tl.program_id(0) // tiles
    s = (tl.program_id(0) % tiles) * ROWS + tl.arange(0, ROWS)
    rmask = s < S
    x_rows = b * stride_xb + s * stride_xs
    y_rows = b * stride_yb + s * stride_ys
    if PER_TOKEN:
        mod_off = b * stride_mb + s * stride_ms  # [ROWS]
    else:
        mod_off = b * stride_mb
    cols = tl.arange(0, CHUNK)
    # The whole row in registers, chunk by chunk (CHUNKS <= 4, constexpr: unused chunks vanish); read once.
    # Chunks are added elementwise first, so each statistic is ONE row reduction (a reduction per chunk cost a
    # shared-memory round trip and barrier each: 23 barriers at 3 chunks).
    x0 = _ln_load(x_ptr, x_rows, 0, cols, D, rmask, PADDED)
    part = x0
    if CHUNKS > 1:
        x1 = _ln_load(x_ptr, x_rows, CHUNK, cols, D, rmask, PADDED)
        part += x1
    if CHUNKS > 2:
        x2 = _ln_load(x_ptr, x_rows, 2 * CHUNK, cols, D, rmask, PADDED)
        part += x2
    if CHUNKS > 3:
        x3 = _ln_load(x_ptr, x_rows, 3 * CHUNK, cols, D, rmask, PADDED)
        part += x3
    mean = tl.sum(part, axis=1) / D
    # Two passes over registers (centred variance): no E[x^2] - mean^2 cancellation.
    x0 = _ln_center(x0, 0, cols, D, mean, PADDED)
    part = x0 * x0
    if CHUNKS > 1:
        x1 = _ln_center(x1, CHUNK, cols, D, mean, PADDED)
        part += x1 * x1
    if CHUNKS > 2:
        x2 = _ln_center(x2, 2 * CHUNK, cols, D, mean, PADDED)
        part += x2 * x2
    if CHUNKS > 3:
        x3 = _ln_center(x3, 3 * CHUNK, cols, D, mean, PADDED)
        part += x3 * x3
    var = tl.sum(part, axis=1)
    rstd = tl.rsqrt(var / D + eps)
    _ln_store(y_ptr, y_rows, 0, cols, D, rmask, x0, rstd, shift_ptr, scale_ptr, mod_off, PADDED, PER_TOKEN)
    if CHUNKS > 1:
        _ln_store(y_ptr, y_rows, CHUNK, cols, D, rmask, x1, rstd, shift_ptr, scale_ptr, mod_off, PADDED,
                  PER_TOKEN)
    if CHUNKS > 2:
        _ln_store(y_ptr, y_rows, 2 * CHUNK, cols, D, rmask, x2, rstd, shift_ptr, scale_ptr, mod_off, PADDED,
                  PER_TOKEN)
    if CHUNKS > 3:
        _ln_store(y_ptr, y_rows, 3 * CHUNK, cols, D, rmask, x3, rstd, shift_ptr, scale_ptr, mod_off, PADDED,
                  PER_TOKEN)


def layernorm_modulate_reference(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor,
                                 eps: float = 1e-6) -> torch.Tensor:
    """Plain torch: fp32 (fp64 for fp64 inputs) LayerNorm (no affine) then ``(1 + scale) * y + shift``, result in
    ``x``'s dtype; ``shift``/``scale`` per batch or per token (broadcast)."""
    shift, scale = _as_b1d(shift), _as_b1d(scale)
    acc = compute_dtype(x)
    y = F.layer_norm(x.to(acc), (x.shape[-1],), eps=eps)
    return ((1 + scale.to(acc)) * y + shift.to(acc)).to(x.dtype)


def _as_b1d(mod: torch.Tensor) -> torch.Tensor:
    return mod.unsqueeze(1) if mod.dim() == 2 else mod  # [B, D] -> [B, 1, D]; [B, 1, D], [B, S, D] as they are


def _per_token(mod: torch.Tensor) -> bool:
    """A validated modulation with a row per token (``[B|1, S, D]``, S > 1); ``[B, 1, D]`` counts as per batch."""
    return mod.dim() == 3 and mod.shape[1] > 1


def _validate(x, shift, scale, eps):
    check_tensors("layernorm_modulate", {"x": x, "shift": shift, "scale": scale},
                  x.device if isinstance(x, torch.Tensor) else None, "x")
    if x.dim() != 3:
        raise ValueError(f"layernorm_modulate: x must be [B, S, D], got shape {tuple(x.shape)}")
    B, S, D = x.shape
    for name, t in (("shift", shift), ("scale", scale)):
        rows = t.dim() == 2 or (t.dim() == 3 and t.shape[1] in (1, S))  # per batch, or per token
        if not (rows and t.shape[0] in (1, B) and t.shape[-1] == D):
            raise ValueError(f"layernorm_modulate: {name} must be [B, D] or [B, 1, D] with B={B}, D={D}, "
                             f"got shape {tuple(t.shape)} (or per token [B, S, D] with S={S}; B may be 1 in "
                             "either, to broadcast over the batch)")
    if shift.shape != scale.shape:
        raise ValueError(f"layernorm_modulate: shift {tuple(shift.shape)} and scale {tuple(scale.shape)} differ")
    if D == 0:
        raise ValueError(f"layernorm_modulate: x has shape {tuple(x.shape)}: D=0 features, nothing to normalize over")
    if D > MAX_D:
        raise ValueError(f"layernorm_modulate: D={D} exceeds the supported maximum {MAX_D}")
    check_eps("layernorm_modulate", eps)


def _layernorm_modulate_triton(x, shift, scale, eps):
    B, S, D = x.shape
    per_token = _per_token(shift)
    if per_token:
        shift, scale = _as_b1d(shift), _as_b1d(scale)  # [B|1, S, D]
    else:
        shift, scale = shift.reshape(shift.shape[0], D), scale.reshape(scale.shape[0], D)  # [B|1, D]
    if shift.stride() != scale.stride():  # one set of modulation strides for both
        shift, scale = shift.contiguous(), scale.contiguous()
    y = torch.empty((B, S, D), device=x.device, dtype=x.dtype)
    check_int32_addressable("layernorm_modulate", {"x": x, "y": y, "shift": shift, "scale": scale})
    cfg = ln_mod_config(D)
    stride_mb = shift.stride(0) if shift.shape[0] == B and B > 1 else 0
    stride_ms = shift.stride(1) if per_token else 0
    _ln_mod_fwd_kernel[(B * triton.cdiv(S, cfg["ROWS"]),)](
        x, shift, scale, y, S, D, x.stride(0), x.stride(1), y.stride(0), y.stride(1), stride_mb, stride_ms, eps,
        ROWS=cfg["ROWS"], CHUNK=cfg["CHUNK"], CHUNKS=cfg["CHUNKS"], PADDED=cfg["CHUNK"] * cfg["CHUNKS"] != D,
        PER_TOKEN=per_token, num_warps=cfg["num_warps"],
    )
    return y


def layernorm_modulate_backward(grad: torch.Tensor, x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor,
                                eps: float, needs=(True, True, True)):
    """Gradients ``(dx, dshift, dscale)`` of :func:`layernorm_modulate_reference` for ``grad`` ``[B, S, D]``
    (``None`` where ``needs`` is False), in fp32 (fp64 for fp64 inputs) from the saved inputs: with
    ``n = (x - mean) * rstd``, ``dn = grad * (1 + scale)``, ``dx = rstd * (dn - mean(dn) - n * mean(dn * n))``;
    ``dshift``/``dscale`` sum ``grad``/``grad * n`` over every dimension the modulation broadcasts (the tokens per
    batch, the batch where it is 1), so they have the modulation's shape. Plain torch ops, so ``torch.compile``
    traces it into the backward graph."""
    acc = compute_dtype(x)
    g = grad.to(acc)
    xc = x.to(acc)
    xc = xc - xc.mean(-1, keepdim=True)
    rstd = torch.rsqrt((xc * xc).mean(-1, keepdim=True) + eps)  # [B, S, 1]
    n = xc * rstd  # [B, S, D]

    def like_mod(t, mod):  # [B, S, D] summed to the modulation's shape ([B|1, D], [B|1, 1, D] or [B|1, S, D])
        m = _as_b1d(mod)
        if m.shape[1] == 1 and t.shape[1] != 1:  # (!= 1: no tokens sum to zeros of the modulation's shape)
            t = t.sum(1, keepdim=True)
        if m.shape[0] == 1 and t.shape[0] != 1:
            t = t.sum(0, keepdim=True)
        return t.reshape(mod.shape).to(mod.dtype)

    dx = dshift = dscale = None
    if needs[0]:
        dn = g * (1 + _as_b1d(scale).to(acc))
        dx = (rstd * (dn - dn.mean(-1, keepdim=True) - n * (dn * n).mean(-1, keepdim=True))).to(x.dtype)
    if needs[1]:
        dshift = like_mod(g, shift)
    if needs[2]:
        dscale = like_mod(g * n, scale)
    return dx, dshift, dscale


# --------------------------------------------------------------------------------------------------------------
# The torch.library op: one graph node under torch.compile, the backend chosen by the launcher
# --------------------------------------------------------------------------------------------------------------


@torch.library.custom_op("tpfuse::layernorm_modulate", mutates_args=())
def _layernorm_modulate_op(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float,
                           backend: str) -> torch.Tensor:
    """``backend``: "torch" (the reference), "triton" or "cuda" (csrc), validated by :func:`layernorm_modulate`.
    Output: contiguous ``[B, S, D]`` on every backend."""
    if backend == "torch":
        return layernorm_modulate_reference(x, shift, scale, eps).contiguous()
    if backend == "cuda":
        from .cuda_backend import layernorm_modulate_cuda

        return layernorm_modulate_cuda(x, shift, scale, eps)  # per batch or per token, as given
    return _layernorm_modulate_triton(x, shift, scale, eps)


@_layernorm_modulate_op.register_fake
def _(x, shift, scale, eps, backend):
    return x.new_empty(x.shape)


def _ln_setup(ctx, inputs, output):
    x, shift, scale, eps, _backend = inputs
    ctx.save_for_backward(x, shift, scale)
    ctx.eps = eps


def _ln_backward(ctx, grad):
    # Every backend's backward is the torch one: the op is memory-bound and its backward runs once per step.
    x, shift, scale = ctx.saved_tensors
    return (*layernorm_modulate_backward(grad, x, shift, scale, ctx.eps, ctx.needs_input_grad[:3]), None, None)


_layernorm_modulate_op.register_autograd(_ln_backward, setup_context=_ln_setup)


def layernorm_modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float = 1e-6,
                       backend: str | None = None) -> torch.Tensor:
    """``(1 + scale) * LayerNorm(x) + shift`` (LayerNorm without affine); fp32 math, result in ``x``'s dtype.

    Args:
        x: ``[B, S, D]``; any batch/sequence strides, last dim contiguous.
        shift, scale: per batch ``[B, D]`` or ``[B, 1, D]``, or per token ``[B, S, D]`` (``B`` may be 1 to
            broadcast over the batch), both the same shape; gradients come back in that shape.
        backend: ``"torch"``, ``"triton"`` or ``"cuda"`` (csrc forward); default: triton for CUDA tensors,
            torch on CPU (``TPFUSE_BACKEND`` overrides the default).
    """
    if isinstance(x, torch.Tensor) and autocast_dtype(x.device) is not None:  # see kernels/_autocast.py
        with autocast_off(x.device):
            return layernorm_modulate(x, _like(shift, x), _like(scale, x), eps, backend)
    _validate(x, shift, scale, eps)
    chosen = select_backend("layernorm_modulate", x.device, backend, cuda_kernel=True)
    for name, t in (("x", x), ("shift", shift), ("scale", scale)):  # both kernels read rows with unit stride
        if chosen != "torch" and t.stride(-1) != 1:
            raise ValueError(f"layernorm_modulate: {name} must be contiguous in its last dim, got strides "
                             f"{t.stride()}")
    return _layernorm_modulate_op(x, shift, scale, float(eps), chosen)
