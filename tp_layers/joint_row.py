"""Several row-parallel layers reduced as ONE all-reduce: the two streams of a two-stream block.

A two-stream block has four row-parallel projections: the image and text attention outputs (``to_out.0``,
``to_add_out``) and the two feed-forward outputs. Reduced one by one they are four all-reduces, and the text stream's
(512 tokens) is latency-bound at TP 4-8: NCCL's ~10-20 us per call is most of it. The image and text outputs of a
pair are independent until the next norm, so :func:`joint_row_parallel` computes both partial products into one
``[B*St + B*Si, D]`` buffer (each stream with its own weight, gate and residual folded in, as
:meth:`RowParallelLinear.forward_fused` does for one) and all-reduces that buffer once, chunked on the wave-aligned
schedule of the joint row count so each chunk's all-reduce overlaps the next chunk's GEMMs: 2 reductions per
two-stream block instead of 4 (``bench/scaling_model.py`` models the saving).

On Triton a chunk that spans both streams' rows is ONE launch over both streams' row tiles
(:func:`~tpfuse.kernels.row_parallel_matmul.row_parallel_matmul_segments_triton`), so it fills whole waves (two
launches there each ended in a partly empty wave: at TP 2 that cost more than the joint reduce saved for dev, in
``bench/scaling_model.py``).

A bias (Qwen-Image's out-projections have one) is folded too: the rank that adds the residual adds ``gate * b``
with it, so the reduced sum is ``residual + gate * (x W^T + b)``. One ``torch.library`` op
(``tpfuse::joint_row_parallel_linear``), so a compiled graph keeps the chunks and their collectives inside it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import nn
from tpfuse.kernels import select_backend
from tpfuse.kernels._autocast import _like, autocast_dtype, autocast_off
from tpfuse.kernels._math import each_needs
from tpfuse.kernels.row_parallel_matmul import (
    row_parallel_matmul_backward,
    row_parallel_matmul_forward,
    row_parallel_matmul_segments_triton,
)

from .comm import _record, all_reduce_start, all_reduce_wait, get_rank, get_world_size, process_group
from .consistency import check_inputs_agree, inputs_check_due
from .linear import RowParallelLinear, _sm_count, check_input, chunk_bounds
from .schedule import wave_schedule

__all__ = ["joint_row_parallel"]


def _gate_view(gate: torch.Tensor) -> torch.Tensor:
    """A gate as the row kernel's ``[B, N]`` / ``[B, S, N]`` broadcast against ``[B, S, N]``."""
    return gate.unsqueeze(1) if gate.dim() == 2 else gate


def _split(flat: Sequence, counts: Sequence[int]) -> list[list]:
    out, i = [], 0
    for n in counts:
        out.append(list(flat[i:i + n]))
        i += n
    return out


def _present(values: Sequence, flags: Sequence[bool]) -> list:
    it = iter(values)
    return [next(it) if f else None for f in flags]


@torch.library.custom_op("tpfuse::joint_row_parallel_linear", mutates_args=())
def _joint_row_parallel_linear(parts: list[torch.Tensor], counts: list[int], weights: list[torch.Tensor],
                               wcounts: list[int], gates: list[torch.Tensor], has_gate: list[bool], residuals: list[torch.Tensor],
                               has_residual: list[bool], biases: list[torch.Tensor], has_bias: list[bool],
                               add_residual: bool, edges: list[int], group: str, backend: str) -> torch.Tensor:
    """``[sum_i B_i S_i, N]``: stream i's rows are ``residual_i + gate_i * all_reduce(cat(parts_i) W_i^T + b_i)``;
    ``wcounts[i]`` weights per stream: 1 (packed ``[N, sum K]``) or one per part (their products summed).
    Optional per-stream tensors come as the present ones plus ``has_*`` flags (a ``Tensor?[]`` cannot hold None).
    ``edges``: chunk boundaries over the joint rows; ``group``: the process group's name (``""``: no reduce)."""
    streams = _split(parts, counts)
    weights = [w[0] if len(w) == 1 else w for w in _split(weights, wcounts)]
    gates_, res_, biases_ = _present(gates, has_gate), _present(residuals, has_residual), _present(biases, has_bias)
    w0 = weights[0][0] if isinstance(weights[0], list) else weights[0]
    n = w0.shape[0]
    sizes = [p[0].shape[0] * p[0].shape[1] for p in streams]
    out = torch.empty((sum(sizes), n), device=w0.device, dtype=w0.dtype)
    bases = [sum(sizes[:i]) for i in range(len(sizes))]
    streams = [[p if p.is_contiguous() else p.contiguous() for p in ps] for ps in streams]
    # The bias folded into the residual the adding rank passes: gate * b + residual (torch, [B, S, N] on that
    # rank only; the kernel's epilogue has no bias term).
    folded = []
    for ps, g, r, b in zip(streams, gates_, res_, biases_):
        if add_residual and b is not None:
            gb = b if g is None else _gate_view(g) * b
            r = gb.expand(ps[0].shape[0], ps[0].shape[1], n) if r is None else r + gb
        folded.append(r)
    pg = process_group(group) if group else None

    def compute(i: int, lo: int, hi: int) -> None:  # stream i's local rows [lo, hi) into its rows of out
        view = out[bases[i]:bases[i] + sizes[i]]
        r = folded[i]
        row_parallel_matmul_forward(streams[i], weights[i], gates_[i], r, add_residual and r is not None, view,
                                    (lo, hi), backend)

    if backend == "torch":  # one GEMM per stream (CPU BLAS is not row-invariant); only the reduce is chunked
        for i in range(len(streams)):
            compute(i, 0, sizes[i])
    handles = []
    for r0, r1 in zip(edges, edges[1:]):
        if backend != "torch":
            # The chunk's rows of every stream it spans, in ONE launch where they pair (a chunk across the
            # text/image boundary would otherwise be two launches, each ending in a partly empty wave).
            segments = []
            for i, base in enumerate(bases):
                lo, hi = max(r0, base), min(r1, base + sizes[i])
                if lo < hi:
                    r = folded[i]
                    segments.append((streams[i], weights[i], gates_[i], r, add_residual and r is not None,
                                     out[base:base + sizes[i]], (lo - base, hi - base)))
            row_parallel_matmul_segments_triton(segments)
        if pg is not None and r1 > r0:
            _record("all_reduce", "forward", out[r0:r1])
            handles.append(dist.all_reduce(out[r0:r1], group=pg, async_op=True))
    for h in handles:
        h.wait()
    return out


@_joint_row_parallel_linear.register_fake
def _(parts, counts, weights, wcounts, gates, has_gate, residuals, has_residual, biases, has_bias, add_residual, edges, group,
      backend):
    streams = _split(parts, counts)
    return weights[0].new_empty((sum(p[0].shape[0] * p[0].shape[1] for p in streams), weights[0].shape[0]))


def _setup(ctx, inputs, output):
    parts, counts, weights, wcounts, gates, has_gate, residuals, has_residual, biases, has_bias = inputs[:10]
    ctx.save_for_backward(*parts, *weights, *gates, *biases)
    ctx.meta = (list(counts), list(wcounts), list(has_gate), list(has_residual), list(has_bias), len(parts),
                len(weights), len(gates))
    ctx.group = inputs[12]


def _backward(ctx, grad):
    counts, wcounts, has_gate, has_residual, has_bias, n_parts, n_w, n_g = ctx.meta
    saved = list(ctx.saved_tensors)
    parts, weights = saved[:n_parts], saved[n_parts:n_parts + n_w]
    gates, biases = saved[n_parts + n_w:n_parts + n_w + n_g], saved[n_parts + n_w + n_g:]
    streams = _split(parts, counts)
    gates_, biases_ = _present(gates, has_gate), _present(biases, has_bias)
    flags = ctx.needs_input_grad
    # The tensor-list inputs: parts (0), weights (2), gates (4), residuals (6), biases (8).
    need_parts, need_w = _split(each_needs(flags[0], n_parts), counts), _split(each_needs(flags[2], n_w), wcounts)
    weights = [w[0] if len(w) == 1 else w for w in _split(weights, wcounts)]
    need_g = iter(each_needs(flags[4], n_g))
    need_r = iter(each_needs(flags[6], sum(has_residual)))
    need_b = iter(each_needs(flags[8], len(biases)))
    n = grad.shape[-1]
    dparts, dws, dgates, dres, dbs, grads = [], [], [], [], [], []
    row = 0
    for i, ps in enumerate(streams):
        B, S = ps[0].shape[:2]
        g_i = grad[row:row + B * S].view(B, S, n)  # [B, S, N]
        grads.append(g_i)
        row += B * S
        gate = gates_[i]
        need_gate = gate is not None and next(need_g)
        *dp, dw, dg, _ = row_parallel_matmul_backward(g_i, ps, weights[i], gate,
                                                      [*need_parts[i], any(need_w[i]), need_gate, False])
        dparts += dp
        dw = dw if isinstance(dw, list) else [dw] * wcounts[i]  # per-part weights: a list (or None for all)
        dws += [d if need else None for d, need in zip(dw, need_w[i])]
        if gate is not None:
            dgates.append(dg)
        if has_residual[i]:
            dres.append(g_i if next(need_r) else None)
        if biases_[i] is not None:
            scaled = g_i if gate is None else g_i * _gate_view(gate)
            dbs.append(scaled.sum(dim=(0, 1)).to(biases_[i].dtype) if next(need_b) else None)
    # Each rank's dgate holds its partial product: one all-reduce for every stream's gate, then the bias term
    # (replicated, so added after the reduce).
    live = [d for d in dgates if d is not None]
    if live and ctx.group:
        flat = all_reduce_wait(all_reduce_start(torch.cat([d.reshape(-1) for d in live]), ctx.group, "backward"))
        pieces = iter(flat.split([d.numel() for d in live]))
        dgates = [None if d is None else next(pieces).view_as(d) for d in dgates]
    j = 0
    for i, gate in enumerate(gates_):
        if gate is None:
            continue
        if dgates[j] is not None and biases_[i] is not None:
            term = grads[i] * biases_[i]  # [B, S, N]: d(gate * b) / d gate
            if gate.dim() == 2 or gate.shape[1] == 1:
                term = term.sum(dim=1, keepdim=gate.dim() == 3)
            if gate.shape[0] == 1 and term.shape[0] > 1:
                term = term.sum(dim=0, keepdim=True)
            dgates[j] = dgates[j] + term.to(dgates[j].dtype)
        j += 1
    return dparts, None, dws, None, dgates, None, dres, None, dbs, None, None, None, None, None


_joint_row_parallel_linear.register_autograd(_backward, setup_context=_setup)


def joint_row_parallel(layers: Sequence[RowParallelLinear | Sequence[RowParallelLinear]],
                       parts: Sequence[Sequence[torch.Tensor]], gates: Sequence[torch.Tensor | None],
                       residuals: Sequence[torch.Tensor | None]) -> list[torch.Tensor]:
    """``[residual_i + gate_i * (cat(parts_i) @ W_i^T + b_i)]`` for row-parallel ``layers`` of one group, with ONE
    (chunked, overlapped) all-reduce for all of them; each output ``[B_i, S_i, out]`` replicated on every rank.

    Args:
        layers: per stream a row-parallel layer, or one layer per part whose outputs are summed (FLUX.3's
            ``to_out`` + ``ff.linear_out``: ``a W_o^T + m W_f^T`` without a cat of the weights); all of one group,
            output width, dtype and device.
        parts: per stream, this rank's input slices ``[B_i, S_i, K]`` (their widths sum to the layer's local
            in-features; one per layer for a sequence of layers).
        gates: per stream ``[B_i, out]``, ``[B_i, 1, out]`` or ``[B_i, S_i, out]`` (per token), or ``None``.
        residuals: per stream ``[B_i, S_i, out]`` or ``None``.
    """
    name = "joint_row_parallel"
    if not (len(layers) == len(parts) == len(gates) == len(residuals)) or not layers:
        raise ValueError(f"{name}: layers, parts, gates and residuals need one entry per stream, got "
                         f"{len(layers)}, {len(parts)}, {len(gates)}, {len(residuals)}")
    groups = [[lay] if isinstance(lay, nn.Module) else list(lay) for lay in layers]
    first = groups[0][0]
    for i, group in enumerate(groups):
        for layer in group:
            if not isinstance(layer, RowParallelLinear):
                raise TypeError(f"{name}: layers[{i}] must be RowParallelLinear(s), got {type(layer).__name__}")
            if layer.group is not first.group or layer.out_features != first.out_features or \
                    layer.weight.dtype != first.weight.dtype or layer.weight.device != first.weight.device:
                raise ValueError(f"{name}: layers[{i}] differs from layers[0] in group, out_features, dtype or "
                                 f"device ({layer.out_features} {layer.weight.dtype} {layer.weight.device} vs "
                                 f"{first.out_features} {first.weight.dtype} {first.weight.device})")
    inputs = {"parts": [[p] if isinstance(p, torch.Tensor) else list(p) for p in parts], "gates": list(gates),
              "residuals": list(residuals)}
    if inputs_check_due(first, inputs):
        check_inputs_agree(first, first.group, inputs, sharded=("parts",))
    n = first.out_features
    flat_parts, counts, weights, wcounts, biases = [], [], [], [], []
    for i, (group, ps, gate, res) in enumerate(zip(groups, parts, gates, residuals)):
        ps = [ps] if isinstance(ps, torch.Tensor) else list(ps)
        widths = [p.shape[-1] if isinstance(p, torch.Tensor) and p.dim() else None for p in ps]
        if len(group) > 1:  # one layer per part
            if len(group) != len(ps) or [lay.in_features_per_partition for lay in group] != widths:
                raise ValueError(f"{name}: parts[{i}] widths {widths} must be the local in_features "
                                 f"{[lay.in_features_per_partition for lay in group]} of layers[{i}], one part each")
        elif not ps or None in widths or sum(widths) != group[0].in_features_per_partition:
            raise ValueError(f"{name}: parts[{i}] widths {widths} must sum to layers[{i}]'s local in_features "
                             f"{group[0].in_features_per_partition}")
        for j, p in enumerate(ps):
            check_input(p, group[0].weight, p.shape[-1], f"{name} parts[{i}][{j}]")
            if p.dim() != 3 or p.shape[:2] != ps[0].shape[:2]:
                raise ValueError(f"{name}: parts[{i}][{j}] must be [B, S, K] like parts[{i}][0] "
                                 f"{tuple(ps[0].shape)}, got {tuple(p.shape)}")
        B, S = ps[0].shape[:2]
        if res is not None:
            check_input(res, first.weight, n, f"{name} residuals[{i}]")
            if res.shape != (B, S, n):
                raise ValueError(f"{name}: residuals[{i}] must be [{B}, {S}, {n}], got {tuple(res.shape)}")
        if gate is not None:
            check_input(gate, first.weight, n, f"{name} gates[{i}]")
            if not (gate.dim() in (2, 3) and gate.shape[0] in (1, B)
                    and (gate.dim() == 2 or gate.shape[1] in (1, S))):
                raise ValueError(f"{name}: gates[{i}] must be [B, out], [B, 1, out] or [B, S, out] with B={B}, "
                                 f"S={S}, got {tuple(gate.shape)}")
        flat_parts += ps
        counts.append(len(ps))
        weights += [lay.weight for lay in group]
        wcounts.append(len(group))
        present = [lay.bias for lay in group if lay.bias is not None]
        biases.append(None if not present else present[0] if len(present) == 1 else sum(present))
    rows = sum(p[0].shape[0] * p[0].shape[1] for p in _split(flat_parts, counts))
    world = get_world_size(first.group)
    if first.overlap == "auto":  # the wave-aligned schedule of the joint row count
        edges = wave_schedule(rows, n, sum(w.shape[1] for w in weights[:wcounts[0]]), world,
                              first.weight.element_size(), _sm_count(first.weight.device)).edges
    else:
        edges = [0] + [r1 for _, r1 in chunk_bounds(rows, first.overlap)]
    if not torch.compiler.is_compiling():  # eager only (see RowParallelLinear.last_chunks)
        for group in groups:
            for layer in group:
                layer.last_chunks = len(edges) - 1
    backend = select_backend("row_parallel_matmul", first.weight.device)
    present = lambda ts: [t for t in ts if t is not None]  # noqa: E731
    cast = autocast_dtype(first.weight.device)
    fold_gates, fold_res = (gates, residuals) if cast is None else ([None] * len(gates), [None] * len(residuals))
    with autocast_off(first.weight.device) if cast is not None else contextlib.nullcontext():
        if cast is not None:
            # Autocast: the GEMMs (and the all-reduce) in the autocast dtype, as F.linear; gates and residuals then
            # in torch with autocast's type promotion, as the dense block applies them (RowParallelLinear does
            # the same).
            flat_parts = [p.to(cast) for p in flat_parts]
            weights = [w.to(cast) for w in weights]
            biases = [_like(b, dtype=cast) for b in biases]
        out = _joint_row_parallel_linear(
            flat_parts, counts, weights, wcounts, present(fold_gates), [g is not None for g in fold_gates],
            present(fold_res), [r is not None for r in fold_res], present(biases), [b is not None for b in biases],
            get_rank(first.group) == 0, edges, first.group_name if world > 1 else "", backend)
    outs, row = [], 0
    for ps, gate, res in zip(_split(flat_parts, counts), gates, residuals):
        B, S = ps[0].shape[:2]
        y = out[row:row + B * S].view(B, S, n)
        row += B * S
        if cast is not None:
            y = y if gate is None else y * (gate.unsqueeze(1) if gate.dim() == 2 else gate)
            y = y if res is None else res + y
        outs.append(y)
    return outs
