"""Two-stream (joint-attention) Q/K/V projection: every stream's Q/K/V GEMM with the QK-norm + RoPE epilogue,
written head-major straight into the joint ``[B, H, St + Si, Dh]`` Q, K and V.

A two-stream block (FLUX.2's double blocks, all of Qwen-Image's) projects the text and the image tokens with their
own ``to_q/to_k/to_v`` (``add_q_proj``/... for text), RMS-normalizes Q and K per head with each stream's scales,
rotates them with the joint sequence's RoPE rows and attends over ``cat(text, image)``. Eager code writes six
projections, reads them back for the norm and RoPE, and writes the ``torch.cat``; ``qk_norm_rope_joint`` fused the
last two steps into one pass. Here that pass is gone too: each stream is one launch of the fused projection kernel
(:mod:`.fused_qkv_mlp_proj`, no MLP tiles) whose epilogue normalizes, rotates and stores each ``[BLOCK_M, Dh]``
head tile at the stream's rows of the joint buffer. The weights stay the modules' separate parameters: each tile
reads ONE weight (Q, K or V), so the kernel picks the pointer per program (a scalar select outside the K loop) and
no packed copy exists (names, LoRA, hooks, optimizers see diffusers' parameters).

Packed vs multi-pointer, sm_90 at klein-4B TP 2 (``tpfuse compile-report``): identical main loop (4 ``HGMMA
64x128x16`` and 82 instructions per K step) and registers; the pointer select adds 6 instructions before the loop.
A packed weight would cost a ``torch.cat`` per step in training and storage sharing tricks in inference.

Every backend runs as ONE ``torch.library`` op (``tpfuse::joint_qkv_proj``: fake implementation, registered
autograd), so ``torch.compile(fullgraph=True)`` sees one node. Backward: :func:`joint_qkv_proj_backward` (torch ops,
recomputing each stream's Q/K projections).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from ._autocast import _like, autocast_dtype, autocast_off
from ._checks import check_dim, check_eps, check_int32_addressable, check_rope_pair, check_tensors
from ._dispatch import select_backend
from ._rope import angle_table
from .fused_qkv_mlp_proj import SUPPORTED_HEAD_DIMS, fused_proj_triton
from .qk_norm_rope import norm_rope_backward, qk_norm_rope_reference

__all__ = ["joint_qkv_proj", "joint_qkv_proj_backward", "joint_qkv_proj_reference"]


def _unpack(xs, weights, biases, norms):
    """Per stream: ``(x, (wq, wk, wv), (bq, bk, bv) | None, (q_norm, k_norm))`` from the op's flat lists."""
    n = len(xs)
    for i in range(n):
        yield (xs[i], tuple(weights[3 * i:3 * i + 3]), tuple(biases[3 * i:3 * i + 3]) if biases else None,
               (norms[2 * i], norms[2 * i + 1]))


def joint_qkv_proj_reference(xs, weights, biases, norms, cos, sin, heads: int, head_dim: int, eps):
    """Plain torch: per stream ``F.linear`` Q/K/V, fp32 RMSNorm + RoPE (the stream's rows of ``cos``/``sin``),
    ``cat`` over streams. Returns ``[3, B, heads, sum S_i, head_dim]`` in the inputs' dtype."""
    out, row = [], 0
    for (x, ws, bs, (qn, kn)), e in zip(_unpack(xs, weights, biases, norms), eps):
        s = x.shape[1]
        q, k, v = (F.linear(x, w, None if bs is None else b).unflatten(-1, (heads, head_dim)) for w, b in
                   zip(ws, bs or (None,) * 3))  # [B, S_i, H, Dh]
        c, sn = (None, None) if cos is None else (cos[row:row + s], sin[row:row + s])
        q, k = qk_norm_rope_reference(q, k, qn, kn, c, sn, e)
        out.append(torch.stack([q, k, v.to(q.dtype)]))  # [3, B, S_i, H, Dh]
        row += s
    return torch.cat(out, dim=2).transpose(2, 3)


def joint_qkv_proj_backward(gqkv, xs, weights, biases, norms, cos, sin, heads: int, head_dim: int, eps, needs):
    """Gradients for the op's inputs ``(dxs, dweights, dbiases, dnorms, dcos, dsin)`` (lists as the op takes them;
    ``None`` where not needed) of the ``[3, B, H, S, Dh]`` output gradient ``gqkv``."""
    need_x, need_w, need_b, need_n, need_cos, need_sin = needs
    dxs, dws, dbs, dns, dcos, dsin = [], [], [], [], [], []
    row = 0
    for (x, ws, bs, (qn, kn)), e in zip(_unpack(xs, weights, biases, norms), eps):
        s = x.shape[1]
        g = gqkv[:, :, :, row:row + s].transpose(2, 3)  # [3, B, S_i, H, Dh]
        c, sn = (None, None) if cos is None else (cos[row:row + s], sin[row:row + s])
        d_proj = []
        for which in range(2):  # Q and K: RMSNorm + RoPE backward on the recomputed projection
            w, b = ws[which], None if bs is None else bs[which]
            p = F.linear(x, w, b).unflatten(-1, (heads, head_dim))
            dp, dn, ang = norm_rope_backward(p, (qn, kn)[which], c, sn, g[which], e,
                                             (need_x or need_w or need_b, need_n, need_cos or need_sin))
            d_proj.append(dp)
            dns.append(dn)
            if which == 0:
                ang_sum = ang
            elif ang is not None:
                ang_sum = (ang_sum[0] + ang[0], ang_sum[1] + ang[1])
        d_proj.append(g[2].to(x.dtype))
        d_proj = [d.flatten(-2).to(x.dtype) for d in d_proj]  # [B, S_i, H*Dh] each
        dxs.append(sum(d @ w for d, w in zip(d_proj, ws)) if need_x else None)
        x2 = x.reshape(-1, x.shape[-1])
        for d in d_proj:
            d2 = d.reshape(-1, d.shape[-1])
            dws.append(d2.T @ x2 if need_w else None)
            if bs is not None:
                dbs.append(d2.sum(0) if need_b else None)
        if cos is not None:
            dcos.append(ang_sum[0] if ang_sum is not None else torch.zeros_like(cos[row:row + s]))
            dsin.append(ang_sum[1] if ang_sum is not None else torch.zeros_like(sin[row:row + s]))
        row += s
    dc = torch.cat(dcos) if cos is not None and need_cos else None
    ds = torch.cat(dsin) if cos is not None and need_sin else None
    return dxs, dws, dbs, dns, dc, ds


@torch.library.custom_op("tpfuse::joint_qkv_proj", mutates_args=())
def _joint_qkv_proj_op(xs: list[torch.Tensor], weights: list[torch.Tensor], biases: list[torch.Tensor],
                       norms: list[torch.Tensor], cos: torch.Tensor | None, sin: torch.Tensor | None, heads: int,
                       head_dim: int, eps: list[float], backend: str) -> torch.Tensor:
    """``[3, B, heads, sum S_i, head_dim]`` contiguous: Q, K, V stacked (the launcher unbinds them)."""
    if backend == "torch":
        return joint_qkv_proj_reference(xs, weights, biases, norms, cos, sin, heads, head_dim, eps).contiguous()
    B = xs[0].shape[0]
    total = sum(x.shape[1] for x in xs)
    qkv = torch.empty((3, B, heads, total, head_dim), device=xs[0].device, dtype=xs[0].dtype)
    angles = angle_table("joint_qkv_proj", cos, sin) if cos is not None else None  # [2, S, Dh/2] fp32
    row = 0
    for (x, ws, bs, (qn, kn)), e in zip(_unpack(xs, weights, biases, norms), eps):
        s = x.shape[1]
        if s:  # each stream's launch writes its rows of the joint buffer
            fused_proj_triton(x, (*ws, None), (*(bs or (None,) * 3), None), qn, kn,
                              None if angles is None else angles[:, row:row + s], qkv[:, :, :, row:row + s], None,
                              heads, head_dim, 0, e)
        row += s
    return qkv


@_joint_qkv_proj_op.register_fake
def _(xs, weights, biases, norms, cos, sin, heads, head_dim, eps, backend):
    total = sum(x.shape[1] for x in xs)
    return xs[0].new_empty((3, xs[0].shape[0], heads, total, head_dim))


def _setup(ctx, inputs, output):
    xs, weights, biases, norms, cos, sin, heads, head_dim, eps, _backend = inputs
    ctx.save_for_backward(*xs, *weights, *biases, *norms, cos, sin)
    ctx.sizes = (len(xs), len(biases))
    ctx.dims = (heads, head_dim, list(eps))


def _backward(ctx, gqkv):
    n, nb = ctx.sizes
    saved = list(ctx.saved_tensors)
    xs, weights, biases = saved[:n], saved[n:4 * n], saved[4 * n:4 * n + nb]
    norms, (cos, sin) = saved[4 * n + nb:6 * n + nb], saved[-2:]
    flags = [any(f) if isinstance(f, (list, tuple)) else bool(f) for f in ctx.needs_input_grad[:6]]
    dxs, dws, dbs, dns, dc, ds = joint_qkv_proj_backward(gqkv, xs, weights, biases, norms, cos, sin, *ctx.dims,
                                                         flags)
    return dxs, dws, dbs, dns, dc, ds, None, None, None, None


_joint_qkv_proj_op.register_autograd(_backward, setup_context=_setup)


def joint_qkv_proj(xs: Sequence[torch.Tensor], weights: Sequence[Sequence[torch.Tensor]],
                   q_weights: Sequence[torch.Tensor], k_weights: Sequence[torch.Tensor], cos: torch.Tensor | None,
                   sin: torch.Tensor | None, heads: int, head_dim: int, eps=1e-6,
                   biases: Sequence[Sequence[torch.Tensor] | None] | None = None, backend: str | None = None):
    """The joint attention's Q, K and V of several token streams, each projected with its own weights.

    Args:
        xs: per stream ``[B, S_i, K]``, in the joint sequence's order (text first for FLUX.2 and Qwen-Image).
        weights: per stream ``(W_q, W_k, W_v)``, each ``[heads*head_dim, K]`` (this rank's column shards).
        q_weights, k_weights: per stream ``[head_dim]`` RMSNorm scales.
        cos, sin: ``[sum S_i, head_dim]`` RoPE of the joint sequence (interleaved pairs), or ``None``.
        eps: one float, or one per stream. biases: per stream ``(b_q, b_k, b_v)`` or ``None`` (all or none).
        backend: ``"torch"`` or ``"triton"``; default: triton for CUDA tensors, torch on CPU.

    Returns ``q, k, v``: ``[B, heads, sum S_i, head_dim]`` (views of one contiguous buffer), ready for SDPA.
    """
    op = "joint_qkv_proj"
    xs, weights = list(xs), [list(w) for w in weights]
    n = len(xs)
    if n == 0 or not all(len(x) == n for x in (weights, q_weights, k_weights)):
        raise ValueError(f"{op}: xs, weights, q_weights and k_weights need one entry per stream, got "
                         f"{n}, {len(weights)}, {len(q_weights)}, {len(k_weights)}")
    biases = [None] * n if biases is None else list(biases)
    if len(biases) != n or any((b is None) != (biases[0] is None) for b in biases):
        raise ValueError(f"{op}: biases must be None or one (b_q, b_k, b_v) per stream for every stream")
    eps_list = [eps] * n if not isinstance(eps, (list, tuple)) else list(eps)
    if len(eps_list) != n:
        raise ValueError(f"{op}: eps must be a float or one per stream ({n}), got {eps!r}")
    eps_list = [check_eps(op, e) for e in eps_list]
    heads, head_dim = check_dim(op, "heads", heads), check_dim(op, "head_dim", head_dim)
    if head_dim % 2:
        raise ValueError(f"{op}: head_dim={head_dim} must be even (RoPE rotates pairs)")
    ref = xs[0]
    if not isinstance(ref, torch.Tensor):
        raise TypeError(f"{op}: xs[0] must be a torch.Tensor, got {type(ref).__name__}")
    cast = autocast_dtype(ref.device)
    if cast is not None:  # autocast: the GEMMs in the autocast dtype, as F.linear
        with autocast_off(ref.device):
            return joint_qkv_proj([x.to(cast) for x in xs], [[w.to(cast) for w in ws] for ws in weights], q_weights,
                                  k_weights, cos, sin, heads, head_dim, eps_list,
                                  None if biases[0] is None else [[_like(b, dtype=cast) for b in bs] for bs in biases],
                                  backend)
    named = {}
    for i in range(n):
        named[f"xs[{i}]"] = xs[i]
        if len(weights[i]) != 3:
            raise ValueError(f"{op}: weights[{i}] must be (W_q, W_k, W_v), got {len(weights[i])} tensors")
        named |= {f"weights[{i}][{j}]": w for j, w in enumerate(weights[i])}
        named |= {f"q_weights[{i}]": q_weights[i], f"k_weights[{i}]": k_weights[i]}
        if biases[i] is not None:
            if len(biases[i]) != 3:
                raise ValueError(f"{op}: biases[{i}] must be (b_q, b_k, b_v), got {len(biases[i])} tensors")
            named |= {f"biases[{i}][{j}]": b for j, b in enumerate(biases[i])}
    check_rope_pair(op, cos, sin, named)
    check_tensors(op, named, ref.device, "xs[0]")
    inner = heads * head_dim
    total = 0
    for i, x in enumerate(xs):
        if x.dim() != 3 or x.shape[0] != ref.shape[0] or x.shape[2] != ref.shape[2]:
            raise ValueError(f"{op}: xs[{i}] must be [B, S_i, K] = [{ref.shape[0]}, S_i, {ref.shape[-1]}] like "
                             f"xs[0], got shape {tuple(x.shape)}")
        total += x.shape[1]
        for j, w in enumerate(weights[i]):
            if w.shape != (inner, x.shape[-1]):
                raise ValueError(f"{op}: weights[{i}][{j}] must be [heads*head_dim, K] = [{inner}, {x.shape[-1]}] "
                                 f"(heads={heads}, head_dim={head_dim}), got shape {tuple(w.shape)}")
            if w.dtype != ref.dtype:
                raise TypeError(f"{op}: weights[{i}][{j}] has dtype {w.dtype}, xs[0] has {ref.dtype}")
        for j, b in enumerate(biases[i] or ()):
            if b.shape != (inner,) or b.dtype != ref.dtype:
                raise ValueError(f"{op}: biases[{i}][{j}] must be [{inner}] {ref.dtype}, got {tuple(b.shape)} "
                                 f"{b.dtype}")
        for name, w in ((f"q_weights[{i}]", q_weights[i]), (f"k_weights[{i}]", k_weights[i])):
            if w.shape != (head_dim,):
                raise ValueError(f"{op}: {name} must be [{head_dim}], got shape {tuple(w.shape)}")
        if x.dtype != ref.dtype:
            raise TypeError(f"{op}: xs[{i}] has dtype {x.dtype}, xs[0] has {ref.dtype}")
    if cos is not None:
        for name, t in (("cos", cos), ("sin", sin)):
            if t.shape != (total, head_dim):
                raise ValueError(f"{op}: {name} must be [sum S_i, head_dim] = [{total}, {head_dim}], got shape "
                                 f"{tuple(t.shape)}")
    chosen = select_backend(op, ref.device, backend)
    if chosen == "triton":
        if head_dim not in SUPPORTED_HEAD_DIMS:
            raise ValueError(f"{op}: the triton kernel supports head_dim in {SUPPORTED_HEAD_DIMS}, got {head_dim}; "
                             "use backend='torch'")
        check_int32_addressable(op, named, {"q/k/v": (3, ref.shape[0], heads, total, head_dim)})
    flat_w = [w for ws in weights for w in ws]
    flat_b = [] if biases[0] is None else [b for bs in biases for b in bs]
    norms = [t for i in range(n) for t in (q_weights[i], k_weights[i])]
    qkv = _joint_qkv_proj_op(xs, flat_w, flat_b, norms, cos, sin, heads, head_dim, eps_list, chosen)
    return qkv.unbind(0)
