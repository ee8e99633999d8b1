"""Baseline for ``fused_qkv_mlp_proj``: cuBLAS GEMM, then ONE Triton kernel for the whole epilogue.

This is the simplest thing a user would write instead of our fusion: ``proj = x @ W^T`` (cuBLAS), which writes
the packed ``[M, 3*H*Dh + 2*mlp]`` slab to memory, then one memory-bound kernel that reads it back and writes
what the attention and the MLP need: Q and K RMS-normalized per head (fp32) and rotated, V copied, all head-major
``[B, H, S, Dh]``, and ``silu(gate) * up`` ``[B, S, mlp]``. Exactly
``tpfuse.kernels.fused_qkv_mlp_proj_reference``'s semantics. The fused kernel must beat this: its whole point is
not writing and re-reading the slab.

Kernel layout: a 2-D grid of (row tile, column tile). Column tiles ``0 .. 3*H-1`` each own one head of Q, K or
V; the rest each own ``BLOCK_D`` columns of gate and the matching columns of up. A Q/K program loads its rows a
second time at the partner feature ``d ^ 1`` for RoPE (the second load hits L1), as ``qk_norm_rope`` does.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["gemm_epilogue"]


@triton.jit
def _epilogue_kernel(
    proj_ptr, norm_w_ptr, cos_ptr, sin_ptr, qkv_ptr, mlp_ptr,
    M, S, HEADS, MLP,
    stride_pm, stride_cs, stride_qkv_w, stride_qkv_b, stride_qkv_h,
    eps,
    HEAD_DIM: tl.constexpr, HAS_ROPE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < M
    d = tl.arange(0, BLOCK_D)
    row_ptrs = proj_ptr + rows[:, None] * stride_pm
    if pid_n < 3 * HEADS:
        which = pid_n // HEADS  # 0: Q, 1: K, 2: V
        head = pid_n % HEADS
        dmask = d < HEAD_DIM
        mask = rmask[:, None] & dmask[None, :]
        src = row_ptrs + pid_n * HEAD_DIM
        b = rows // S
        s = rows % S
        # qkv is a contiguous [3, B, H, S, Dh] buffer: a token's row within its head has stride Dh.
        dst = qkv_ptr + which * stride_qkv_w + (b * stride_qkv_b + head * stride_qkv_h + s * HEAD_DIM)[:, None] \
            + d[None, :]
        x = tl.load(src + d[None, :], mask=mask, other=0.0)
        if which < 2:
            xf = x.to(tl.float32)
            rstd = 1.0 / tl.sqrt(tl.sum(xf * xf, axis=1) / HEAD_DIM + eps)
            w_ptr = norm_w_ptr + which * HEAD_DIM
            n = xf * rstd[:, None] * tl.load(w_ptr + d, mask=dmask, other=0.0).to(tl.float32)[None, :]
            if HAS_ROPE:
                # out[2i] = n[2i] cos - n[2i+1] sin, out[2i+1] = n[2i+1] cos + n[2i] sin
                p = d ^ 1
                xp = tl.load(src + p[None, :], mask=mask, other=0.0).to(tl.float32)
                n_p = xp * rstd[:, None] * tl.load(w_ptr + p, mask=dmask, other=0.0).to(tl.float32)[None, :]
                cs = s[:, None] * stride_cs + d[None, :]
                c = tl.load(cos_ptr + cs, mask=mask, other=0.0).to(tl.float32)
                sn = tl.load(sin_ptr + cs, mask=mask, other=0.0).to(tl.float32)
                sgn = tl.where(d % 2 == 0, -1.0, 1.0)
                n = n * c + sgn[None, :] * n_p * sn
            tl.store(dst, n.to(qkv_ptr.dtype.element_ty), mask=mask)
        else:
            tl.store(dst, x, mask=mask)
    else:
        cols = (pid_n - 3 * HEADS) * BLOCK_D + d
        mask = rmask[:, None] & (cols < MLP)[None, :]
        gate_ptrs = row_ptrs + 3 * HEADS * HEAD_DIM + cols[None, :]
        gate = tl.load(gate_ptrs, mask=mask, other=0.0).to(tl.float32)
        up = tl.load(gate_ptrs + MLP, mask=mask, other=0.0).to(tl.float32)
        act = gate / (1.0 + tl.exp(-gate)) * up  # silu(gate) * up in fp32, like the reference
        tl.store(mlp_ptr + rows[:, None] * MLP + cols[None, :], act.to(mlp_ptr.dtype.element_ty), mask=mask)


def _validate(x, weight, q_weight, k_weight, cos, sin, heads, head_dim, mlp_hidden):
    if x.dim() != 3:
        raise ValueError(f"gemm_epilogue: x must be [B, S, K], got shape {tuple(x.shape)}")
    if head_dim % 2:
        raise ValueError(f"gemm_epilogue: head_dim={head_dim} must be even (RoPE rotates pairs)")
    n = 3 * heads * head_dim + 2 * mlp_hidden
    if weight.shape != (n, x.shape[-1]):
        raise ValueError(f"gemm_epilogue: weight must be [3*heads*head_dim + 2*mlp_hidden, K] = [{n}, {x.shape[-1]}], "
                         f"got shape {tuple(weight.shape)}")
    if x.shape[0] * x.shape[1] * n >= 2**31:  # proj is the largest buffer the kernel addresses
        raise ValueError(f"gemm_epilogue: the kernel addresses with int32 offsets and proj would have "
                         f"{x.shape[0] * x.shape[1] * n} elements (limit 2^31 - 1): split the batch")
    for name, w in (("q_weight", q_weight), ("k_weight", k_weight)):
        if w.shape != (head_dim,):
            raise ValueError(f"gemm_epilogue: {name} must be [{head_dim}], got shape {tuple(w.shape)}")
    if (cos is None) != (sin is None):
        raise ValueError("gemm_epilogue: pass both cos and sin, or neither")
    if cos is not None and (cos.shape != (x.shape[1], head_dim) or sin.shape != cos.shape):
        raise ValueError(f"gemm_epilogue: cos and sin must be [S, head_dim] = [{x.shape[1]}, {head_dim}], got "
                         f"{tuple(cos.shape)} and {tuple(sin.shape)}")


def gemm_epilogue(x: torch.Tensor, weight: torch.Tensor, q_weight: torch.Tensor, k_weight: torch.Tensor,
                  cos: torch.Tensor | None, sin: torch.Tensor | None, heads: int, head_dim: int, mlp_hidden: int,
                  eps: float = 1e-6):
    """``x @ W^T`` then the epilogue kernel; same arguments and results as ``fused_qkv_mlp_proj_reference``:
    ``q, k, v`` ``[B, heads, S, head_dim]`` and ``silu(gate) * up`` ``[B, S, mlp_hidden]``, in ``x``'s dtype."""
    _validate(x, weight, q_weight, k_weight, cos, sin, heads, head_dim, mlp_hidden)
    B, S, _ = x.shape
    M = B * S
    proj = (x @ weight.T).reshape(M, -1)  # cuBLAS on CUDA; contiguous, so its rows have stride N
    qkv = torch.empty((3, B, heads, S, head_dim), device=x.device, dtype=x.dtype)
    mlp = torch.empty((B, S, mlp_hidden), device=x.device, dtype=x.dtype)
    norm_w = torch.stack([q_weight, k_weight])  # [2, Dh]: one pointer for Q's and K's scales
    has_rope = cos is not None
    if has_rope:
        cos, sin = cos.contiguous(), sin.contiguous()  # one row stride for both
    block_d = max(16, triton.next_power_of_2(head_dim))
    # ~4K elements per tile: 8 KB of bf16 per load, enough bytes in flight per program for a memory-bound kernel.
    block_m = max(1, 4096 // block_d)
    grid = (triton.cdiv(M, block_m), 3 * heads + triton.cdiv(mlp_hidden, block_d))
    _epilogue_kernel[grid](
        proj, norm_w, cos if has_rope else norm_w, sin if has_rope else norm_w, qkv, mlp,
        M, S, heads, mlp_hidden,
        proj.stride(0), cos.stride(0) if has_rope else 0, qkv.stride(0), qkv.stride(1), qkv.stride(2),
        eps,
        HEAD_DIM=head_dim, HAS_ROPE=has_rope, BLOCK_M=block_m, BLOCK_D=block_d, num_warps=4,
    )
    return qkv[0], qkv[1], qkv[2], mlp
