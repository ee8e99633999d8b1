"""FLUX.2 single-stream in-projection as ONE GEMM with the whole attention/MLP prologue in its epilogue.

The rank's packed weight is ``[Q | K | V | gate | up]`` (``nn.Linear`` layout ``[3*H*Dh + 2*M, K]``). Eager code
writes that slab, then reads it back to split, RMS-normalize, rotate, transpose and gate it. Here every program
owns an output tile whose epilogue finishes the job in registers:

* a **Q or K program** owns one head: its two accumulators hold the head's even and odd features (the weight rows
  ``2i`` and ``2i+1`` are fed as two B operands), so the per-head RMSNorm is a row reduction over both and the
  RoPE pair ``(x[2i], x[2i+1])`` is ``(acc0[:, i], acc1[:, i])`` — same lane, no shuffles or reshapes. A first cut
  that kept one 128-wide accumulator and paired lanes with ``reshape``/``split``/``join`` compiled to 255
  registers and a 224-byte stack frame (spilling) on sm_90.
* a **V program** owns one head as two halves and stores it.
* an **MLP program** owns ``Dh/2`` columns of gate *and* the matching columns of up, and writes only
  ``silu(gate) * up``.

RoPE uses one angle per pair: ``cos``/``sin`` must repeat each pair's value (``cos[:, 2i] == cos[:, 2i+1]``), as
diffusers' ``Flux2PosEmbed`` and :func:`tpfuse.tp_layers.rope_cos_sin` return them; the launcher verifies it once
per ``cos``/``sin`` tensor object and version (set ``TPFUSE_CHECK_ROPE=0`` to skip the check, e.g. under CUDA
graphs; writes through ``.data`` are not seen by the version counter).

So all programs have the same shape (two ``[BLOCK_M, Dh/2]`` accumulators, same K loop), and Q/K/V land directly
in ``[B, H, S, Dh]`` for the attention. Backward: a torch implementation (autograd through the reference, which
recomputes the projection); the forward is the Triton kernel.
"""

from __future__ import annotations

import os
import weakref

import torch
import torch.nn.functional as F

from ._checks import check_int32_addressable, check_rope_pair, check_tensors
from ._dispatch import select_backend
from ._math import compute_dtype
from ._triton import tl, triton
from .qk_norm_rope import qk_norm_rope_reference

__all__ = ["fused_qkv_mlp_proj", "fused_qkv_mlp_proj_reference", "proj_config", "SUPPORTED_HEAD_DIMS"]

# Both accumulators are Dh/2 wide and tl.dot needs N >= 16, so Dh >= 32; 256 keeps the tile in registers.
SUPPORTED_HEAD_DIMS = (32, 64, 128, 256)


def proj_config(m: int, k: int, head_dim: int, dtype: torch.dtype) -> dict:
    """Tile configuration (the compile report compiles exactly these).

    128 tokens x one head per program, K in steps of 64: two warpgroups each own 64 rows of both accumulators
    (64 fp32 registers per thread at Dh=128), and a stage of A + 2 B tiles is 32 KB in bf16, so 4 stages fit in
    128 KB of shared memory. fp32 inputs (tests, interpreter) halve the stages to stay under the 227 KB limit.
    """
    half = head_dim // 2
    block_m = 128 if m > 64 else 64
    stages = 4 if dtype in (torch.bfloat16, torch.float16) else 2
    return {"BLOCK_M": block_m, "BLOCK_K": 64, "HALF": half, "GROUP_M": 8, "num_warps": 8 if block_m == 128 else 4,
            "num_stages": stages, "EVEN_K": k % 64 == 0}


@triton.jit
def _fused_qkv_mlp_kernel(
    x_ptr, w_ptr, nw_ptr, cos_ptr, sin_ptr, qkv_ptr, mlp_ptr,
    M, K, S, HEADS, MLP,
    stride_xm, stride_wn, stride_cs,
    stride_qkv_w, stride_qkv_b, stride_qkv_h, stride_qkv_s,
    stride_mlp_m,
    eps,
    HEAD_DIM: tl.constexpr, HALF: tl.constexpr, HAS_ROPE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, EVEN_K: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    # Grouped tile order: GROUP_M row tiles sweep the columns together, so the weight stays in L2.
    pid = tl.program_id(0)
    n_tiles_m = tl.cdiv(M, BLOCK_M)
    n_tiles_n = 3 * HEADS + tl.cdiv(MLP, HALF)
    width = GROUP_M * n_tiles_n
    first_m = (pid // width) * GROUP_M
    group_m = min(n_tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % group_m
    pid_n = (pid % width) // group_m

    j = tl.arange(0, HALF)
    is_qk = pid_n < 2 * HEADS
    is_v = (pid_n >= 2 * HEADS) & (pid_n < 3 * HEADS)
    mlp_cols = (pid_n - 3 * HEADS) * HALF + j  # only meaningful for MLP programs
    head_base = pid_n * HEAD_DIM
    mlp_base = 3 * HEADS * HEAD_DIM
    # Weight rows feeding the two accumulators: even/odd features (Q, K), the two halves (V), gate/up (MLP).
    rows0 = tl.where(is_qk, head_base + 2 * j, tl.where(is_v, head_base + j, mlp_base + mlp_cols))
    rows1 = tl.where(is_qk, head_base + 2 * j + 1, tl.where(is_v, head_base + HALF + j, mlp_base + MLP + mlp_cols))
    # Valid columns of this tile: all of a head; the MLP tail tile stops at MLP. (A scalar limit, not
    # `scalar | vector` of booleans, which the interpreter rejects as a mask.)
    n_valid = tl.where(pid_n < 3 * HEADS, HALF, MLP - (pid_n - 3 * HEADS) * HALF)
    n_mask = j < n_valid

    # int32 offsets (the launcher checks every tensor has < 2^31 elements): int64 pointer tensors for the A and
    # two B tiles cost 128 registers per thread in the K loop and pushed the epilogue into spills.
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = offs_m < M
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :]  # [BM, BK]
    b0_ptrs = w_ptr + rows0[None, :] * stride_wn + offs_k[:, None]  # [BK, HALF], W^T view
    b1_ptrs = w_ptr + rows1[None, :] * stride_wn + offs_k[:, None]

    acc0 = tl.zeros((BLOCK_M, HALF), dtype=tl.float32)
    acc1 = tl.zeros((BLOCK_M, HALF), dtype=tl.float32)
    for kk in range(0, tl.cdiv(K, BLOCK_K)):
        if EVEN_K:
            a = tl.load(a_ptrs, mask=m_mask[:, None], other=0.0)
            b0 = tl.load(b0_ptrs, mask=n_mask[None, :], other=0.0)
            b1 = tl.load(b1_ptrs, mask=n_mask[None, :], other=0.0)
        else:
            k_mask = offs_k < K - kk * BLOCK_K
            a = tl.load(a_ptrs, mask=m_mask[:, None] & k_mask[None, :], other=0.0)
            b0 = tl.load(b0_ptrs, mask=k_mask[:, None] & n_mask[None, :], other=0.0)
            b1 = tl.load(b1_ptrs, mask=k_mask[:, None] & n_mask[None, :], other=0.0)
        acc0 = tl.dot(a, b0, acc0, input_precision=INPUT_PRECISION)
        acc1 = tl.dot(a, b1, acc1, input_precision=INPUT_PRECISION)
        a_ptrs += BLOCK_K
        b0_ptrs += BLOCK_K
        b1_ptrs += BLOCK_K

    out_ty = qkv_ptr.dtype.element_ty
    b_idx = offs_m // S
    s_idx = offs_m % S
    if pid_n < 3 * HEADS:
        which = pid_n // HEADS  # 0: Q, 1: K, 2: V
        head = pid_n % HEADS
        row_off = which * stride_qkv_w + b_idx * stride_qkv_b + head * stride_qkv_h + s_idx * stride_qkv_s
        if which < 2:
            # Per-head RMSNorm over both halves, then RoPE on the (even, odd) pairs.
            rstd = 1.0 / tl.sqrt((tl.sum(acc0 * acc0, axis=1) + tl.sum(acc1 * acc1, axis=1)) / HEAD_DIM + eps)
            w_even = tl.load(nw_ptr + which * HEAD_DIM + 2 * j).to(tl.float32)
            w_odd = tl.load(nw_ptr + which * HEAD_DIM + 2 * j + 1).to(tl.float32)
            n_even = acc0 * rstd[:, None] * w_even[None, :]
            n_odd = acc1 * rstd[:, None] * w_odd[None, :]
            ptrs = qkv_ptr + row_off[:, None] + 2 * j[None, :]
            if HAS_ROPE:
                # One angle per pair (cos[:, 2i] == cos[:, 2i+1], checked by the launcher): two angle tiles
                # live instead of four. Loading all four compiled to 255 registers + 44 B of spills (sm_90,
                # BLOCK_M=128, 8 warps); this is 222 registers, no spills.
                cs = s_idx[:, None] * stride_cs + 2 * j[None, :]
                c = tl.load(cos_ptr + cs, mask=m_mask[:, None], other=0.0)
                sn = tl.load(sin_ptr + cs, mask=m_mask[:, None], other=0.0)
                tl.store(ptrs, (n_even * c - n_odd * sn).to(out_ty), mask=m_mask[:, None])
                tl.store(ptrs + 1, (n_odd * c + n_even * sn).to(out_ty), mask=m_mask[:, None])
            else:
                tl.store(ptrs, n_even.to(out_ty), mask=m_mask[:, None])
                tl.store(ptrs + 1, n_odd.to(out_ty), mask=m_mask[:, None])
        else:
            ptrs = qkv_ptr + row_off[:, None] + j[None, :]
            tl.store(ptrs, acc0.to(out_ty), mask=m_mask[:, None])
            tl.store(ptrs + HALF, acc1.to(out_ty), mask=m_mask[:, None])
    else:
        act = acc0 / (1.0 + tl.exp(-acc0)) * acc1  # silu(gate) * up, fp32
        ptrs = mlp_ptr + offs_m[:, None] * stride_mlp_m + mlp_cols[None, :]
        tl.store(ptrs, act.to(mlp_ptr.dtype.element_ty), mask=m_mask[:, None] & (mlp_cols < MLP)[None, :])


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

# Verified cos/sin pairs: id -> (weak references, version counters). A tensor object is checked again only when
# in-place ops bump its version; writes through ``.data`` bypass the counter and are not seen.
_checked_angles: dict[tuple[int, int], tuple] = {}


def _check_pair_angles(cos: torch.Tensor, sin: torch.Tensor) -> None:
    """Raise unless every RoPE pair shares one angle (what the kernel reads); once per cos/sin tensor pair."""
    if os.environ.get("TPFUSE_CHECK_ROPE", "1") == "0":
        return
    key = (id(cos), id(sin))
    seen = _checked_angles.get(key)
    if seen is not None and seen[0]() is cos and seen[1]() is sin and seen[2] == (cos._version, sin._version):
        return
    for name, t in (("cos", cos), ("sin", sin)):
        if not torch.equal(t[:, 0::2], t[:, 1::2]):
            raise ValueError(f"fused_qkv_mlp_proj: {name}[:, 2i] != {name}[:, 2i+1]; RoPE rotates each pair by one "
                             "angle, so cos/sin must repeat each value twice (as Flux2PosEmbed returns them)")
    if len(_checked_angles) > 64:
        _checked_angles.clear()
    _checked_angles[key] = (weakref.ref(cos), weakref.ref(sin), (cos._version, sin._version))


def _fused_triton(x, weight, q_weight, k_weight, cos, sin, heads, head_dim, mlp_hidden, eps):
    B, S, K = x.shape
    M = B * S
    x2 = x.reshape(M, K)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    qkv = torch.empty((3, B, heads, S, head_dim), device=x.device, dtype=x.dtype)  # Q, K, V head-major
    mlp = torch.empty((B, S, mlp_hidden), device=x.device, dtype=x.dtype)
    norm_w = torch.stack([q_weight, k_weight]).contiguous()  # [2, Dh]: one pointer for Q's and K's scales
    cfg = proj_config(M, K, head_dim, x.dtype)
    half = cfg["HALF"]
    grid = (triton.cdiv(M, cfg["BLOCK_M"]) * (3 * heads + triton.cdiv(mlp_hidden, half)),)
    has_rope = cos is not None
    precision = "ieee" if x.dtype == torch.float32 else "tf32"  # fp32 inputs: exact fp32 products, no TF32
    _fused_qkv_mlp_kernel[grid](
        x2, weight, norm_w, cos if has_rope else norm_w, sin if has_rope else norm_w, qkv, mlp,
        M, K, S, heads, mlp_hidden,
        x2.stride(0), weight.stride(0), cos.stride(0) if has_rope else 0,
        qkv.stride(0), qkv.stride(1), qkv.stride(2), qkv.stride(3), mlp_hidden,
        eps,
        HEAD_DIM=head_dim, HALF=half, HAS_ROPE=has_rope, BLOCK_M=cfg["BLOCK_M"], BLOCK_K=cfg["BLOCK_K"],
        GROUP_M=cfg["GROUP_M"], EVEN_K=cfg["EVEN_K"], INPUT_PRECISION=precision,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    return qkv[0], qkv[1], qkv[2], mlp


class _FusedQKVMLPProj(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, q_weight, k_weight, cos, sin, heads, head_dim, mlp_hidden, eps):
        ctx.save_for_backward(x, weight, q_weight, k_weight, cos, sin)
        ctx.dims = (heads, head_dim, mlp_hidden, eps)
        return _fused_triton(x, weight, q_weight, k_weight, cos, sin, heads, head_dim, mlp_hidden, eps)

    @staticmethod
    def backward(ctx, gq, gk, gv, gmlp):
        saved = ctx.saved_tensors
        needs = ctx.needs_input_grad[:6]
        with torch.enable_grad():
            inputs = [t if t is None else t.detach().requires_grad_(need) for t, need in zip(saved, needs)]
            outs = fused_qkv_mlp_proj_reference(*inputs, *ctx.dims)
            pairs = [(o, g) for o, g in zip(outs, (gq, gk, gv, gmlp)) if g is not None]
            wanted = [t for t in inputs if t is not None and t.requires_grad]
            grads = iter(torch.autograd.grad([o for o, _ in pairs], wanted, [g for _, g in pairs],
                                             allow_unused=True))
        return (*[next(grads) if need else None for need in needs], None, None, None, None)


def _validate(x, weight, q_weight, k_weight, cos, sin, heads, head_dim, mlp_hidden, eps):
    named = {"x": x, "weight": weight, "q_weight": q_weight, "k_weight": k_weight}
    check_rope_pair("fused_qkv_mlp_proj", cos, sin, named)
    check_tensors("fused_qkv_mlp_proj", named, x.device if isinstance(x, torch.Tensor) else None, "x")
    for name, v in (("heads", heads), ("head_dim", head_dim), ("mlp_hidden", mlp_hidden)):
        if not isinstance(v, int) or v <= 0:
            raise ValueError(f"fused_qkv_mlp_proj: {name} must be a positive int, got {v!r}")
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
    if not eps > 0:
        raise ValueError(f"fused_qkv_mlp_proj: eps must be positive, got {eps}")


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
    _validate(x, weight, q_weight, k_weight, cos, sin, heads, head_dim, mlp_hidden, eps)
    chosen = select_backend("fused_qkv_mlp_proj", x.device, backend)
    if chosen == "triton" and head_dim not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"fused_qkv_mlp_proj: the triton kernel supports head_dim in {SUPPORTED_HEAD_DIMS}, "
                         f"got {head_dim}; use backend='torch'")
    if chosen == "torch":
        return fused_qkv_mlp_proj_reference(x, weight, q_weight, k_weight, cos, sin, heads, head_dim, mlp_hidden,
                                            eps)
    if weight.stride(-1) != 1:
        raise ValueError(f"fused_qkv_mlp_proj: weight must be contiguous in its last dim, got strides "
                         f"{weight.stride()}")
    if cos is not None:
        if cos.stride(-1) != 1 or sin.stride() != cos.stride():
            cos, sin = cos.contiguous(), sin.contiguous()
        _check_pair_angles(cos, sin)
    B, S, _ = x.shape
    outputs = {"q/k/v": torch.empty((3, B, heads, S, head_dim), device="meta"),  # shapes only: no memory
               "mlp": torch.empty((B, S, mlp_hidden), device="meta")}
    check_int32_addressable("fused_qkv_mlp_proj", {"x": x, "weight": weight, **outputs})
    return _FusedQKVMLPProj.apply(x, weight, q_weight, k_weight, cos, sin, heads, head_dim, mlp_hidden, eps)
