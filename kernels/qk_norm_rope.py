"""Per-head RMSNorm (learnable scale) followed by RoPE on interleaved pairs, for Q and K in one launch.

``q``, ``k``: ``[B, S, H, D]`` with any strides whose last dim is contiguous (so a ``[B, H, S, D]`` buffer
transposed to ``[B, S, H, D]`` works without a copy); ``cos``, ``sin``: ``[S, D]`` as diffusers'
``Flux2PosEmbed`` returns them (each angle repeated for the two elements of a pair); the kernels read the compact
``[2, S, D/2]`` table of :func:`tpfuse.kernels._rope.angle_table` (one angle per pair, built on the device).

RoPE on pair ``(x[2i], x[2i+1])``: ``out[2i] = x[2i] cos - x[2i+1] sin``, ``out[2i+1] = x[2i+1] cos + x[2i] sin``.
A program owns BLOCK_S tokens x BLOCK_H heads (a power of two dividing H), so its indices need no per-row
division; it loads each row once and takes the partner from registers (``reshape`` to ``[R, D/2, 2]`` +
``split``: a thread holds whole pairs). An earlier version reloaded the row at ``d ^ 1`` and divided row indices
in int64: 0.19-0.21 warp instructions per DRAM byte with 6 ``CALL``s; this one is 0.08-0.09 (``tpfuse
compile-report``).

:func:`qk_norm_rope_joint` runs two token segments (the double-stream block's text and image) into one joint output
for Q, K and V in one launch.

Each op is ONE ``torch.library`` op on every backend (``tpfuse::qk_norm_rope``, ``tpfuse::qk_norm_rope_joint``:
fake implementations, registered autograd; the Triton backward is ``tpfuse::qk_norm_rope_backward``), so
``torch.compile(fullgraph=True)`` sees one node per call; the launcher validates and picks the backend. On the
torch backend the backward is :func:`norm_rope_backward` (torch ops); the angles' gradients (``cos``/``sin``
requiring grad) are computed by it on every backend.

Forward and backward are Triton kernels. Backward: with ``n = x * rstd * w`` and ``g = dy`` rotated back,
``dn = R(-angle) g``, ``dx = rstd * (dn w) - x * rstd^3 * mean(dn w x)``, ``dw = sum_rows dn * x * rstd``
(per-program partial sums reduced in torch); ``rstd`` is saved by a forward that will be differentiated (8 bytes
per (token, head)), recomputed after a csrc forward.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from ._autocast import _like, autocast_dtype, autocast_off
from ._checks import check_eps, check_int32_addressable, check_rope_pair, check_tensors
from ._dispatch import select_backend
from ._math import compute_dtype, in_layout_of
from ._rope import angle_table
from ._triton import tl, triton

__all__ = [
    "qk_norm_rope",
    "qk_norm_rope_joint",
    "qk_norm_rope_joint_reference",
    "qk_norm_rope_reference",
    "norm_rope_backward",
    "qk_rope_config",
    "rope_reference",
]


# Rows (one token's one head) per program: ~32 rows of a 128-wide head (8 KB of bf16 per tensor) amortize the
# per-program setup; tokens x heads with the head count a power of two that divides H, so a program's rows never
# straddle a sequence or a head block and its indices need no division.
ROWS_PER_PROGRAM = 32


def qk_rope_config(d: int, heads: int, with_v: bool = False, backward: bool = False) -> dict:
    """Tile: BLOCK_S tokens x BLOCK_H heads x the whole (power-of-two padded) head dim. 2 warps, so each thread
    holds 64 elements of each of Q and K and the per-warp setup is spread over twice the bytes of 4 warps
    (sm_90, klein-4B: 0.08-0.09 warp instructions per byte forward against 0.09-0.10); with V riding along (the
    joint double-stream launch) 4 warps, where 2 spill."""
    block_d = triton.next_power_of_2(d)
    rows = max(1, ROWS_PER_PROGRAM * 128 // block_d)
    # The backward holds twice the tensors: 4-head blocks spilled there (4 bytes, klein-4B TP 2), 2-head ones do not.
    max_h = 2 if backward else rows
    block_h = 1
    while block_h * 2 <= max_h and heads % (block_h * 2) == 0:
        block_h *= 2
    return {"BLOCK_D": block_d, "BLOCK_H": block_h, "BLOCK_S": max(1, rows // block_h),
            "num_warps": 4 if with_v else 2}


@triton.jit
def _pairs(x, R: tl.constexpr, BLOCK_D: tl.constexpr):
    """[R, BLOCK_D] -> (even, odd) features [R, BLOCK_D/2]: a thread holds whole pairs, so this moves no data."""
    return tl.split(tl.reshape(x, (R, BLOCK_D // 2, 2)))


@triton.jit
def _interleave(e, o, R: tl.constexpr, BLOCK_D: tl.constexpr):
    return tl.reshape(tl.join(e, o), (R, BLOCK_D))


@triton.jit
def _scales(qw_ptr, kw_ptr, d, dmask):
    """Q's and K's [D] scales as one [2, D] load (two elements per thread: 32-bit loads; a [D] vector on its own
    compiled to one 16-bit load per thread), split into two fp32 vectors."""
    which = tl.arange(0, 2)
    base = tl.multiple_of(tl.where(which == 0, qw_ptr, kw_ptr), 16)  # both 16-byte aligned (the launcher checks)
    w = tl.load(base[:, None] + d[None, :], mask=dmask[None, :] & (which[:, None] < 2), other=0.0).to(tl.float32)
    return tl.split(tl.permute(w, (1, 0)))


@triton.jit
def _tile(pid, S0, S1, H, BLOCK_S: tl.constexpr, BLOCK_H: tl.constexpr):
    """This program's (batch, segment, first token in the segment, first head); programs run over
    [batch][segment 0's token blocks, segment 1's token blocks][head blocks]."""
    n_hb = H // BLOCK_H
    n_sb0 = tl.cdiv(S0, BLOCK_S)
    per_b = (n_sb0 + tl.cdiv(S1, BLOCK_S)) * n_hb
    b = pid // per_b
    rem = pid % per_b
    sb = rem // n_hb
    seg1 = sb >= n_sb0
    s0 = tl.where(seg1, sb - n_sb0, sb) * BLOCK_S
    return b, seg1, s0, (rem % n_hb) * BLOCK_H


@triton.jit
def _norm_rope_fwd(x_ptr, w, o_ptr, in_rows, out_rows, d, mask, dmask, cs, sn, D, eps,
                   R: tl.constexpr, BLOCK_D: tl.constexpr, HAS_ROPE: tl.constexpr):
    x = tl.load(x_ptr + in_rows[:, None] + d[None, :], mask=mask, other=0.0).to(tl.float32)
    rstd = tl.rsqrt(tl.sum(x * x, axis=1) / D + eps)  # [R]; MUFU.RSQ: 1/sqrt with IEEE division was ~15 instr per row
    n = x * rstd[:, None] * w[None, :]
    if HAS_ROPE:
        e, o = _pairs(n, R, BLOCK_D)  # the RoPE partner comes from registers, not a second load
        n = _interleave(e * cs - o * sn, o * cs + e * sn, R, BLOCK_D)
    tl.store(o_ptr + out_rows[:, None] + d[None, :], n.to(o_ptr.dtype.element_ty), mask=mask)
    return rstd


@triton.jit
def _qk_norm_rope_fwd_kernel(
    q0_ptr, k0_ptr, v0_ptr, q1_ptr, k1_ptr, v1_ptr, qw0_ptr, kw0_ptr, qw1_ptr, kw1_ptr, ang_ptr,
    qo_ptr, ko_ptr, vo_ptr, rstd_ptr,
    B, S0, S1, H, D: tl.constexpr,
    sq0b, sq0s, sq0h, sk0b, sk0s, sk0h, sv0b, sv0s, sv0h,
    sq1b, sq1s, sq1h, sk1b, sk1s, sk1h, sv1b, sv1s, sv1h,
    sqob, sqos, sqoh, skob, skos, skoh, svob, svos, svoh,
    eps0, eps1,
    HAS_ROPE: tl.constexpr, HAS_V: tl.constexpr, TWO_SEGMENTS: tl.constexpr, SAVE_RSTD: tl.constexpr,
    BLOCK_S: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Segment 0 then segment 1 (e.g. text then image tokens) of Q and K (and V, copied) into one output of
    S0 + S1 tokens; each segment has its own inputs, RMSNorm scales and eps. With SAVE_RSTD, each row's
    1/rms goes to ``rstd`` ``[2, B, S0 + S1, H]`` fp32 (Q, K) for the backward. int32 offsets (the launcher checks
    every tensor's extent)."""
    R: tl.constexpr = BLOCK_S * BLOCK_H
    b, seg1, s0, h0 = _tile(tl.program_id(0), S0, S1, H, BLOCK_S, BLOCK_H)
    seg1 = seg1 & TWO_SEGMENTS  # one segment: every select below folds away
    r = tl.arange(0, R)
    s = s0 + r // BLOCK_H  # token in the segment (BLOCK_H is a power of two: a shift)
    h = h0 + r % BLOCK_H
    s_out = tl.where(seg1, S0, 0) + s  # token in the output, and the angle table's row
    rmask = s < tl.where(seg1, S1, S0)
    d = tl.arange(0, BLOCK_D)
    dmask = d < D
    mask = rmask[:, None] & dmask[None, :]
    cs = tl.zeros((R, BLOCK_D // 2), tl.float32)
    sn = tl.zeros((R, BLOCK_D // 2), tl.float32)
    if HAS_ROPE:  # the compact [2, S0 + S1, D/2] table: one angle per pair, shared by Q and K
        j = tl.arange(0, BLOCK_D // 2)
        a_off = s_out[:, None] * (D // 2) + j[None, :]
        a_mask = rmask[:, None] & (j < D // 2)[None, :]
        cs = tl.load(ang_ptr + a_off, mask=a_mask, other=0.0)
        sn = tl.load(ang_ptr + (S0 + S1) * (D // 2) + a_off, mask=a_mask, other=0.0)
    # Scalar selects of the segment's pointers and strides: one program never straddles two segments.
    q_in = tl.where(seg1, b * sq1b, b * sq0b) + s * tl.where(seg1, sq1s, sq0s) + h * tl.where(seg1, sq1h, sq0h)
    k_in = tl.where(seg1, b * sk1b, b * sk0b) + s * tl.where(seg1, sk1s, sk0s) + h * tl.where(seg1, sk1h, sk0h)
    eps = tl.where(seg1, eps1, eps0)
    qw, kw = _scales(tl.where(seg1, qw1_ptr, qw0_ptr), tl.where(seg1, kw1_ptr, kw0_ptr), d, dmask)
    rq = _norm_rope_fwd(tl.where(seg1, q1_ptr, q0_ptr), qw, qo_ptr, q_in,
                        b * sqob + s_out * sqos + h * sqoh, d, mask, dmask, cs, sn, D, eps, R, BLOCK_D, HAS_ROPE)
    rk = _norm_rope_fwd(tl.where(seg1, k1_ptr, k0_ptr), kw, ko_ptr, k_in,
                        b * skob + s_out * skos + h * skoh, d, mask, dmask, cs, sn, D, eps, R, BLOCK_D, HAS_ROPE)
    if SAVE_RSTD:  # 8 bytes per (token, head) against the 1 KB of Q and K rows moved
        r_off = (b * (S0 + S1) + s_out) * H + h
        tl.store(rstd_ptr + r_off, rq, mask=rmask)
        tl.store(rstd_ptr + B * (S0 + S1) * H + r_off, rk, mask=rmask)
    if HAS_V:  # V of both segments lands in the same joint output, in the same pass
        v_in = tl.where(seg1, b * sv1b, b * sv0b) + s * tl.where(seg1, sv1s, sv0s) + h * tl.where(seg1, sv1h, sv0h)
        v = tl.load(tl.where(seg1, v1_ptr, v0_ptr) + v_in[:, None] + d[None, :], mask=mask)
        tl.store(vo_ptr + (b * svob + s_out * svos + h * svoh)[:, None] + d[None, :], v, mask=mask)


@triton.jit
def _norm_rope_bwd(x_ptr, w, g_ptr, dx_ptr, x_rows, g_rows, dx_rows, d, mask, dmask, cs, sn, D, eps, rstd_ptr,
                   rstd_rows, rmask, R: tl.constexpr, BLOCK_D: tl.constexpr, HAS_ROPE: tl.constexpr,
                   SAVED_RSTD: tl.constexpr):
    """Writes dx; returns this program's partial dw [BLOCK_D]. The forward's saved 1/rms spares the sum of squares
    (0.099-0.108 warp instructions per byte recomputing it)."""
    x = tl.load(x_ptr + x_rows[:, None] + d[None, :], mask=mask, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + g_rows[:, None] + d[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_ROPE:  # rotate the gradient back by -angle: dn
        ge, go = _pairs(g, R, BLOCK_D)
        g = _interleave(ge * cs + go * sn, go * cs - ge * sn, R, BLOCK_D)
    if SAVED_RSTD:
        rstd = tl.load(rstd_ptr + rstd_rows, mask=rmask, other=0.0)
    else:  # a csrc forward saves none
        rstd = tl.rsqrt(tl.sum(x * x, axis=1) / D + eps)
    t = g * x  # shared by both reductions: sum_d(t w) for dx, sum_rows(t rstd) for dw
    dot = tl.sum(t * w[None, :], axis=1) / D
    dx = rstd[:, None] * (g * w[None, :]) - x * (rstd * rstd * rstd * dot)[:, None]
    tl.store(dx_ptr + dx_rows[:, None] + d[None, :], dx.to(dx_ptr.dtype.element_ty), mask=mask)
    return tl.sum(t * rstd[:, None], axis=0)


@triton.jit
def _qk_norm_rope_bwd_kernel(
    q_ptr, k_ptr, qw_ptr, kw_ptr, ang_ptr, rstd_ptr, gq_ptr, gk_ptr, dq_ptr, dk_ptr, dqw_ptr, dkw_ptr,
    B, S, H, D: tl.constexpr, ANG_ROW0, ANG_ROWS,
    sqb, sqs, sqh, skb, sks, skh, sgqb, sgqs, sgqh, sgkb, sgks, sgkh,
    eps,
    HAS_ROPE: tl.constexpr, SAVED_RSTD: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """One segment: its tokens are rows ANG_ROW0.. of the forward's output of ANG_ROWS tokens, of the
    [2, ANG_ROWS, D/2] angle table and of the saved [2, B, ANG_ROWS, H] 1/rms. dq, dk: contiguous
    [B, S, H, D]; dqw, dkw: a [D] partial sum per program (reduced in torch)."""
    R: tl.constexpr = BLOCK_S * BLOCK_H
    pid = tl.program_id(0)
    b, _seg1, s0, h0 = _tile(pid, S, 0, H, BLOCK_S, BLOCK_H)
    r = tl.arange(0, R)
    s = s0 + r // BLOCK_H
    h = h0 + r % BLOCK_H
    rmask = s < S
    d = tl.arange(0, BLOCK_D)
    dmask = d < D
    mask = rmask[:, None] & dmask[None, :]
    cs = tl.zeros((R, BLOCK_D // 2), tl.float32)
    sn = tl.zeros((R, BLOCK_D // 2), tl.float32)
    if HAS_ROPE:
        j = tl.arange(0, BLOCK_D // 2)
        a_off = (ANG_ROW0 + s)[:, None] * (D // 2) + j[None, :]
        a_mask = rmask[:, None] & (j < D // 2)[None, :]
        cs = tl.load(ang_ptr + a_off, mask=a_mask, other=0.0)
        sn = tl.load(ang_ptr + ANG_ROWS * (D // 2) + a_off, mask=a_mask, other=0.0)
    out_rows = ((b * S + s) * H + h) * D
    qw, kw = _scales(qw_ptr, kw_ptr, d, dmask)
    r_rows = (b * ANG_ROWS + ANG_ROW0 + s) * H + h
    dw = _norm_rope_bwd(q_ptr, qw, gq_ptr, dq_ptr, b * sqb + s * sqs + h * sqh, b * sgqb + s * sgqs + h * sgqh,
                        out_rows, d, mask, dmask, cs, sn, D, eps, rstd_ptr, r_rows, rmask, R, BLOCK_D, HAS_ROPE,
                        SAVED_RSTD)
    tl.store(dqw_ptr + pid * D + d, dw, mask=dmask)
    dw = _norm_rope_bwd(k_ptr, kw, gk_ptr, dk_ptr, b * skb + s * sks + h * skh, b * sgkb + s * sgks + h * sgkh,
                        out_rows, d, mask, dmask, cs, sn, D, eps, rstd_ptr, B * ANG_ROWS * H + r_rows, rmask, R,
                        BLOCK_D, HAS_ROPE, SAVED_RSTD)
    tl.store(dkw_ptr + pid * D + d, dw, mask=dmask)


# --------------------------------------------------------------------------------------------------------------
# Reference
# --------------------------------------------------------------------------------------------------------------


def rope_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE on interleaved pairs in fp32 (fp64 for fp64 inputs); ``x`` ``[B, S, H, D]``, ``cos``/``sin`` ``[S, D]``; fp32 result."""
    acc = compute_dtype(x)
    x = x.to(acc)
    rotated = _rotate(x)
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


def _scales_as_one(*weights: torch.Tensor) -> list[torch.Tensor]:
    """The [D] scales in one dtype (the kernels pick Q's or K's, or a segment's, with one pointer select, which
    needs one element type) and 16-byte aligned (read as aligned vectors, ``tl.multiple_of``): a copy only where
    one is needed."""
    dtype = weights[0].dtype
    for w in weights[1:]:
        dtype = torch.promote_types(dtype, w.dtype)
    out = []
    for w in weights:
        w = _last_contiguous(w.to(dtype))
        out.append(w if w.data_ptr() % 16 == 0 else w.clone())
    return out


def _angles(op, cos, sin):
    return angle_table(op, cos, sin) if cos is not None else None  # [2, S, D/2] fp32


def _fwd_launch(segs, angles, outs, eps, rstd=None):
    """``segs``: one or two ``(q, k, v or None, q_weight, k_weight)``, each ``[B, S_i, H, D]``, written to token
    rows ``[0, S_0)`` and ``[S_0, S_0 + S_1)`` of ``outs = (qo, ko, vo or None)``; ``angles`` covers those rows;
    ``rstd`` (``[2, B, S_0 + S_1, H]`` fp32, for a backward) receives each row's 1/rms."""
    scales = iter(_scales_as_one(*(w for sg in segs for w in sg[3:5])))
    segs = [(q, k, v, next(scales), next(scales)) for q, k, v, _, _ in segs]
    q0 = segs[0][0]
    B, S0, H, D = q0.shape
    seg1 = segs[1] if len(segs) > 1 else segs[0]
    S1 = seg1[0].shape[1] if len(segs) > 1 else 0
    qo, ko, vo = outs
    has_v = vo is not None
    named = {f"{n}{i}": t for i, sg in enumerate(segs) for n, t in zip("qkv", sg[:3]) if t is not None}
    check_int32_addressable("qk_norm_rope", {**named, "qo": qo, "ko": ko, "vo": vo, "angles": angles, "rstd": rstd})
    cfg = qk_rope_config(D, H, has_v)
    grid = (B * (triton.cdiv(S0, cfg["BLOCK_S"]) + triton.cdiv(S1, cfg["BLOCK_S"])) * (H // cfg["BLOCK_H"]),)
    v0, v1 = (segs[0][2], seg1[2]) if has_v else (q0, q0)
    vs = (*_strides3(v0), *_strides3(v1), *_strides3(vo)) if has_v else (0,) * 9
    _qk_norm_rope_fwd_kernel[grid](
        q0, segs[0][1], v0, seg1[0], seg1[1], v1, segs[0][3], segs[0][4], seg1[3], seg1[4],
        angles if angles is not None else q0, qo, ko, vo if has_v else qo, rstd if rstd is not None else qo,
        B, S0, S1, H, D,
        *_strides3(q0), *_strides3(segs[0][1]), *vs[0:3], *_strides3(seg1[0]), *_strides3(seg1[1]), *vs[3:6],
        *_strides3(qo), *_strides3(ko), *vs[6:9],
        eps[0], eps[-1],
        HAS_ROPE=angles is not None, HAS_V=has_v, TWO_SEGMENTS=len(segs) > 1, SAVE_RSTD=rstd is not None,
        BLOCK_S=cfg["BLOCK_S"], BLOCK_H=cfg["BLOCK_H"],
        BLOCK_D=cfg["BLOCK_D"], num_warps=cfg["num_warps"],
    )
    return outs


def _bwd_launch(q, k, q_weight, k_weight, angles, row0, rows, rstd, gq, gk, eps):
    """Gradients of one segment whose tokens are rows ``row0..`` of a forward output of ``rows`` tokens (its rows of
    ``angles`` and of the saved ``rstd``; ``rstd=None`` recomputes 1/rms)."""
    B, S, H, D = q.shape
    cfg = qk_rope_config(D, H, backward=True)
    grid = (B * triton.cdiv(S, cfg["BLOCK_S"]) * (H // cfg["BLOCK_H"]),)
    dq = torch.empty((B, S, H, D), device=q.device, dtype=q.dtype)
    dk = torch.empty((B, S, H, D), device=k.device, dtype=k.dtype)
    dqw = torch.empty((grid[0], D), device=q.device, dtype=torch.float32)
    dkw = torch.empty((grid[0], D), device=q.device, dtype=torch.float32)
    gq, gk = _last_contiguous(gq), _last_contiguous(gk)
    q_weight, k_weight = _scales_as_one(q_weight, k_weight)
    check_int32_addressable("qk_norm_rope", {"q": q, "k": k, "gq": gq, "gk": gk, "dq": dq, "angles": angles,
                                             "rstd": rstd})
    has_rope = angles is not None
    _qk_norm_rope_bwd_kernel[grid](
        q, k, q_weight, k_weight, angles if has_rope else q, rstd if rstd is not None else q, gq, gk, dq, dk, dqw,
        dkw, B, S, H, D, row0, rows,
        *_strides3(q), *_strides3(k), *_strides3(gq), *_strides3(gk), eps,
        HAS_ROPE=has_rope, SAVED_RSTD=rstd is not None, BLOCK_S=cfg["BLOCK_S"], BLOCK_H=cfg["BLOCK_H"],
        BLOCK_D=cfg["BLOCK_D"], num_warps=cfg["num_warps"],
    )
    return dq, dk, dqw.sum(0).to(q_weight.dtype), dkw.sum(0).to(k_weight.dtype)


def _rstd_buffer(B, S, H, device, save: bool):
    return torch.empty((2, B, S, H), device=device, dtype=torch.float32) if save else None


def _fwd_triton(q, k, q_weight, k_weight, cos, sin, eps, save_rstd: bool = False):
    """One segment: ``(qo, ko, rstd)``, outputs in the inputs' layout, ``rstd`` the ``[2, B, S, H]`` 1/rms with
    ``save_rstd`` (else ``None``)."""
    B, S, H, _ = q.shape
    outs = (torch.empty_like(q), torch.empty_like(k), None)
    rstd = _rstd_buffer(B, S, H, q.device, save_rstd)
    _fwd_launch([(q, k, None, q_weight, k_weight)], _angles("qk_norm_rope", cos, sin), outs, (eps,), rstd)
    return (*outs[:2], rstd)


def _bwd_triton(q, k, q_weight, k_weight, cos, sin, gq, gk, eps, rstd=None):
    return _bwd_launch(q, k, q_weight, k_weight, _angles("qk_norm_rope", cos, sin), 0, q.shape[1], rstd, gq, gk,
                       eps)


def _last_contiguous(t):
    return t if t.stride(-1) == 1 else t.contiguous()


def _rotate(x: torch.Tensor) -> torch.Tensor:
    """``R x`` on interleaved pairs: ``(x[2i], x[2i+1]) -> (-x[2i+1], x[2i])`` (RoPE is ``x cos + R x sin``)."""
    real, imag = x.reshape(*x.shape[:-1], x.shape[-1] // 2, 2).unbind(-1)  # explicit: also for 0 tokens or heads
    return torch.stack([-imag, real], dim=-1).flatten(-2)


def norm_rope_backward(x: torch.Tensor, w: torch.Tensor, cos: torch.Tensor | None, sin: torch.Tensor | None,
                       grad: torch.Tensor, eps: float, needs=(True, True, True)):
    """Gradients ``(dx, dw, (dcos, dsin))`` of ``rope(rms_norm(x) * w)`` for ``x``, ``grad`` ``[B, S, H, D]``
    (``None`` where ``needs`` — x, w, angles — is False), in fp32 (fp64 for fp64 inputs).

    With ``n = x rstd w`` and ``out = n cos + R n sin`` (``R^T = -R``): ``dn = g cos - R (g sin)``,
    ``dx = rstd (dn w) - x rstd^3 mean(dn w x)``, ``dw = sum dn x rstd``, ``dcos = sum_{b,h} g n``,
    ``dsin = sum_{b,h} g R n``. Plain torch ops, so ``torch.compile`` traces it into the backward graph.
    """
    acc = compute_dtype(x)
    xf, g, wf = x.to(acc), grad.to(acc), w.to(acc)
    rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)  # [B, S, H, 1]
    dn = g
    if cos is not None:
        c, s_ = cos[None, :, None, :].to(acc), sin[None, :, None, :].to(acc)
        dn = g * c - _rotate(g * s_)
    dx = dw = angles = None
    if needs[0]:
        dnw = dn * wf
        dx = (rstd * dnw - xf * rstd.pow(3) * (dnw * xf).mean(-1, keepdim=True)).to(x.dtype)
    if needs[1]:
        dw = (dn * xf * rstd).sum(dim=(0, 1, 2)).to(w.dtype)
    if needs[2] and cos is not None:
        n = xf * rstd * wf
        angles = ((g * n).sum(dim=(0, 2)).to(cos.dtype), (g * _rotate(n)).sum(dim=(0, 2)).to(sin.dtype))  # [S, D]
    return dx, dw, angles


# --------------------------------------------------------------------------------------------------------------
# torch.library ops: one graph node each under torch.compile; the launcher picks the backend, the op runs it
# --------------------------------------------------------------------------------------------------------------


@torch.library.custom_op("tpfuse::qk_norm_rope", mutates_args=())
def _qk_norm_rope_op(q: torch.Tensor, k: torch.Tensor, q_weight: torch.Tensor, k_weight: torch.Tensor,
                     cos: torch.Tensor | None, sin: torch.Tensor | None, eps: float, backend: str,
                     save_rstd: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(q_out, k_out, rstd)``: outputs in ``empty_like(q)``'s layout on every backend; ``rstd`` the
    ``[2, B, S, H]`` fp32 1/rms a Triton forward saves for its backward (``save_rstd``), else empty."""
    empty = q.new_empty((0,), dtype=torch.float32)
    if backend == "torch":
        qo, ko = qk_norm_rope_reference(q, k, q_weight, k_weight, cos, sin, eps)
        return in_layout_of(qo, q), in_layout_of(ko, k), empty
    if backend == "cuda":
        from .cuda_backend import qk_norm_rope_cuda

        qo, ko = qk_norm_rope_cuda(q, k, q_weight, k_weight, _angles("qk_norm_rope", cos, sin), eps)
        return qo, ko, empty
    qo, ko, rstd = _fwd_triton(q, k, q_weight, k_weight, cos, sin, eps, save_rstd=save_rstd)
    return qo, ko, rstd if rstd is not None else empty


def _saves_rstd(backend: str, save_rstd: bool) -> bool:
    return backend == "triton" and save_rstd


@_qk_norm_rope_op.register_fake
def _(q, k, q_weight, k_weight, cos, sin, eps, backend, save_rstd):
    B, S, H, _ = q.shape
    rstd = (2, B, S, H) if _saves_rstd(backend, save_rstd) else (0,)
    return torch.empty_like(q), torch.empty_like(k), q.new_empty(rstd, dtype=torch.float32)


@torch.library.custom_op("tpfuse::qk_norm_rope_backward", mutates_args=())
def _qk_norm_rope_bwd_op(q: torch.Tensor, k: torch.Tensor, q_weight: torch.Tensor, k_weight: torch.Tensor,
                         cos: torch.Tensor | None, sin: torch.Tensor | None, rstd: torch.Tensor, gq: torch.Tensor,
                         gk: torch.Tensor, eps: float, row0: int,
                         rows: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The Triton backward of one segment whose tokens are rows ``row0..`` of a forward output of ``rows`` tokens
    (``cos``/``sin``: that output's ``[rows, D]``; ``rstd``: its saved ``[2, B, rows, H]``, or empty to recompute):
    ``(dq, dk, dq_weight, dk_weight)``, ``dq``/``dk`` contiguous, the scales' gradients in their promoted dtype."""
    return _bwd_launch(q, k, q_weight, k_weight, _angles("qk_norm_rope", cos, sin), row0, rows,
                       rstd if rstd.numel() else None, gq, gk, eps)


@_qk_norm_rope_bwd_op.register_fake
def _(q, k, q_weight, k_weight, cos, sin, rstd, gq, gk, eps, row0, rows):
    wdtype = torch.promote_types(q_weight.dtype, k_weight.dtype)
    return (q.new_empty(q.shape), k.new_empty(k.shape), q_weight.new_empty(q_weight.shape, dtype=wdtype),
            k_weight.new_empty(k_weight.shape, dtype=wdtype))


def _segment_grads(backend, q, k, qw, kw, cos, sin, rstd, gq, gk, eps, row0, rows, needs):
    """``(dq, dk, dqw, dkw, (dcos, dsin) or None)`` of one segment (its rows of ``cos``/``sin``/``rstd`` are
    ``row0..row0 + S`` of ``rows``). ``needs``: q, k, q_weight, k_weight, angles."""
    S = q.shape[1]
    seg_cos = seg_sin = None
    if cos is not None:
        seg_cos, seg_sin = cos[row0:row0 + S], sin[row0:row0 + S]
    gq = torch.zeros_like(q) if gq is None else gq
    gk = torch.zeros_like(k) if gk is None else gk
    if backend == "torch":
        dq, dqw, ang_q = norm_rope_backward(q, qw, seg_cos, seg_sin, gq, eps, (needs[0], needs[2], needs[4]))
        dk, dkw, ang_k = norm_rope_backward(k, kw, seg_cos, seg_sin, gk, eps, (needs[1], needs[3], needs[4]))
    else:
        dq, dk, dqw, dkw = _qk_norm_rope_bwd_op(q, k, qw, kw, cos, sin, rstd, gq, gk, eps, row0, rows)
        dqw, dkw = dqw.to(qw.dtype), dkw.to(kw.dtype)
        ang_q = ang_k = None
        if needs[4] and cos is not None:  # the kernel leaves the angles' gradients to torch
            ang_q = norm_rope_backward(q, qw, seg_cos, seg_sin, gq, eps, (False, False, True))[2]
            ang_k = norm_rope_backward(k, kw, seg_cos, seg_sin, gk, eps, (False, False, True))[2]
    angles = None if ang_q is None else (ang_q[0] + ang_k[0], ang_q[1] + ang_k[1])
    return dq, dk, dqw, dkw, angles


def _qk_setup(ctx, inputs, output):
    q, k, q_weight, k_weight, cos, sin, eps, backend, _save = inputs
    ctx.save_for_backward(q, k, q_weight, k_weight, cos, sin, output[2])
    ctx.eps, ctx.backend = eps, backend


def _qk_backward(ctx, gq, gk, _grstd):
    q, k, q_weight, k_weight, cos, sin, rstd = ctx.saved_tensors
    n = ctx.needs_input_grad
    dq, dk, dqw, dkw, angles = _segment_grads(ctx.backend, q, k, q_weight, k_weight, cos, sin, rstd, gq, gk,
                                              ctx.eps, 0, q.shape[1], (n[0], n[1], n[2], n[3], n[4] or n[5]))
    dcos, dsin = angles if angles is not None else (None, None)
    return (dq if n[0] else None, dk if n[1] else None, dqw if n[2] else None, dkw if n[3] else None,
            dcos if n[4] else None, dsin if n[5] else None, None, None, None)


_qk_norm_rope_op.register_autograd(_qk_backward, setup_context=_qk_setup)


@torch.library.custom_op("tpfuse::qk_norm_rope_joint", mutates_args=())
def _qk_norm_rope_joint_op(q0: torch.Tensor, k0: torch.Tensor, v0: torch.Tensor, qw0: torch.Tensor,
                           kw0: torch.Tensor, q1: torch.Tensor, k1: torch.Tensor, v1: torch.Tensor,
                           qw1: torch.Tensor, kw1: torch.Tensor, cos: torch.Tensor | None, sin: torch.Tensor | None,
                           eps0: float, eps1: float, backend: str,
                           save_rstd: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(q, k, v, rstd)``: contiguous ``[B, S0 + S1, H, D]`` joint outputs; ``rstd`` ``[2, B, S0 + S1, H]`` fp32
    when a Triton forward saves it (``save_rstd``), else empty."""
    if backend == "torch":
        q, k, v = qk_norm_rope_joint_reference((q0, q1), (k0, k1), (v0, v1), (qw0, qw1), (kw0, kw1), cos, sin,
                                               (eps0, eps1))
        return q.contiguous(), k.contiguous(), v.contiguous(), q0.new_empty((0,), dtype=torch.float32)
    B, S0, H, D = q0.shape
    S = S0 + q1.shape[1]
    outs = tuple(torch.empty((B, S, H, D), device=q0.device, dtype=q0.dtype) for _ in range(3))
    rstd = _rstd_buffer(B, S, H, q0.device, save_rstd)
    _fwd_launch([(q0, k0, v0, qw0, kw0), (q1, k1, v1, qw1, kw1)], _angles("qk_norm_rope", cos, sin), outs,
                (eps0, eps1), rstd)
    return (*outs, rstd if rstd is not None else q0.new_empty((0,), dtype=torch.float32))


@_qk_norm_rope_joint_op.register_fake
def _(q0, k0, v0, qw0, kw0, q1, k1, v1, qw1, kw1, cos, sin, eps0, eps1, backend, save_rstd):
    B, S0, H, D = q0.shape
    S = S0 + q1.shape[1]
    rstd = (2, B, S, H) if _saves_rstd(backend, save_rstd) else (0,)
    return (*(q0.new_empty((B, S, H, D)) for _ in range(3)), q0.new_empty(rstd, dtype=torch.float32))


def _joint_setup(ctx, inputs, output):
    q0, k0, _v0, qw0, kw0, q1, k1, _v1, qw1, kw1, cos, sin, eps0, eps1, backend, _save = inputs
    ctx.save_for_backward(q0, k0, qw0, kw0, q1, k1, qw1, kw1, cos, sin, output[3])
    ctx.eps, ctx.backend = (eps0, eps1), backend


def _joint_backward(ctx, gq, gk, gv, _grstd):
    q0, k0, qw0, kw0, q1, k1, qw1, kw1, cos, sin, rstd = ctx.saved_tensors
    n = ctx.needs_input_grad
    S0, S = q0.shape[1], q0.shape[1] + q1.shape[1]
    need_angles = n[10] or n[11]
    grads, angles = [], []
    for i, (q, k, qw, kw) in enumerate(((q0, k0, qw0, kw0), (q1, k1, qw1, kw1))):
        rows = slice(0, S0) if i == 0 else slice(S0, S)
        base = 5 * i
        dq, dk, dqw, dkw, ang = _segment_grads(
            ctx.backend, q, k, qw, kw, cos, sin, rstd, None if gq is None else gq[:, rows],
            None if gk is None else gk[:, rows], ctx.eps[i], rows.start, S,
            (n[base], n[base + 1], n[base + 3], n[base + 4], need_angles))
        dv = None if gv is None or not n[base + 2] else gv[:, rows]
        grads += [dq if n[base] else None, dk if n[base + 1] else None, dv, dqw if n[base + 3] else None,
                  dkw if n[base + 4] else None]
        angles.append(ang)
    dcos = dsin = None
    if need_angles and angles[0] is not None:
        dcos = torch.cat([angles[0][0], angles[1][0]]) if n[10] else None
        dsin = torch.cat([angles[0][1], angles[1][1]]) if n[11] else None
    return (*grads, dcos, dsin, None, None, None, None)


_qk_norm_rope_joint_op.register_autograd(_joint_backward, setup_context=_joint_setup)


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
    if D == 0:
        raise ValueError(f"qk_norm_rope: head_dim D=0 in shape {tuple(q.shape)}: nothing to normalize over")
    if D % 2:
        raise ValueError(f"qk_norm_rope: head_dim D={D} must be even (RoPE rotates pairs)")
    for name, w in (("q_weight", q_weight), ("k_weight", k_weight)):
        if w.shape != (D,):
            raise ValueError(f"qk_norm_rope: {name} must be [{D}], got shape {tuple(w.shape)}")
    if cos is not None:
        for name, t in (("cos", cos), ("sin", sin)):
            if t.shape != (S, D):
                raise ValueError(f"qk_norm_rope: {name} must be [S, D] = [{S}, {D}], got shape {tuple(t.shape)}")
    check_eps("qk_norm_rope", eps)


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
    if isinstance(q, torch.Tensor) and autocast_dtype(q.device) is not None:  # see kernels/_autocast.py
        with autocast_off(q.device):
            return qk_norm_rope(q, _like(k, q), q_weight, k_weight, cos, sin, eps, backend)
    _validate(q, k, q_weight, k_weight, cos, sin, eps)
    chosen = select_backend("qk_norm_rope", q.device, backend, cuda_kernel=True)
    qo, ko, _ = _qk_norm_rope_op(q, k, q_weight, k_weight, cos, sin, float(eps), chosen,
                                 _grad_needed(q, k, q_weight, k_weight))
    return qo, ko


def _grad_needed(*tensors) -> bool:
    """Whether a backward may follow (a Triton forward then saves 1/rms: 8 bytes per token and head)."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def qk_norm_rope_joint_reference(qs, ks, vs, q_weights, k_weights, cos, sin, eps):
    """Plain torch: each segment's :func:`qk_norm_rope_reference` with its own scales and eps and its rows of
    ``cos``/``sin``, then the segments concatenated along tokens (V concatenated as is)."""
    outs, row = [], 0
    for q, k, qw, kw, e in zip(qs, ks, q_weights, k_weights, eps):
        rows = slice(row, row + q.shape[1])
        row = rows.stop
        outs.append(qk_norm_rope_reference(q, k, qw, kw, *((cos[rows], sin[rows]) if cos is not None else
                                                             (None, None)), e))
    return (torch.cat([o[0] for o in outs], dim=1), torch.cat([o[1] for o in outs], dim=1),
            torch.cat(list(vs), dim=1))


def qk_norm_rope_joint(qs, ks, vs, q_weights, k_weights, cos, sin, eps, backend: str | None = None):
    """Two token segments (FLUX.2's double-stream text then image) normalized and rotated into ONE
    ``[B, S_0 + S_1, H, D]`` output each for Q, K and V, as the joint attention reads them.

    Args:
        qs, ks, vs: two ``[B, S_i, H, D]`` tensors each (any strides with a contiguous last dim).
        q_weights, k_weights: each segment's ``[D]`` RMSNorm scales; eps: each segment's eps (a float for both).
        cos, sin: ``[S_0 + S_1, D]`` for the joint sequence, or ``None``.

    On the Triton backend one kernel writes every segment's rows in place: no ``torch.cat`` of Q, K or V. There is
    no csrc version: ``TPFUSE_BACKEND=cuda`` runs Triton here (``backend="cuda"`` raises). Returns contiguous
    ``(q, k, v)``.
    """
    for name, seq in (("qs", qs), ("ks", ks), ("vs", vs), ("q_weights", q_weights), ("k_weights", k_weights)):
        if not isinstance(seq, Sequence) or isinstance(seq, str):
            raise TypeError(f"qk_norm_rope_joint: {name} must be a list of the two segments' tensors, got "
                            f"{type(seq).__name__}")
        for i, t in enumerate(seq):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"qk_norm_rope_joint: {name}[{i}] must be a torch.Tensor, got {type(t).__name__}")
    qs, ks, vs, q_weights, k_weights = (list(t) for t in (qs, ks, vs, q_weights, k_weights))
    ref = qs[0] if qs else None
    if ref is not None and autocast_dtype(ref.device) is not None:  # see kernels/_autocast.py
        with autocast_off(ref.device):
            return qk_norm_rope_joint([_like(t, ref) for t in qs], [_like(t, ref) for t in ks],
                                      [_like(t, ref) for t in vs], q_weights, k_weights, cos, sin, eps, backend)
    # One eps for both segments, or one each (numpy scalars included).
    if isinstance(eps, numbers.Real) and not isinstance(eps, bool):
        eps = [eps, eps]
    elif isinstance(eps, Sequence) and not isinstance(eps, str):
        eps = list(eps)
    else:
        raise TypeError(f"qk_norm_rope_joint: eps must be a float or one per segment, got {eps!r}")
    if not all(len(t) == 2 for t in (qs, ks, vs, q_weights, k_weights, eps)):
        raise ValueError("qk_norm_rope_joint: pass two segments of qs, ks, vs, q_weights, k_weights (and eps)")
    for i, q in enumerate(qs):  # before the token count below is read from them
        if q.dim() != 4:
            raise ValueError(f"qk_norm_rope_joint: qs[{i}] must be [B, S_{i}, H, D], got shape {tuple(q.shape)}")
    total = qs[0].shape[1] + qs[1].shape[1]
    check_rope_pair("qk_norm_rope_joint", cos, sin, {})
    if cos is not None:
        # Both whole tables: each segment's check below sees only its rows, and the kernels read the whole table.
        for name, t in (("cos", cos), ("sin", sin)):
            if not isinstance(t, torch.Tensor) or t.dim() != 2 or t.shape[0] != total:
                raise ValueError(f"qk_norm_rope_joint: {name} must be [S_0 + S_1, D] = [{total}, D], got "
                                 + (f"shape {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__))
    for i in range(2):
        seg_cos = seg_sin = None
        if cos is not None:
            rows = slice(0, qs[0].shape[1]) if i == 0 else slice(qs[0].shape[1], total)
            seg_cos, seg_sin = cos[rows], sin[rows]
        _validate(qs[i], ks[i], q_weights[i], k_weights[i], seg_cos, seg_sin, eps[i])
        if vs[i].shape != qs[i].shape or vs[i].dtype != qs[i].dtype or vs[i].stride(-1) != 1:
            raise ValueError(f"qk_norm_rope_joint: vs[{i}] must match qs[{i}] ({tuple(qs[i].shape)}, {qs[i].dtype}, "
                             f"contiguous last dim), got {tuple(vs[i].shape)}, {vs[i].dtype}, strides {vs[i].stride()}")
    device = qs[0].device
    for name, ts in (("qs", qs), ("ks", ks), ("vs", vs), ("q_weights", q_weights), ("k_weights", k_weights)):
        for i, t in enumerate(ts):
            if t.device != device:
                raise ValueError(f"qk_norm_rope_joint: {name}[{i}] is on {t.device}, qs[0] is on {device}")
    B, _, H, D = qs[0].shape
    if qs[1].shape[0] != B or qs[1].shape[2:] != (H, D) or qs[1].dtype != qs[0].dtype:
        raise ValueError(f"qk_norm_rope_joint: segments differ beyond their token counts: {tuple(qs[0].shape)} "
                         f"{qs[0].dtype} vs {tuple(qs[1].shape)} {qs[1].dtype}")
    chosen = select_backend("qk_norm_rope_joint", qs[0].device, backend)
    save = _grad_needed(*qs, *ks, *q_weights, *k_weights)
    q, k, v, _ = _qk_norm_rope_joint_op(qs[0], ks[0], vs[0], q_weights[0], k_weights[0], qs[1], ks[1], vs[1],
                                        q_weights[1], k_weights[1], cos, sin, float(eps[0]), float(eps[1]), chosen,
                                        save)
    return q, k, v
