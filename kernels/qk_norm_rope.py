"""Per-head RMSNorm (learnable scale) followed by RoPE on interleaved pairs, for Q and K in one launch.

``q``, ``k``: ``[B, S, H, D]`` with any strides whose last dim is contiguous (so a ``[B, H, S, D]`` buffer
transposed to ``[B, S, H, D]`` works without a copy); ``cos``, ``sin``: ``[S, D]`` as diffusers'
``Flux2PosEmbed`` returns them (each angle repeated for the two elements of a pair).

RoPE on pair ``(x[2i], x[2i+1])``: ``out[2i] = x[2i] cos - x[2i+1] sin``, ``out[2i+1] = x[2i+1] cos + x[2i] sin``.
The kernel gets each element's partner by loading the row a second time at ``d ^ 1`` (the second load hits L1),
which keeps every value in its natural lane: no register shuffles, no reshape/split (those spilled at 128-wide
tiles when this was tried inside the GEMM epilogue).

Forward and backward are Triton kernels. Backward: with ``n = x * rstd * w`` and ``g = dy`` rotated back,
``dn[j] = g[j] cos[j] + sgn(j) g[j^1] sin[j^1]`` (``sgn`` = +1 for even ``j``, -1 for odd),
``dx = rstd * (dn w) - x * rstd^3 * mean(dn w x)``, ``dw = sum_rows dn * x * rstd`` (per-program partial sums
reduced in torch).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._checks import check_rope_pair, check_tensors
from ._dispatch import select_backend
from ._math import compute_dtype
from ._triton import tl, triton

__all__ = ["qk_norm_rope", "qk_norm_rope_reference", "rope_reference", "qk_rope_config"]


def qk_rope_config(d: int) -> dict:
    """Rows per program: one program moves ~8 KB of Q+K (a 128-wide bf16 row is 256 B), so the
    launch is not dominated by per-program overhead at FLUX.2's ~10^5 (token, head) rows."""
    block_d = triton.next_power_of_2(d)
    return {"BLOCK_D": block_d, "BLOCK_R": max(1, min(16, 2048 // block_d)), "num_warps": 4}


@triton.jit
def _load_rows(ptr, b, s, h, d, stride_b, stride_s, stride_h, mask):
    offs = b[:, None] * stride_b + s[:, None] * stride_s + h[:, None] * stride_h + d[None, :]
    return tl.load(ptr + offs, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _row_index(pid, n_rows, S, H, BLOCK_R: tl.constexpr):
    rows = pid.to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    return rows, rows < n_rows, rows // (S * H), (rows // H) % S, rows % H


@triton.jit
def _norm_rope_fwd_one(x_ptr, w_ptr, o_ptr, b, s, h, d, p, mask, dmask, cos, sin, sgn,
                       sxb, sxs, sxh, sob, sos, soh, D, eps, HAS_ROPE: tl.constexpr):
    x = _load_rows(x_ptr, b, s, h, d, sxb, sxs, sxh, mask)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / D + eps)  # [R]
    n = x * rstd[:, None] * tl.load(w_ptr + d, mask=dmask, other=0.0).to(tl.float32)[None, :]
    if HAS_ROPE:
        xp = _load_rows(x_ptr, b, s, h, p, sxb, sxs, sxh, mask)  # partner elements d ^ 1
        n_p = xp * rstd[:, None] * tl.load(w_ptr + p, mask=dmask, other=0.0).to(tl.float32)[None, :]
        n = n * cos - sgn[None, :] * n_p * sin
    offs = b[:, None] * sob + s[:, None] * sos + h[:, None] * soh + d[None, :]
    tl.store(o_ptr + offs, n.to(o_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _qk_norm_rope_fwd_kernel(
    q_ptr, k_ptr, qw_ptr, kw_ptr, cos_ptr, sin_ptr, qo_ptr, ko_ptr,
    n_rows, S, H, D,
    sqb, sqs, sqh, skb, sks, skh, sqob, sqos, sqoh, skob, skos, skoh, stride_cs,
    eps,
    HAS_ROPE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    rows, rmask, b, s, h = _row_index(tl.program_id(0), n_rows, S, H, BLOCK_R)
    d = tl.arange(0, BLOCK_D)
    dmask = d < D
    p = d ^ 1
    mask = rmask[:, None] & dmask[None, :]
    sgn = tl.where(d % 2 == 0, 1.0, -1.0)  # out[2i] gets -x[2i+1] sin, out[2i+1] gets +x[2i] sin
    cos = tl.zeros((BLOCK_R, BLOCK_D), tl.float32)
    sin = tl.zeros((BLOCK_R, BLOCK_D), tl.float32)
    if HAS_ROPE:
        cs = s[:, None] * stride_cs + d[None, :]
        cos = tl.load(cos_ptr + cs, mask=mask, other=0.0).to(tl.float32)
        sin = tl.load(sin_ptr + cs, mask=mask, other=0.0).to(tl.float32)
    _norm_rope_fwd_one(q_ptr, qw_ptr, qo_ptr, b, s, h, d, p, mask, dmask, cos, sin, sgn,
                       sqb, sqs, sqh, sqob, sqos, sqoh, D, eps, HAS_ROPE)
    _norm_rope_fwd_one(k_ptr, kw_ptr, ko_ptr, b, s, h, d, p, mask, dmask, cos, sin, sgn,
                       skb, sks, skh, skob, skos, skoh, D, eps, HAS_ROPE)


@triton.jit
def _norm_rope_bwd_one(x_ptr, w_ptr, g_ptr, b, s, h, d, p, mask, dmask, cos, sin_p, sgn,
                       sxb, sxs, sxh, sgb, sgs, sgh, D, eps, HAS_ROPE: tl.constexpr):
    """(dx [R, D], this program's partial dw [D]) for one of Q/K."""
    x = _load_rows(x_ptr, b, s, h, d, sxb, sxs, sxh, mask)
    g = _load_rows(g_ptr, b, s, h, d, sgb, sgs, sgh, mask)
    if HAS_ROPE:
        gp = _load_rows(g_ptr, b, s, h, p, sgb, sgs, sgh, mask)
        g = g * cos + sgn[None, :] * gp * sin_p  # rotate the gradient back: dn
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / D + eps)
    w = tl.load(w_ptr + d, mask=dmask, other=0.0).to(tl.float32)
    gw = g * w[None, :]
    dot = tl.sum(gw * x, axis=1) / D
    dx = rstd[:, None] * gw - x * (rstd * rstd * rstd * dot)[:, None]
    return dx, tl.sum(g * x * rstd[:, None], axis=0)


@triton.jit
def _qk_norm_rope_bwd_kernel(
    q_ptr, k_ptr, qw_ptr, kw_ptr, cos_ptr, sin_ptr, gq_ptr, gk_ptr, dq_ptr, dk_ptr, dqw_ptr, dkw_ptr,
    n_rows, S, H, D,
    sqb, sqs, sqh, skb, sks, skh, sgqb, sgqs, sgqh, sgkb, sgks, sgkh, stride_cs,
    eps,
    HAS_ROPE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    rows, rmask, b, s, h = _row_index(pid, n_rows, S, H, BLOCK_R)
    d = tl.arange(0, BLOCK_D)
    dmask = d < D
    p = d ^ 1
    mask = rmask[:, None] & dmask[None, :]
    sgn = tl.where(d % 2 == 0, 1.0, -1.0)
    cos = tl.zeros((BLOCK_R, BLOCK_D), tl.float32)
    sin_p = tl.zeros((BLOCK_R, BLOCK_D), tl.float32)
    if HAS_ROPE:
        cos = tl.load(cos_ptr + s[:, None] * stride_cs + d[None, :], mask=mask, other=0.0).to(tl.float32)
        sin_p = tl.load(sin_ptr + s[:, None] * stride_cs + p[None, :], mask=mask, other=0.0).to(tl.float32)
    out_offs = rows[:, None] * D + d[None, :]  # dq, dk: contiguous [B, S, H, D]
    dx, dw = _norm_rope_bwd_one(q_ptr, qw_ptr, gq_ptr, b, s, h, d, p, mask, dmask, cos, sin_p, sgn,
                                sqb, sqs, sqh, sgqb, sgqs, sgqh, D, eps, HAS_ROPE)
    tl.store(dq_ptr + out_offs, dx.to(dq_ptr.dtype.element_ty), mask=mask)
    tl.store(dqw_ptr + pid * D + d, dw, mask=dmask)
    dx, dw = _norm_rope_bwd_one(k_ptr, kw_ptr, gk_ptr, b, s, h, d, p, mask, dmask, cos, sin_p, sgn,
                                skb, sks, skh, sgkb, sgks, sgkh, D, eps, HAS_ROPE)
    tl.store(dk_ptr + out_offs, dx.to(dk_ptr.dtype.element_ty), mask=mask)
    tl.store(dkw_ptr + pid * D + d, dw, mask=dmask)


# --------------------------------------------------------------------------------------------------------------
# Reference
# --------------------------------------------------------------------------------------------------------------


def rope_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE on interleaved pairs in fp32 (fp64 for fp64 inputs); ``x`` ``[B, S, H, D]``, ``cos``/``sin`` ``[S, D]``; fp32 result."""
    acc = compute_dtype(x)
    x = x.to(acc)
    real, imag = x.reshape(*x.shape[:-1], -1, 2).unbind(-1)
    rotated = torch.stack([-imag, real], dim=-1).flatten(-2)
    return x * cos[None, :, None, :].to(acc) + rotated * sin[None, :, None, :].to(acc)


def qk_norm_rope_reference(q, k, q_weight, k_weight, cos, sin, eps: float = 1e-6):
    """Plain torch: fp32 ``rms_norm`` over ``D`` with the scale, then RoPE (if ``cos`` is given); results in
    the input dtype."""
    def one(x, w):
        acc = compute_dtype(x)
        n = F.rms_norm(x.to(acc), (x.shape[-1],), w.to(acc), eps)
        return (rope_reference(n, cos, sin) if cos is not None else n).to(x.dtype)

    return one(q, q_weight), one(k, k_weight)


# --------------------------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------------------------


def _strides3(t):  # [B, S, H, D] -> (b, s, h) strides; the last dim is contiguous (validated)
    return t.stride(0), t.stride(1), t.stride(2)


def _fwd_triton(q, k, q_weight, k_weight, cos, sin, eps):
    B, S, H, D = q.shape
    qo, ko = torch.empty_like(q), torch.empty_like(k)  # same layout as the inputs
    cfg = qk_rope_config(D)
    n_rows = B * S * H
    has_rope = cos is not None
    cos_ = cos if has_rope else q_weight
    sin_ = sin if has_rope else q_weight
    grid = (triton.cdiv(n_rows, cfg["BLOCK_R"]),)
    _qk_norm_rope_fwd_kernel[grid](
        q, k, q_weight, k_weight, cos_, sin_, qo, ko, n_rows, S, H, D,
        *_strides3(q), *_strides3(k), *_strides3(qo), *_strides3(ko), cos.stride(0) if has_rope else 0, eps,
        HAS_ROPE=has_rope, BLOCK_R=cfg["BLOCK_R"], BLOCK_D=cfg["BLOCK_D"], num_warps=cfg["num_warps"],
    )
    return qo, ko


def _bwd_triton(q, k, q_weight, k_weight, cos, sin, gq, gk, eps):
    B, S, H, D = q.shape
    cfg = qk_rope_config(D)
    n_rows = B * S * H
    grid = (triton.cdiv(n_rows, cfg["BLOCK_R"]),)
    dq = torch.empty((B, S, H, D), device=q.device, dtype=q.dtype)
    dk = torch.empty((B, S, H, D), device=k.device, dtype=k.dtype)
    dqw = torch.empty((grid[0], D), device=q.device, dtype=torch.float32)
    dkw = torch.empty((grid[0], D), device=q.device, dtype=torch.float32)
    gq, gk = _last_contiguous(gq), _last_contiguous(gk)
    has_rope = cos is not None
    _qk_norm_rope_bwd_kernel[grid](
        q, k, q_weight, k_weight, cos if has_rope else q_weight, sin if has_rope else q_weight, gq, gk, dq, dk,
        dqw, dkw, n_rows, S, H, D, *_strides3(q), *_strides3(k), *_strides3(gq), *_strides3(gk),
        cos.stride(0) if has_rope else 0, eps,
        HAS_ROPE=has_rope, BLOCK_R=cfg["BLOCK_R"], BLOCK_D=cfg["BLOCK_D"], num_warps=cfg["num_warps"],
    )
    return dq, dk, dqw.sum(0).to(q_weight.dtype), dkw.sum(0).to(k_weight.dtype)


def _last_contiguous(t):
    return t if t.stride(-1) == 1 else t.contiguous()


class _QKNormRope(torch.autograd.Function):
    """Forward: the Triton kernel, or the csrc one (``impl="cuda"``); backward: the Triton kernel."""

    @staticmethod
    def forward(ctx, q, k, q_weight, k_weight, cos, sin, eps, impl="triton"):
        ctx.save_for_backward(q, k, q_weight, k_weight, cos, sin)
        ctx.eps = eps
        if impl == "cuda":
            from .cuda_backend import qk_norm_rope_cuda

            return qk_norm_rope_cuda(q, k, q_weight, k_weight, cos, sin, eps)
        return _fwd_triton(q, k, q_weight, k_weight, cos, sin, eps)

    @staticmethod
    def backward(ctx, gq, gk):
        q, k, q_weight, k_weight, cos, sin = ctx.saved_tensors
        gq = torch.zeros_like(q) if gq is None else gq
        gk = torch.zeros_like(k) if gk is None else gk
        dq, dk, dqw, dkw = _bwd_triton(q, k, q_weight, k_weight, cos, sin, gq, gk, ctx.eps)
        return dq, dk, dqw, dkw, None, None, None, None


def _validate(q, k, q_weight, k_weight, cos, sin, eps):
    named = {"q": q, "k": k, "q_weight": q_weight, "k_weight": k_weight}
    check_rope_pair("qk_norm_rope", cos, sin, named)
    check_tensors("qk_norm_rope", named, q.device if isinstance(q, torch.Tensor) else None, "q",
                  last_contiguous=True)
    if q.dim() != 4:
        raise ValueError(f"qk_norm_rope: q must be [B, S, H, D], got shape {tuple(q.shape)}")
    if k.shape != q.shape:
        raise ValueError(f"qk_norm_rope: k has shape {tuple(k.shape)}, q has {tuple(q.shape)}")
    if k.dtype != q.dtype:
        raise TypeError(f"qk_norm_rope: k dtype {k.dtype} differs from q dtype {q.dtype}")
    B, S, H, D = q.shape
    if D % 2:
        raise ValueError(f"qk_norm_rope: head_dim D={D} must be even (RoPE rotates pairs)")
    for name, w in (("q_weight", q_weight), ("k_weight", k_weight)):
        if w.shape != (D,):
            raise ValueError(f"qk_norm_rope: {name} must be [{D}], got shape {tuple(w.shape)}")
    if cos is not None:
        for name, t in (("cos", cos), ("sin", sin)):
            if t.shape != (S, D):
                raise ValueError(f"qk_norm_rope: {name} must be [S, D] = [{S}, {D}], got shape {tuple(t.shape)}")
    if not eps > 0:
        raise ValueError(f"qk_norm_rope: eps must be positive, got {eps}")


def qk_norm_rope(q: torch.Tensor, k: torch.Tensor, q_weight: torch.Tensor, k_weight: torch.Tensor,
                 cos: torch.Tensor | None, sin: torch.Tensor | None, eps: float = 1e-6,
                 backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-head RMSNorm with learnable scale, then RoPE on interleaved pairs; returns ``(q, k)``.

    Args:
        q, k: ``[B, S, H, D]``, any strides with a contiguous last dim; outputs have the inputs' layout.
        q_weight, k_weight: ``[D]`` RMSNorm scales.
        cos, sin: ``[S, D]`` (``None`` for no rotation).
        backend: ``"torch"``, ``"triton"`` or ``"cuda"`` (csrc forward); default: triton for CUDA tensors,
            torch on CPU.
    """
    _validate(q, k, q_weight, k_weight, cos, sin, eps)
    chosen = select_backend("qk_norm_rope", q.device, backend, cuda_kernel=True)
    if chosen == "torch":
        return qk_norm_rope_reference(q, k, q_weight, k_weight, cos, sin, eps)
    if cos is not None and sin.stride() != cos.stride():
        cos, sin = cos.contiguous(), sin.contiguous()  # the kernels take one row stride for both
    return _QKNormRope.apply(q, k, q_weight, k_weight, cos, sin, eps, chosen)
