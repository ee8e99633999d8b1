"""FLUX.2 single-stream in-projection as ONE GEMM with the whole attention/MLP prologue in its epilogue.

The rank's packed weight is ``[Q | K | V | gate | up]`` (``nn.Linear`` layout ``[3*H*Dh + 2*M, K]``). Eager code
writes that slab, then reads it back to split, RMS-normalize, rotate, transpose and gate it. Here every program
owns a ``[BLOCK_M, Dh]`` output tile on ONE accumulator (a single ``wgmma`` n=Dh=128 per warpgroup and K step on
sm_90) whose epilogue finishes the job in registers:

* a **Q or K program** owns one head, weight rows in their natural order. In the ``wgmma`` accumulator layout a
  thread holds columns ``2i`` and ``2i+1`` in adjacent registers, so ``reshape(acc, [BM, Dh/2, 2])`` +
  ``split`` hands over the RoPE pairs ``(x[2i], x[2i+1])`` without moving data, and ``join`` + ``reshape`` puts
  them back in interleaved order for 16-byte stores. The per-head RMSNorm is a row reduction over the tile.
* a **V program** owns one head and stores it.
* an **MLP program** owns ``Dh/2`` columns of gate *and* the matching ``Dh/2`` columns of up, fed as the B tile's
  ``[gate rows | up rows]`` (the weight itself keeps diffusers' row order), and writes only ``silu(gate) * up``.

Main loop: TMA for bf16/fp16 with 16-byte aligned rows: A in ``[BLOCK_M, BLOCK_K]`` boxes, B in
``[2, Dh/2, BLOCK_K]`` boxes of a 3-D view of the weight whose two planes are the tile's two column halves, so one
descriptor per program covers a head's consecutive rows and an MLP tile's gate and up rows alike. Elsewhere (fp32,
misaligned rows) the same tile is gathered by row index with cp.async.

sm_90 code (``tpfuse compile-report``, klein-4B TP 2, 512+1024 tokens):

==========================  =====================  =====================  =====================
per warp                    before: 2 n64 acc.     one n128, cp.async     one n128, TMA (kept)
==========================  =====================  =====================  =====================
HGMMA per K step            8 x 64x64x16           4 x 64x128x16          4 x 64x128x16
registers                   222                    146                    136
main loop, instr. / K step  136                    117                    82
epilogue, longest path      ~2,270                 ~730                   814
16-bit scalar stores        64                     0 (STG.E.128 only)     0 (STG.E.128 only)
==========================  =====================  =====================  =====================

(The TMA epilogue reads the RMSNorm scales in place, 16 32-bit loads, instead of an fp32 copy that cost one
more launch per call.)

Hiding the epilogue (sm_90, klein-4B TP 2: K=3072, 1,536 tokens, grid 1,296 = 9.8 tiles per SM; triton 3.9 / 3.6).
At 1 CTA per SM the tensor cores idle through each tile's epilogue (814 / 779 instructions per warp at 2 warps
per scheduler: >= 1.6k issue cycles, ~2.5-3.5k with the angle loads and the row reduction) and the next tile's
pipeline fill (~1k cycles) against 48 x 512 = 24.6k cycles of HGMMA: ~9-15% of the kernel exposed. Kept: the
Q/K epilogue scales and rotates one column half at a time (one half's cos/sin live): 136 -> 104 registers (103),
no spills, so 3 stages (96 KB) fit 2 CTAs per SM and one CTA's epilogue (757 / 713) runs under the other's K loop
(exposed only when both are outside it, and on each SM's last tile: ~2-3%), at BLOCK_M=128's 0.0156 L2 bytes per
FLOP. Not kept: BLOCK_M=64 on 4 warps (142 / 129 registers, 96 KB, 2 CTAs/SM) also hides it but moves 1.5x the
bytes per FLOP (0.0234: the B tile re-read per 64 rows); 3 stages under maxnreg=128 spill (40 / 32-byte stack);
one warpgroup over 128 rows takes 255 registers and spills; a persistent grid: unflattened 182 / 156 registers and
1 CTA/SM, nothing overlaps; flattened 202 registers, 160 KB, 1 CTA/SM, the next tile's loads overlap but not its
HGMMA, and triton 3.6 fails in TritonGPUFuseNestedLoops. ``tl.range(warp_specialize=True)`` is ignored on sm_90 by
both: Hopper's partitioner splits a plain TMA matmul loop at num_warps=4 (12 warps, 164 KB) but not at 8 warps, not
a flattened persistent loop, and not once the accumulator feeds a branch after the loop (Q/K vs V vs MLP). A GPU
should confirm that 3 stages keep one CTA's HGMMA fed while its partner is in its epilogue
(``bench/bench_kernels.py``; the fallback is 4 stages, 1 CTA per SM, same code).

RoPE reads one angle per pair from the compact ``[2, S, Dh/2]`` fp32 table of :func:`tpfuse.kernels._rope.
angle_table` (built on the device, no host sync; ``cos``/``sin`` must repeat each pair's angle, as diffusers'
``Flux2PosEmbed`` and :func:`tpfuse.tp_layers.rope_cos_sin` return them).

Q/K/V land directly in ``[B, H, S, Dh]`` for the attention. Every backend runs as ONE ``torch.library`` op
(``tpfuse::fused_qkv_mlp_proj``: fake implementation, registered autograd), so ``torch.compile(fullgraph=True)`` sees
one node. Backward: :func:`fused_qkv_mlp_proj_backward` (torch ops, recomputing the projection) on every backend.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._autocast import autocast_dtype, autocast_off
from ._checks import check_dim, check_eps, check_int32_addressable, check_rope_pair, check_tensors
from ._dispatch import select_backend
from ._math import compute_dtype
from ._rope import angle_table
from ._tma import tma_ready
from ._triton import tl, triton
from .qk_norm_rope import norm_rope_backward, qk_norm_rope_reference

__all__ = ["SUPPORTED_HEAD_DIMS", "fused_qkv_mlp_proj", "fused_qkv_mlp_proj_backward", "fused_qkv_mlp_proj_reference",
           "proj_config"]

# The tile is one head wide: a power of two (tl.arange), at least 32 (the MLP tile's two halves feed 16-wide
# pieces of the wgmma), at most 256 (one n256 wgmma; the accumulator still fits in registers at BLOCK_M=64).
SUPPORTED_HEAD_DIMS = (32, 64, 128, 256)


def proj_config(s: int, k: int, head_dim: int, dtype: torch.dtype) -> dict:
    """Tile configuration for sequence length ``s`` (the compile report compiles exactly these).

    128 tokens x one head per program, K in steps of 64: two warpgroups each own 64 rows of the accumulator (64 fp32
    registers per thread at Dh=128); a stage of A + B tiles is 32 KB in bf16, so 3 stages take 96 KB of shared
    memory and, at 104 registers x 256 threads, 2 CTAs share an SM: one CTA's ~760-instruction epilogue runs
    under the other's K loop (see the module doc). The same holds for a feed-forward's ``linear_in`` (no heads:
    90 registers; epilogue 524 SwiGLU / 924 GELU instructions per warp). Dh=256 runs BLOCK_M=64 on one warpgroup
    (one n256 wgmma, 128 accumulator registers per thread; 40 KB stages, 1 CTA per SM either way: 4 stages). fp32
    inputs (tests, interpreter) take 2 stages to stay under the 227 KB limit.
    """
    block_m = 128 if s > 64 and head_dim <= 128 else 64
    stages = (3 if head_dim <= 128 else 4) if dtype in (torch.bfloat16, torch.float16) else 2
    return {"BLOCK_M": block_m, "BLOCK_K": 64, "GROUP_M": 8, "num_warps": 8 if block_m == 128 else 4,
            "num_stages": stages, "EVEN_K": k % 64 == 0}


# The activation epilogues of an MLP tile (the ACT constexpr).
ACT_SWIGLU = 0  # the tile holds Dh/2 gate and the matching Dh/2 up columns; writes silu(gate) * up
ACT_GELU_TANH = 1  # the tile holds Dh consecutive columns; writes gelu(x, approximate="tanh") (Qwen-Image's MLP)
ACTIVATIONS = {"swiglu": ACT_SWIGLU, "gelu_tanh": ACT_GELU_TANH}
# GELU(tanh) as x / (1 + 2^(x (A + B x^2))): A = -2 sqrt(2/pi) log2(e), B = 0.044715 A.
GELU_A = tl.constexpr(-2.0 * 0.7978845608028654 * 1.4426950408889634)
GELU_B = tl.constexpr(0.044715 * -2.0 * 0.7978845608028654 * 1.4426950408889634)


@triton.jit
def _scale_rope_store(x, nw_ptr, ang_ptr, stride_ang, row_ptrs, s_idx, m_mask, C0: tl.constexpr, HALF: tl.constexpr,
                      HAS_ROPE: tl.constexpr):
    """Columns ``C0 + arange(HALF)`` of an RMS-normalized Q/K head tile ``x`` ``[BM, HALF]``: times the norm scale,
    RoPE on its ``HALF/2`` pairs ``(x[2i], x[2i+1])``, stored at ``row_ptrs[:, None] + columns``."""
    cols = C0 + tl.arange(0, HALF)
    x = x * tl.load(nw_ptr + cols).to(tl.float32)[None, :]
    even, odd = tl.split(tl.reshape(x, (x.shape[0], HALF // 2, 2)))
    if HAS_ROPE:
        # The compact angle table: [2, S, HALF] fp32 (cos plane, sin plane), one angle per pair.
        a_off = s_idx[:, None] * HALF + (C0 // 2 + tl.arange(0, HALF // 2))[None, :]
        cs = tl.load(ang_ptr + a_off, mask=m_mask[:, None], other=0.0)
        sn = tl.load(ang_ptr + stride_ang + a_off, mask=m_mask[:, None], other=0.0)
        even, odd = even * cs - odd * sn, odd * cs + even * sn
    out = tl.reshape(tl.join(even, odd), (x.shape[0], HALF))
    tl.store(row_ptrs[:, None] + cols[None, :], out.to(row_ptrs.dtype.element_ty), mask=m_mask[:, None])


@triton.jit
def _fused_qkv_mlp_kernel(
    x_ptr, wq_ptr, wk_ptr, wv_ptr, wm_ptr, bq_ptr, bk_ptr, bv_ptr, bm_ptr, qw_ptr, kw_ptr, ang_ptr, qkv_ptr, mlp_ptr,
    BATCH, K, S, HEADS, MLP,
    stride_xm, stride_wn, stride_ang,
    stride_qkv_w, stride_qkv_b, stride_qkv_h, stride_qkv_s,
    stride_mlp_m,
    eps,
    HEAD_DIM: tl.constexpr, HAS_ROPE: tl.constexpr, HAS_BIAS: tl.constexpr, ACT: tl.constexpr,
    EVEN_MLP: tl.constexpr, HAS_HEADS: tl.constexpr, HAS_MLP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, EVEN_K: tl.constexpr,
    USE_TMA: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    HALF: tl.constexpr = HEAD_DIM // 2
    # Output columns an MLP tile owns: SwiGLU reads HALF gate + HALF up weight rows for HALF outputs.
    MLP_COLS: tl.constexpr = HALF if ACT == 0 else HEAD_DIM
    # Grouped tile order: GROUP_M row tiles sweep the columns together, so the weight stays in L2. Row tiles
    # never straddle two batch entries (each entry's S rows are cdiv(S, BLOCK_M) tiles), so a program's batch
    # index is one scalar and its token positions are s0 + arange: no per-row integer division in the epilogue.
    pid = tl.program_id(0)
    tiles_per_seq = tl.cdiv(S, BLOCK_M)
    n_tiles_m = BATCH * tiles_per_seq
    n_tiles_n = 3 * HEADS + tl.cdiv(MLP, MLP_COLS)
    width = GROUP_M * n_tiles_n
    first_m = (pid // width) * GROUP_M
    group_m = min(n_tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % group_m
    pid_n = (pid % width) // group_m
    b_idx = pid_m // tiles_per_seq
    s_idx0 = (pid_m % tiles_per_seq) * BLOCK_M
    s_idx = s_idx0 + tl.arange(0, BLOCK_M)  # token positions in the sequence
    m_mask = s_idx < S
    offs_m = b_idx * S + s_idx  # rows of x and of the MLP output

    c = tl.arange(0, HEAD_DIM)  # tile column
    is_mlp = pid_n >= 3 * HEADS
    which = tl.where(is_mlp, 3, pid_n // tl.maximum(HEADS, 1))  # 0: Q, 1: K, 2: V, 3: an MLP tile
    head = pid_n - which * HEADS
    mlp0 = (pid_n - 3 * HEADS) * MLP_COLS  # first output column of an MLP tile
    # Multi-pointer main loop: each tile reads ONE weight (Q, K, V or the MLP's), so the separate parameters of a
    # two-stream block are read in place; the pointer is a scalar select per program, outside the K loop (the
    # packed single-stream weight passes four views of one tensor). Row offsets of the tile inside its weight:
    if which == 0:
        w_base = wq_ptr
    elif which == 1:
        w_base = wk_ptr
    elif which == 2:
        w_base = wv_ptr
    else:
        w_base = wm_ptr
    tile_row0 = tl.where(is_mlp, mlp0, head * HEAD_DIM)
    acc = tl.zeros((BLOCK_M, HEAD_DIM), dtype=tl.float32)
    if USE_TMA:
        # TMA: A as [BLOCK_M, BLOCK_K] boxes of x; B as [2, HALF, BLOCK_K] boxes of a 3-D view of the weight whose
        # two planes are the tile's column halves: consecutive rows of a Q/K/V head or of a GELU tile (plane
        # stride HALF rows), or the gate rows and the matching up rows of a SwiGLU tile (plane stride MLP rows; TMA
        # zero-fills past MLP). The descriptors are built on the device per program, so one K loop serves every
        # tile kind.
        a_desc = tl.make_tensor_descriptor(x_ptr, shape=[BATCH * S, K], strides=[stride_xm, 1],
                                           block_shape=[BLOCK_M, BLOCK_K])
        if ACT == 0:
            swiglu_tile = is_mlp
        else:
            swiglu_tile = False
        plane = tl.where(swiglu_tile, MLP, HALF)
        b_desc = tl.make_tensor_descriptor(w_base + tile_row0 * stride_wn,
                                           shape=[2, tl.where(swiglu_tile, MLP - mlp0, HALF), K],
                                           strides=[plane * stride_wn, stride_wn, 1], block_shape=[2, HALF, BLOCK_K])
        row0 = b_idx * S + s_idx0  # rows past this sequence's end are computed but never stored
        for kk in range(0, tl.cdiv(K, BLOCK_K)):
            a = a_desc.load([row0, kk * BLOCK_K])
            b = tl.reshape(b_desc.load([0, 0, kk * BLOCK_K]), (HEAD_DIM, BLOCK_K))  # [Dh, BK]: W rows
            acc = tl.dot(a, b.T, acc, input_precision=INPUT_PRECISION)
    else:
        # cp.async with the same tile: the weight row feeding tile column c (the head's rows in order, a GELU
        # tile's rows in order, or [gate rows | up rows] for a SwiGLU tile), gathered by row index.
        j = c % HALF
        if ACT == 0:
            rows = tile_row0 + tl.where(is_mlp, (c // HALF) * MLP + j, c)
            n_mask = j < tl.where(is_mlp, MLP - mlp0, HALF)
        else:
            rows = tile_row0 + c
            n_mask = c < tl.where(is_mlp, MLP - mlp0, HEAD_DIM)
        # int32 offsets (the launcher checks every tensor has < 2^31 elements): int64 pointer tensors for the A
        # and B tiles cost registers in the K loop.
        offs_k = tl.arange(0, BLOCK_K)
        a_ptrs = x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :]  # [BM, BK]
        b_ptrs = w_base + rows[None, :] * stride_wn + offs_k[:, None]  # [BK, HEAD_DIM], W^T view
        for kk in range(0, tl.cdiv(K, BLOCK_K)):
            if EVEN_K:
                a = tl.load(a_ptrs, mask=m_mask[:, None], other=0.0)
                b = tl.load(b_ptrs, mask=n_mask[None, :], other=0.0)
            else:
                k_mask = offs_k < K - kk * BLOCK_K
                a = tl.load(a_ptrs, mask=m_mask[:, None] & k_mask[None, :], other=0.0)
                b = tl.load(b_ptrs, mask=k_mask[:, None] & n_mask[None, :], other=0.0)
            acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
            a_ptrs += BLOCK_K
            b_ptrs += BLOCK_K

    out_ty = mlp_ptr.dtype.element_ty
    # HAS_HEADS / HAS_MLP: a launch with only one tile kind (a feed-forward's linear_in, a stream's Q/K/V) compiles
    # only that epilogue (the GELU launch was 1,247 instructions on its longest path with the unused head epilogue
    # compiled in, through a branch no program takes).
    if HAS_HEADS and (not HAS_MLP or pid_n < 3 * HEADS):
        if HAS_BIAS:  # Qwen-Image's projections: the bias comes before the Q/K RMSNorm
            if which == 0:
                b_base = bq_ptr
            elif which == 1:
                b_base = bk_ptr
            else:
                b_base = bv_ptr
            acc += tl.load(b_base + tile_row0 + c).to(tl.float32)[None, :]
        row_off = which * stride_qkv_w + b_idx * stride_qkv_b + head * stride_qkv_h + s_idx * stride_qkv_s
        if which < 2:
            # Per-head RMSNorm (a row reduction over the whole tile), then the scale and RoPE one column half at a
            # time: each thread holds columns of both halves, so the split moves no data, and only one half's
            # angles are live (136 -> 104 registers: 2 CTAs per SM, see the module doc).
            rstd = 1.0 / tl.sqrt(tl.sum(acc * acc, axis=1) / HEAD_DIM + eps)
            lo, hi = tl.split(tl.permute(tl.reshape(acc * rstd[:, None], (BLOCK_M, 2, HALF)), (0, 2, 1)))
            nw_ptr = tl.where(which == 0, qw_ptr, kw_ptr)
            row_ptrs = qkv_ptr + row_off
            _scale_rope_store(lo, nw_ptr, ang_ptr, stride_ang, row_ptrs, s_idx, m_mask, 0, HALF, HAS_ROPE)
            _scale_rope_store(hi, nw_ptr, ang_ptr, stride_ang, row_ptrs, s_idx, m_mask, HALF, HALF, HAS_ROPE)
        else:
            tl.store(qkv_ptr + row_off[:, None] + c[None, :], acc.to(out_ty), mask=m_mask[:, None])
    elif HAS_MLP and ACT == 0:
        gate, up = tl.split(tl.permute(tl.reshape(acc, (BLOCK_M, 2, HALF)), (0, 2, 1)))
        cols = mlp0 + tl.arange(0, HALF)
        if HAS_BIAS:
            gate += _load_cols(bm_ptr + cols, cols < MLP, EVEN_MLP)[None, :]
            up += _load_cols(bm_ptr + MLP + cols, cols < MLP, EVEN_MLP)[None, :]
        # silu(gate) * up in fp32; the approximate division (div.full.f32, 2 ulp) instead of IEEE div.rn, whose
        # Newton iterations and slow-path branch per element dominated the epilogue.
        act = tl.fdiv(gate, 1.0 + tl.exp(-gate)) * up
        ptrs = mlp_ptr + offs_m[:, None] * stride_mlp_m + cols[None, :]
        tl.store(ptrs, act.to(out_ty), mask=m_mask[:, None] & ((cols < MLP) | EVEN_MLP)[None, :])
    elif HAS_MLP:
        cols = mlp0 + c
        if HAS_BIAS:
            acc += _load_cols(bm_ptr + cols, cols < MLP, EVEN_MLP)[None, :]
        # gelu(x, tanh) = x * (1 + tanh(u)) / 2 = x * sigmoid(2u), u = sqrt(2/pi) (x + 0.044715 x^3): one exp2 of
        # -2u log2(e) = x (GELU_A + GELU_B x^2), 3 instructions (FMUL, FFMA, FMUL) with the constants folded
        # (5 unfolded: 1,246 -> 1,118 instructions on the epilogue's path).
        act = tl.fdiv(acc, 1.0 + tl.exp2(acc * (GELU_A + GELU_B * (acc * acc))))
        ptrs = mlp_ptr + offs_m[:, None] * stride_mlp_m + cols[None, :]
        tl.store(ptrs, act.to(out_ty), mask=m_mask[:, None] & ((cols < MLP) | EVEN_MLP)[None, :])


@triton.jit
def _load_cols(ptrs, mask, EVEN: tl.constexpr):
    """A bias vector in fp32: unmasked (vector loads) when the MLP width is a multiple of the tile."""
    if EVEN:
        return tl.load(ptrs).to(tl.float32)
    return tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)


# --------------------------------------------------------------------------------------------------------------
# Reference
# --------------------------------------------------------------------------------------------------------------


def fused_qkv_mlp_proj_reference(x, weight, q_weight, k_weight, cos, sin, heads: int, head_dim: int,
                                 mlp_hidden: int, eps: float = 1e-6):
    """Plain torch: ``x @ W^T``, split, fp32 QK RMSNorm + RoPE, SwiGLU. Returns ``q, k, v`` as
    ``[B, heads, S, head_dim]`` and ``silu(gate) * up`` as ``[B, S, mlp_hidden]``, all in ``x``'s dtype."""
    inner = heads * head_dim
    proj = F.linear(x, weight)  # [B, S, 3*inner + 2*mlp]
    q, k, v, gate, up = proj.split([inner, inner, inner, mlp_hidden, mlp_hidden], dim=-1)
    heads_view = (heads, head_dim)
    q, k = qk_norm_rope_reference(q.unflatten(-1, heads_view), k.unflatten(-1, heads_view), q_weight, k_weight,
                                  cos, sin, eps)
    v = v.unflatten(-1, heads_view)
    acc = compute_dtype(x)
    mlp = (F.silu(gate.to(acc)) * up.to(acc)).to(x.dtype)
    return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), mlp


# --------------------------------------------------------------------------------------------------------------
# Launcher
# --------------------------------------------------------------------------------------------------------------

def fused_proj_triton(x, weights, biases, q_weight, k_weight, angles, qkv, mlp, heads: int, head_dim: int,
                      mlp_hidden: int, eps: float, activation: str = "swiglu") -> None:
    """Launch the kernel for one input ``x`` ``[B, S, K]``: ``weights``/``biases`` are ``(Q, K, V, MLP)`` row blocks
    (``None`` where absent; biases all present or all ``None``), written into ``qkv`` (``[3, B, heads, S, Dh]``, any
    strides with a unit last one: a stream's rows of a joint buffer) and ``mlp`` (``[B, S, mlp_hidden]``).
    ``angles``: this input's rows of the ``[2, S, Dh/2]`` angle table, or ``None``."""
    B, S, K = x.shape
    M = B * S
    x2 = x.reshape(M, K)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    present = [w for w in weights if w is not None]
    weights = [w if w is None or w.stride(-1) == 1 else w.contiguous() for w in weights]
    stride_wn = present[0].stride(0)
    if any(w.stride(0) != stride_wn for w in weights if w is not None):
        weights = [None if w is None else w.contiguous() for w in weights]
        stride_wn = K
    wq, wk, wv, wm = (w if w is not None else present[0] for w in weights)
    has_bias = biases[0] is not None or biases[3] is not None
    bq, bk, bv, bm = (b.contiguous() if b is not None else present[0] for b in biases)
    # [Dh] scales read in place, in one dtype (the epilogue picks Q's or K's with one pointer select)
    dtype = torch.promote_types(q_weight.dtype, k_weight.dtype)
    q_weight, k_weight = q_weight.to(dtype).contiguous(), k_weight.to(dtype).contiguous()
    act = ACTIVATIONS[activation]
    cfg = proj_config(S, K, head_dim, x.dtype)
    mlp_cols = head_dim // 2 if act == ACT_SWIGLU else head_dim
    grid = (B * triton.cdiv(S, cfg["BLOCK_M"]) * (3 * heads + triton.cdiv(mlp_hidden, mlp_cols)),)
    if grid[0] == 0:
        return
    has_rope = angles is not None
    # TMA boxes of a GELU tile span Dh consecutive rows: a ragged tail tile would read past the weight.
    use_tma = tma_ready(x2, *[w for w in weights if w is not None]) and (
        act == ACT_SWIGLU or mlp_hidden % head_dim == 0)
    precision = "ieee" if x.dtype == torch.float32 else "tf32"  # fp32 inputs: exact fp32 products, no TF32
    qkv_t = qkv if qkv is not None else mlp
    mlp_t = mlp if mlp is not None else qkv
    qkv_strides = qkv.stride()[:4] if qkv is not None else (0, 0, 0, 0)
    _fused_qkv_mlp_kernel[grid](
        x2, wq, wk, wv, wm, bq, bk, bv, bm, q_weight, k_weight, angles if has_rope else q_weight, qkv_t, mlp_t,
        B, K, S, heads, mlp_hidden,
        x2.stride(0), stride_wn, angles.stride(0) if has_rope else 0,
        *qkv_strides, mlp.stride(1) if mlp is not None else 0,
        eps,
        HEAD_DIM=head_dim, HAS_ROPE=has_rope, HAS_BIAS=has_bias, ACT=act, EVEN_MLP=mlp_hidden % mlp_cols == 0,
        HAS_HEADS=heads > 0, HAS_MLP=mlp_hidden > 0, BLOCK_M=cfg["BLOCK_M"],
        BLOCK_K=cfg["BLOCK_K"], GROUP_M=cfg["GROUP_M"], EVEN_K=cfg["EVEN_K"], USE_TMA=use_tma,
        INPUT_PRECISION=precision, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )


def _fused_triton(x, weight, q_weight, k_weight, cos, sin, heads, head_dim, mlp_hidden, eps):
    B, S, K = x.shape
    qkv = torch.empty((3, B, heads, S, head_dim), device=x.device, dtype=x.dtype)  # Q, K, V head-major
    mlp = torch.empty((B, S, mlp_hidden), device=x.device, dtype=x.dtype)
    inner = heads * head_dim
    # The packed weight as four row blocks (views: the kernel reads the one tensor)
    blocks = weight.split([inner, inner, inner, 2 * mlp_hidden])
    angles = angle_table("fused_qkv_mlp_proj", cos, sin) if cos is not None else None  # [2, S, Dh/2] fp32
    fused_proj_triton(x, blocks, (None,) * 4, q_weight, k_weight, angles, qkv, mlp, heads, head_dim, mlp_hidden,
                      eps)
    return qkv, mlp  # [3, B, H, S, Dh], [B, S, M]


def fused_qkv_mlp_proj_backward(gqkv, gmlp, x, weight, q_weight, k_weight, cos, sin, heads: int, head_dim: int,
                                mlp_hidden: int, eps: float, needs=(True,) * 6):
    """Gradients ``(dx, dweight, dq_weight, dk_weight, dcos, dsin)`` (``None`` where ``needs`` is False) for the
    gradients of the stacked ``[3, B, heads, S, head_dim]`` Q/K/V and of ``mlp`` (either may be ``None``).

    Recomputes the projection (one GEMM, instead of saving the ``[B, S, 3*inner + 2*mlp]`` slab), then: Q/K
    through :func:`~tpfuse.kernels.qk_norm_rope.norm_rope_backward`, V as is, SwiGLU ``d gate = g up silu'(gate)``,
    ``d up = g silu(gate)``; ``dx = dproj @ W``, ``dW = dproj^T x``. Plain torch ops (traced into a compiled
    backward graph).
    """
    B, S, K = x.shape
    inner = heads * head_dim
    acc = compute_dtype(x)
    proj = F.linear(x, weight)  # [B, S, 3*inner + 2*mlp], as the forward computed it
    q, k, _v, gate, up = proj.split([inner, inner, inner, mlp_hidden, mlp_hidden], dim=-1)
    heads_view = (heads, head_dim)
    if gqkv is None:
        gqkv = x.new_zeros((3, B, heads, S, head_dim))
    gq, gk, gv = (g.transpose(1, 2) for g in gqkv.unbind(0))  # [B, S, H, Dh]
    need_in = needs[0] or needs[1]
    dq, dqw, ang_q = norm_rope_backward(q.unflatten(-1, heads_view), q_weight, cos, sin, gq, eps,
                                        (need_in, needs[2], needs[4] or needs[5]))
    dk, dkw, ang_k = norm_rope_backward(k.unflatten(-1, heads_view), k_weight, cos, sin, gk, eps,
                                        (need_in, needs[3], needs[4] or needs[5]))
    dx = dweight = None
    if need_in:
        if gmlp is None:
            dgate = dup = x.new_zeros((B, S, mlp_hidden))
        else:
            g, gf, uf = gmlp.to(acc), gate.to(acc), up.to(acc)
            sig = torch.sigmoid(gf)
            dgate = (g * uf * sig * (1 + gf * (1 - sig))).to(x.dtype)  # silu'(z) = sig(z) (1 + z (1 - sig(z)))
            dup = (g * gf * sig).to(x.dtype)
        dproj = torch.cat([dq.flatten(-2), dk.flatten(-2), gv.flatten(-2).to(x.dtype), dgate, dup], dim=-1)
        if needs[0]:
            dx = dproj @ weight  # [B, S, K]
        if needs[1]:
            dweight = dproj.reshape(-1, dproj.shape[-1]).T @ x.reshape(-1, K)  # [N, K]
    dcos = dsin = None
    if ang_q is not None:
        dcos = ang_q[0] + ang_k[0] if needs[4] else None
        dsin = ang_q[1] + ang_k[1] if needs[5] else None
    return dx, dweight, dqw, dkw, dcos, dsin


# --------------------------------------------------------------------------------------------------------------
# The torch.library op: one graph node under torch.compile, the backend chosen by the launcher
# --------------------------------------------------------------------------------------------------------------


@torch.library.custom_op("tpfuse::fused_qkv_mlp_proj", mutates_args=())
def _fused_qkv_mlp_proj_op(x: torch.Tensor, weight: torch.Tensor, q_weight: torch.Tensor, k_weight: torch.Tensor,
                           cos: torch.Tensor | None, sin: torch.Tensor | None, heads: int, head_dim: int,
                           mlp_hidden: int, eps: float, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(qkv, mlp)``: Q, K, V stacked as one contiguous ``[3, B, heads, S, head_dim]`` tensor (the launcher
    unbinds it: an op's outputs may not be views of one another) and contiguous ``[B, S, mlp_hidden]``."""
    if backend == "torch":
        q, k, v, mlp = fused_qkv_mlp_proj_reference(x, weight, q_weight, k_weight, cos, sin, heads, head_dim,
                                                    mlp_hidden, eps)
        return torch.stack([q, k, v]), mlp.contiguous()
    return _fused_triton(x, weight, q_weight, k_weight, cos, sin, heads, head_dim, mlp_hidden, eps)


@_fused_qkv_mlp_proj_op.register_fake
def _(x, weight, q_weight, k_weight, cos, sin, heads, head_dim, mlp_hidden, eps, backend):
    B, S, _ = x.shape
    return x.new_empty((3, B, heads, S, head_dim)), x.new_empty((B, S, mlp_hidden))


def _proj_setup(ctx, inputs, output):
    x, weight, q_weight, k_weight, cos, sin, heads, head_dim, mlp_hidden, eps, _backend = inputs
    ctx.save_for_backward(x, weight, q_weight, k_weight, cos, sin)
    ctx.dims = (heads, head_dim, mlp_hidden, eps)


def _proj_backward(ctx, gqkv, gmlp):
    # Every backend's backward is the torch one (two GEMMs and the epilogue's derivative in torch).
    grads = fused_qkv_mlp_proj_backward(gqkv, gmlp, *ctx.saved_tensors, *ctx.dims, needs=ctx.needs_input_grad[:6])
    return (*grads, None, None, None, None, None)


_fused_qkv_mlp_proj_op.register_autograd(_proj_backward, setup_context=_proj_setup)


def _validate(x, weight, q_weight, k_weight, cos, sin, heads, head_dim, mlp_hidden, eps):
    named = {"x": x, "weight": weight, "q_weight": q_weight, "k_weight": k_weight}
    check_rope_pair("fused_qkv_mlp_proj", cos, sin, named)
    check_tensors("fused_qkv_mlp_proj", named, x.device if isinstance(x, torch.Tensor) else None, "x")
    if head_dim % 2:
        raise ValueError(f"fused_qkv_mlp_proj: head_dim={head_dim} must be even (RoPE rotates pairs)")
    if x.dim() != 3:
        raise ValueError(f"fused_qkv_mlp_proj: x must be [B, S, K], got shape {tuple(x.shape)}")
    n = 3 * heads * head_dim + 2 * mlp_hidden
    if weight.dim() != 2 or weight.shape != (n, x.shape[-1]):
        raise ValueError(f"fused_qkv_mlp_proj: weight must be [3*heads*head_dim + 2*mlp_hidden, K] = "
                         f"[{n}, {x.shape[-1]}] (heads={heads}, head_dim={head_dim}, mlp_hidden={mlp_hidden}), "
                         f"got shape {tuple(weight.shape)}")
    if weight.dtype != x.dtype:
        raise TypeError(f"fused_qkv_mlp_proj: weight dtype {weight.dtype} differs from x dtype {x.dtype}")
    for name, w in (("q_weight", q_weight), ("k_weight", k_weight)):
        if w.shape != (head_dim,):
            raise ValueError(f"fused_qkv_mlp_proj: {name} must be [{head_dim}], got shape {tuple(w.shape)}")
    if cos is not None:
        S = x.shape[1]
        for name, t in (("cos", cos), ("sin", sin)):
            if t.shape != (S, head_dim):
                raise ValueError(f"fused_qkv_mlp_proj: {name} must be [S, head_dim] = [{S}, {head_dim}], got "
                                 f"shape {tuple(t.shape)}")
    check_eps("fused_qkv_mlp_proj", eps)


def fused_qkv_mlp_proj(x: torch.Tensor, weight: torch.Tensor, q_weight: torch.Tensor, k_weight: torch.Tensor,
                       cos: torch.Tensor | None, sin: torch.Tensor | None, heads: int, head_dim: int,
                       mlp_hidden: int, eps: float = 1e-6, backend: str | None = None):
    """One GEMM over the packed ``[Q | K | V | gate | up]`` weight with the QK-norm/RoPE/SwiGLU epilogue.

    Args:
        x: ``[B, S, K]``.
        weight: ``[3*heads*head_dim + 2*mlp_hidden, K]`` (this rank's packed shard, ``nn.Linear`` layout).
        q_weight, k_weight: ``[head_dim]`` RMSNorm scales; cos, sin: ``[S, head_dim]`` or ``None``.
        backend: ``"torch"`` or ``"triton"``; default: triton for CUDA tensors, torch on CPU.

    Returns:
        ``q, k, v``: ``[B, heads, S, head_dim]`` (ready for ``scaled_dot_product_attention``);
        ``mlp``: ``[B, S, mlp_hidden]`` = ``silu(gate) * up``.
    """
    cast = autocast_dtype(x.device) if isinstance(x, torch.Tensor) else None
    if cast is not None:  # autocast: the GEMM in the autocast dtype, as F.linear (see kernels/_autocast.py)
        with autocast_off(x.device):
            return fused_qkv_mlp_proj(x.to(cast), weight.to(cast), q_weight, k_weight, cos, sin, heads, head_dim,
                                      mlp_hidden, eps, backend)
    # Python ints for the op's schema (a numpy int is accepted; a bool is not a size).
    heads, head_dim, mlp_hidden = (check_dim("fused_qkv_mlp_proj", name, v) for name, v in
                                   (("heads", heads), ("head_dim", head_dim), ("mlp_hidden", mlp_hidden)))
    _validate(x, weight, q_weight, k_weight, cos, sin, heads, head_dim, mlp_hidden, eps)
    chosen = select_backend("fused_qkv_mlp_proj", x.device, backend)
    if chosen == "triton" and head_dim not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"fused_qkv_mlp_proj: the triton kernel supports head_dim in {SUPPORTED_HEAD_DIMS}, "
                         f"got {head_dim}; use backend='torch'")
    if chosen != "torch" and weight.stride(-1) != 1:
        raise ValueError(f"fused_qkv_mlp_proj: weight must be contiguous in its last dim, got strides "
                         f"{weight.stride()}")
    if chosen != "torch":
        B, S, _ = x.shape
        check_int32_addressable("fused_qkv_mlp_proj", {"x": x, "weight": weight}, {
            "q/k/v": (3, B, heads, S, head_dim), "mlp": (B, S, mlp_hidden)})
    qkv, mlp = _fused_qkv_mlp_proj_op(x, weight, q_weight, k_weight, cos, sin, heads, head_dim, mlp_hidden,
                                      float(eps), chosen)
    q, k, v = qkv.unbind(0)
    return q, k, v, mlp
