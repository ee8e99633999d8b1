"""Row-parallel output projection: ``gate * (cat(parts) @ W^T) (+ residual)`` without materializing the cat.

A row-parallel layer's output is a partial sum that is all-reduced. FLUX.2's blocks then do
``residual + gate * out``; because the all-reduce is a sum and ``gate`` multiplies every partial equally, the
epilogue can apply ``gate`` before the reduce and one rank (rank 0) can add ``residual``: the reduced sum is
already ``residual + gate * out`` and the block needs no pass after the reduce. The single-stream ``to_out`` reads
``[attn | mlp]`` from two tensors; the kernel walks K over each part in turn, so the cat is never written.

sm_90 code (``tpfuse compile-report``, klein-4B TP 2, 512+1024 tokens): 4 ``HGMMA.64x128x16`` per K step; one
software pipeline over the K tiles of both parts (a loop per part drained and refilled the cp.async pipeline at
the boundary); the gate read as two ``[BLOCK_N]`` vectors (the tile's batch entry and the next) instead of a
``[BLOCK_M, BLOCK_N]`` gather; 16-byte residual loads and stores. One part with 16-byte aligned bf16/fp16 rows
(the double-stream out-projections; the single-stream one has two) reads A and W through TMA
boxes. Per warp, before -> after:

=============================  =========================  ===========================
per warp                       one part, gate (TMA)       two parts, gate + residual
=============================  =========================  ===========================
main loop, instr. / K step     112 -> 80                  123 -> 115
epilogue                       510 -> 335                 686 -> 502
registers                      102 -> 96                  164 -> 168
=============================  =========================  ===========================

Two parts stay on cp.async: they are two tensors, and a TMA descriptor cannot be chosen per K step without
splitting the loop again.

Per-token gates (FLUX.3 and FLUX.2's KV-extract mode modulate each token: ``[B, S, N]``, or ``[1, S, N]`` shared
by the batch) stay in the epilogue: the gate is read by token row as a ``[BLOCK_M, BLOCK_N]`` tile, like the
residual (8 16-byte loads per thread, no scalar ones). ``[1, S, N]`` with B > 1 wraps the row index into the
sequence: one scalar mod per tile and a compare per row where S >= BLOCK_M (+56 instructions over ``[B, S, N]``;
a mod per row cost +109); shorter sequences gather the launch's gate rows in torch and read them as
``[B, S, N]``. sm_90, bf16, 128x128 tiles, triton 3.9 (3.6: the per-token rows within 9 instructions), epilogue
instructions per warp / registers; no spills, and no 16-bit scalar loads or stores in the per-token rows:

=============================  ==================  ==================  ==================  ==================
gate                           one part (TMA)      + residual          two parts           + residual
=============================  ==================  ==================  ==================  ==================
per entry ``[B, N]``           335 / 96            520 / 166           318 / 120           502 / 168
per token ``[B, S, N]``        399 / 102           574 / 164           384 / 106           559 / 166
per token ``[1, S, N]``, B>1   455 / 104           629 / 164           437 / 126           614 / 166
=============================  ==================  ==================  ==================  ==================

Two more layouts, for the two-stream blocks (sm_90, bf16, 128 x 128 tiles, per warp):

* ``SPLIT_W``: two parts, each read with its own weight (FLUX.3's ``to_out`` + ``ff.linear_out`` summed, no cat of
  the weights): a pointer and stride select per K step, 127 instructions per step against the packed weight's 115
  (the packed ``[attn | mlp]`` weight keeps its column offset).
* ``SEGMENTS=2``: two row segments in one grid, each with its own input, weight, gate, residual and output (a joint
  reduce's chunk across the text/image boundary, :func:`row_parallel_matmul_segments_triton`): the segment is
  picked per program before the K loop, so the TMA main loop is unchanged (80 per K step); epilogue 537 against
  520, 180 registers, 1 CTA per SM as before. One launch fills whole waves where two would each end in a partly
  empty one.

Every backend runs as ONE ``torch.library`` op (``tpfuse::row_parallel_matmul``: fake implementation, registered
autograd), so ``torch.compile(fullgraph=True)`` sees one node. Backward is a torch implementation
(:func:`row_parallel_matmul_backward`, traced into a compiled backward graph), shared with the overlapped
row-parallel layer in :mod:`tpfuse.tp_layers.linear`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
import torch.nn.functional as F

from ._autocast import _like, autocast_dtype, autocast_off
from ._checks import check_int32_addressable, check_tensors
from ._dispatch import select_backend
from ._math import each_needs
from ._tma import tma_ready
from ._triton import tl, triton

__all__ = [
    "MAX_PARTS",
    "gate_layout",
    "row_parallel_matmul",
    "row_parallel_matmul_backward",
    "row_parallel_matmul_forward",
    "row_parallel_matmul_reference",
    "row_parallel_matmul_segments_triton",
    "rpm_config",
]

# The single-stream out-projection has two inputs ([attn | mlp]); every other row-parallel layer has one.
MAX_PARTS = 2


def rpm_config(m: int, n: int, ks: Sequence[int], dtype: torch.dtype) -> dict:
    """Tile configuration (compiled by the compile report). 128x128 output tiles, K in steps of 64: one
    wgmma m64n128 per warpgroup and K step, 32 KB of bf16 operands per stage, 4 stages = 128 KB of shared
    memory. fp32 inputs use 2 stages. ``EVEN_K``: every part's width is a multiple of BLOCK_K (no K masks)."""
    block_m = 128 if m > 64 else 64
    return {"BLOCK_M": block_m, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8,
            "num_warps": 8 if block_m == 128 else 4,
            "num_stages": 4 if dtype in (torch.bfloat16, torch.float16) else 2,
            "EVEN_K": all(k % 64 == 0 for k in ks)}


@triton.jit
def _row_parallel_mm_kernel(
    a0_ptr, a1_ptr, w_ptr, w1_ptr, gate_ptr, res_ptr, out_ptr,
    gate1_ptr, res1_ptr, out1_ptr,
    M, N, K0, K1, S, ROW0, M1, S1, ROW0_1,
    stride_a0m, stride_a1m, stride_wn, stride_w1n, stride_g, stride_rm, stride_om,
    stride_g1, stride_r1m, stride_o1m,
    NUM_PARTS: tl.constexpr, SPLIT_W: tl.constexpr, SEGMENTS: tl.constexpr, GATE: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    EVEN_K: tl.constexpr, USE_TMA: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    pid = tl.program_id(0)
    n_tiles_m = tl.cdiv(M, BLOCK_M)
    if SEGMENTS == 2:
        # Two row segments in one grid (a two-stream block's text and image rows of one chunk, each with its own
        # input, weight, gate, residual and output: one launch fills the GPU's waves where two partial launches
        # each ended in a partly empty wave). A program's segment is picked by its row tile, then every pointer,
        # size and stride below is that segment's (scalar selects, before the K loop).
        tiles_m0 = n_tiles_m
        n_tiles_m = tiles_m0 + tl.cdiv(M1, BLOCK_M)
    n_tiles_n = tl.cdiv(N, BLOCK_N)
    width = GROUP_M * n_tiles_n
    first_m = (pid // width) * GROUP_M
    group_m = min(n_tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % group_m
    pid_n = (pid % width) // group_m
    if SEGMENTS == 2:
        seg1 = pid_m >= tiles_m0
        pid_m = tl.where(seg1, pid_m - tiles_m0, pid_m)
        a0_ptr = tl.where(seg1, a1_ptr, a0_ptr)
        w_ptr = tl.where(seg1, w1_ptr, w_ptr)
        gate_ptr = tl.where(seg1, gate1_ptr, gate_ptr)
        res_ptr = tl.where(seg1, res1_ptr, res_ptr)
        out_ptr = tl.where(seg1, out1_ptr, out_ptr)
        M = tl.where(seg1, M1, M)
        S = tl.where(seg1, S1, S)
        ROW0 = tl.where(seg1, ROW0_1, ROW0)
        stride_a0m = tl.where(seg1, stride_a1m, stride_a0m)
        stride_wn = tl.where(seg1, stride_w1n, stride_wn)
        stride_g = tl.where(seg1, stride_g1, stride_g)
        stride_rm = tl.where(seg1, stride_r1m, stride_rm)
        stride_om = tl.where(seg1, stride_o1m, stride_om)

    # int32 offsets: the launcher checks every operand has < 2^31 elements (int64 pointer tiles cost registers).
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_mask = offs_m < M
    n_mask = offs_n < N
    # ONE software pipeline over the K tiles of every part: part 0's tiles, then part 1's, without draining the
    # pipeline in between (a loop per part refilled it from empty at the boundary). Each iteration picks its
    # part with scalar selects; a part's last tile is masked at its own width.
    tiles0 = tl.cdiv(K0, BLOCK_K)
    n_k_tiles = tiles0 + tl.cdiv(K1, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if USE_TMA:  # one part, 16-byte aligned rows: TMA boxes, zero-filled past M, N and K
        a_desc = tl.make_tensor_descriptor(a0_ptr, shape=[M, K0], strides=[stride_a0m, 1],
                                           block_shape=[BLOCK_M, BLOCK_K])
        w_desc = tl.make_tensor_descriptor(w_ptr, shape=[N, K0], strides=[stride_wn, 1],
                                           block_shape=[BLOCK_N, BLOCK_K])
        for kk in range(0, n_k_tiles):
            a = a_desc.load([pid_m * BLOCK_M, kk * BLOCK_K])
            b = w_desc.load([pid_n * BLOCK_N, kk * BLOCK_K])
            acc = tl.dot(a, b.T, acc, input_precision=INPUT_PRECISION)
    else:
        for kk in range(0, n_k_tiles):
            if NUM_PARTS == 2:
                in0 = kk < tiles0
                k_local = tl.where(in0, kk, kk - tiles0) * BLOCK_K  # first column of the tile inside its part
                a_base = tl.where(in0, a0_ptr, a1_ptr)
                stride_am = tl.where(in0, stride_a0m, stride_a1m)
                k_part = tl.where(in0, K0, K1)
                if SPLIT_W:
                    # Each part its own weight (FLUX.3 sums to_out and ff.linear_out): a pointer and stride select
                    # per K step (12 more instructions per step than the packed weight's column offset).
                    w_base = tl.where(in0, w_ptr, w1_ptr)
                    stride_w = tl.where(in0, stride_wn, stride_w1n)
                    w_col = k_local
                else:  # one packed [attn | mlp] weight: part 1 starts K0 columns in
                    w_base = w_ptr
                    stride_w = stride_wn
                    w_col = tl.where(in0, 0, K0) + k_local
            else:
                k_local = kk * BLOCK_K
                a_base = a0_ptr
                stride_am = stride_a0m
                k_part = K0
                w_base = w_ptr
                stride_w = stride_wn
                w_col = k_local
            a_ptrs = a_base + offs_m[:, None] * stride_am + (k_local + offs_k)[None, :]  # [BM, BK]
            b_ptrs = w_base + offs_n[None, :] * stride_w + (w_col + offs_k)[:, None]  # [BK, BN], W^T view
            if EVEN_K:
                a = tl.load(a_ptrs, mask=m_mask[:, None], other=0.0)
                b = tl.load(b_ptrs, mask=n_mask[None, :], other=0.0)
            else:
                k_mask = offs_k < k_part - k_local
                a = tl.load(a_ptrs, mask=m_mask[:, None] & k_mask[None, :], other=0.0)
                b = tl.load(b_ptrs, mask=k_mask[:, None] & n_mask[None, :], other=0.0)
            acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)

    mask = m_mask[:, None] & n_mask[None, :]
    # GATE: which gate row multiplies each output row (the launcher's _gate_mode). stride_g is the gate's batch
    # stride for the per-entry modes (0 for a [1, N] gate) and its token-row stride for the per-token ones.
    if GATE == "pair":
        # A [BLOCK_N] gate vector per batch entry, broadcast over rows. The launcher picks this when S >= BLOCK_M,
        # so a tile's rows span at most two batch entries: the first row's and the next one.
        row0 = ROW0 + pid_m * BLOCK_M  # the tile's first row among all B*S tokens
        b0 = row0 // S
        b1 = tl.minimum(b0 + 1, (ROW0 + M - 1) // S)
        # Both vectors as one [BLOCK_N, 2] tile, split in registers: one load per thread (8 warps, 256 values;
        # two [BLOCK_N] loads in the accumulator's column layout compiled to 32 scalar 32-bit loads).
        entry = tl.where(tl.arange(0, 2) == 0, b0, b1)
        g = tl.load(gate_ptr + entry[None, :] * stride_g + offs_n[:, None], mask=n_mask[:, None], other=0.0)
        g0, g1 = tl.split(g.to(tl.float32))
        in_b0 = (offs_m < (b0 + 1) * S - ROW0)[:, None]  # rows before the next entry's first token
        acc *= tl.where(in_b0, g0[None, :], g1[None, :])
    elif GATE == "entry":
        b_idx = (ROW0 + offs_m) // S  # short sequences: any number of entries per tile
        acc *= tl.load(gate_ptr + b_idx[:, None] * stride_g + offs_n[None, :], mask=mask, other=0.0).to(tl.float32)
    elif GATE == "token":
        # Per-token gate [B, S, N] as rows [B*S, N], based at the launch's first row (as the residual): the row's
        # own gate, a [BLOCK_M, BLOCK_N] tile read like the residual (16-byte loads where the row stride allows).
        acc *= tl.load(gate_ptr + offs_m[:, None] * stride_g + offs_n[None, :], mask=mask, other=0.0).to(tl.float32)
    elif GATE == "token_bcast":
        # Per-token gate [1, S, N] shared by every batch entry: row (global token index) mod S. With S >= BLOCK_M
        # a tile spans at most two entries: one scalar mod per tile and a wrap per row (a mod per row: +109).
        s_idx = (ROW0 + pid_m * BLOCK_M) % S + tl.arange(0, BLOCK_M)
        s_idx = tl.where(s_idx >= S, s_idx - S, s_idx)
        acc *= tl.load(gate_ptr + s_idx[:, None] * stride_g + offs_n[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        acc += tl.load(res_ptr + offs_m[:, None] * stride_rm + offs_n[None, :], mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :], acc.to(out_ptr.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------------------------------------------
# Reference
# --------------------------------------------------------------------------------------------------------------


def row_parallel_matmul_reference(parts: Sequence[torch.Tensor], weight: torch.Tensor,
                                  gate: torch.Tensor | None = None, residual: torch.Tensor | None = None,
                                  add_residual: bool = False) -> torch.Tensor:
    """Plain torch: ``gate * (cat(parts, -1) @ W^T) (+ residual if add_residual)``, in the parts' dtype."""
    out = F.linear(torch.cat(list(parts), dim=-1), weight)  # [B, S, N]
    if gate is not None:
        out = out * (gate.unsqueeze(1) if gate.dim() == 2 else gate)
    if add_residual:
        out = out + residual
    return out


# --------------------------------------------------------------------------------------------------------------
# Launcher
# --------------------------------------------------------------------------------------------------------------


def gate_layout(shape: Sequence[int], B: int, S: int, N: int) -> str | None:
    """How a gate of ``shape`` multiplies ``[B, S, N]`` outputs: ``"entry"``, one row per batch entry (``[B, N]``
    or ``[B, 1, N]``), or ``"token"``, one row per token (``[B, S, N]``); a leading 1 for B broadcasts over the
    batch. ``None`` when it fits neither. ``[B, 1, N]`` with S = 1 is an entry gate (the two mean the same)."""
    shape = tuple(shape)
    if len(shape) not in (2, 3) or shape[0] not in (1, B) or shape[-1] != N:
        return None
    if len(shape) == 2 or shape[1] == 1:
        return "entry"
    return "token" if shape[1] == S else None


def _check_gate(gate, B: int, S: int, N: int) -> str:
    """``gate_layout`` of a gate, or a ValueError naming the shapes it may have."""
    if not isinstance(gate, torch.Tensor):
        raise TypeError(f"row_parallel_matmul: gate must be a torch.Tensor, got {type(gate).__name__}")
    layout = gate_layout(gate.shape, B, S, N)
    if layout is None:
        raise ValueError(f"row_parallel_matmul: gate must be [B, N] or [B, 1, N] with B={B}, N={N}, got shape "
                         f"{tuple(gate.shape)}; per token it must be [B, S, N] = [{B}, {S}, {N}] (B may be 1: "
                         "broadcast over the batch)")
    return layout


def _validate(parts, weight, gate, residual, add_residual):
    if isinstance(parts, torch.Tensor):
        raise TypeError("row_parallel_matmul: parts must be a list of tensors, got a single tensor")
    if not isinstance(parts, Iterable) or isinstance(parts, str):
        raise TypeError(f"row_parallel_matmul: parts must be a list of tensors, got {type(parts).__name__}")
    parts = list(parts)
    if not 1 <= len(parts) <= MAX_PARTS:
        raise ValueError(f"row_parallel_matmul: 1 to {MAX_PARTS} parts are supported, got {len(parts)}")
    if not isinstance(add_residual, bool):
        raise TypeError(f"row_parallel_matmul: add_residual must be a bool, got {add_residual!r}")
    named = {f"parts[{i}]": p for i, p in enumerate(parts)} | {"weight": weight}
    if gate is not None:
        named["gate"] = gate
    if add_residual and residual is None:
        raise ValueError("row_parallel_matmul: add_residual=True needs a residual")
    if residual is not None:
        # Checked also where it is not added (the ranks but one of a row-parallel layer): the same call must not
        # pass on one rank and fail on another.
        named["residual"] = residual
    ref = parts[0]
    if not isinstance(ref, torch.Tensor):
        raise TypeError(f"row_parallel_matmul: parts[0] must be a torch.Tensor, got {type(ref).__name__}")
    check_tensors("row_parallel_matmul", named, ref.device, "parts[0]")
    for name, t in named.items():
        if t.dtype != ref.dtype:
            raise TypeError(f"row_parallel_matmul: {name} has dtype {t.dtype}, parts[0] has {ref.dtype}")
    if ref.dim() != 3:
        raise ValueError(f"row_parallel_matmul: parts must be [B, S, K_i], got shape {tuple(ref.shape)}")
    for i, p in enumerate(parts):
        if p.shape[:2] != ref.shape[:2] or p.dim() != 3:
            raise ValueError(f"row_parallel_matmul: parts[{i}] has shape {tuple(p.shape)}, expected "
                             f"[{ref.shape[0]}, {ref.shape[1]}, K_{i}]")
    widths = [p.shape[-1] for p in parts]
    if weight.dim() != 2 or weight.shape[1] != sum(widths):
        raise ValueError(f"row_parallel_matmul: part widths {widths} sum to {sum(widths)}, but the weight has "
                         f"shape {tuple(weight.shape)} (input width {weight.shape[-1] if weight.dim() else '?'})")
    B, S, N = ref.shape[0], ref.shape[1], weight.shape[0]
    if gate is not None:
        _check_gate(gate, B, S, N)
    if residual is not None and residual.shape != (B, S, N):
        raise ValueError(f"row_parallel_matmul: residual must be [{B}, {S}, {N}], got shape {tuple(residual.shape)}")
    return parts


def _rows(t: torch.Tensor) -> torch.Tensor:
    """[B, S, K] -> [B*S, K] with a contiguous last dim (a view when possible). The row count is explicit: ``-1``
    is ambiguous for K = 0."""
    t2 = t.reshape(t.shape[0] * t.shape[1], t.shape[-1])
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def _gate_mode(gate, B: int, S: int, N: int, r0: int, r1: int, block_m: int):
    """(the kernel's GATE mode, the gate as it is passed, its row stride) for the launch on rows r0..r1.

    * ``"entry"``: ``[B or 1, N]``, each row gathers its batch entry's gate (sequences shorter than a row tile);
    * ``"pair"``: the same gate where S >= BLOCK_M: a tile spans at most two entries, two ``[BLOCK_N]`` vectors;
    * ``"token"``: ``[B, S, N]`` as rows ``[B*S, N]`` sliced at r0, a ``[BLOCK_M, BLOCK_N]`` tile (as the
      residual);
    * ``"token_bcast"``: ``[1, S, N]`` with B > 1 and S >= BLOCK_M, row ``(r0 + m) mod S`` of ``[S, N]`` (a tile
      spans at most two entries: one wrap per row); for shorter sequences the launch's rows are gathered in torch
      and read as ``"token"``.
    """
    if gate is None:
        return "none", None, 0
    if gate_layout(gate.shape, B, S, N) == "token":
        # A broadcast view (expand) of a smaller gate reads as that gate: no [B*S, N] copy to flatten it.
        if gate.stride(1) == 0:
            gate = gate[:, :1]
        elif B > 1 and gate.stride(0) == 0:
            gate = gate[:1]
    if gate_layout(gate.shape, B, S, N) == "token":
        if gate.shape[0] == B:
            g = _rows(gate)[r0:r1]  # [rows, N]
            return "token", g, g.stride(0)
        if S < block_m:  # a tile spans 3+ entries: this launch's rows gathered (fewer than B * 128 of them)
            g = gate[0][torch.arange(r0, r1, device=gate.device) % S]  # [rows, N]
            return "token", g, g.stride(0)
        g = gate[0] if gate.stride(-1) == 1 else gate[0].contiguous()  # [S, N]
        return "token_bcast", g, g.stride(0)
    g = gate.reshape(gate.shape[0], N)  # [B or 1, N]
    if g.stride(-1) != 1:
        g = g.contiguous()
    return ("pair" if S >= block_m else "entry"), g, g.stride(0) if g.shape[0] > 1 else 0


def split_weights(parts, weight) -> list[torch.Tensor]:
    """One ``[N, K_i]`` weight per part: ``weight`` as given when it is a sequence (one per part, summed: FLUX.3's
    ``to_out`` + ``ff.linear_out``), else column views of the packed ``[N, sum K_i]`` tensor."""
    if isinstance(weight, torch.Tensor):
        return list(weight.split([p.shape[-1] for p in parts], dim=1)) if len(parts) > 1 else [weight]
    return list(weight)


def _cat_linear(parts, weight) -> torch.Tensor:
    """``cat(parts) @ W^T`` for a packed weight, ``sum_i parts_i @ W_i^T`` for per-part weights."""
    if isinstance(weight, torch.Tensor):
        return F.linear(torch.cat(list(parts), dim=-1), weight)
    return sum(F.linear(p, w) for p, w in zip(parts, weight))


def _segment(parts, weight, gate, residual, add_residual, out, row_range):
    """The kernel arguments of one row segment (rows ``row_range`` of ``parts``' flattened tokens, written into
    ``out``): ``(out, args or None)``, ``None`` where there is nothing to write."""
    B, S = parts[0].shape[:2]
    weight_arg = weight
    if isinstance(weight, torch.Tensor) and weight.stride(-1) != 1:
        weight_arg = weight = weight.contiguous()
    ws = [w if w.stride(-1) == 1 else w.contiguous() for w in split_weights(parts, weight)]
    weight = ws[0]
    M_total, N = B * S, weight.shape[0]
    r0, r1 = row_range if row_range is not None else (0, M_total)
    a = [_rows(p)[r0:r1] for p in parts]
    res = _rows(residual)[r0:r1] if add_residual else None
    if out is None:
        out = torch.empty((M_total, N), device=weight.device, dtype=weight.dtype)
    out_rows = out[r0:r1]
    # The tile shape follows the whole row count, not the chunk's: every chunk of an overlapped layer then runs the
    # same code per row as the one-chunk launch, so chunking is bitwise invisible (also in the interpreter, whose
    # numpy matmul is not row-invariant across tile heights).
    cfg = rpm_config(M_total, N, [p.shape[-1] for p in parts], weight.dtype)
    mode, g, stride_g = _gate_mode(gate, B, S, N, r0, r1, cfg["BLOCK_M"])
    check_int32_addressable("row_parallel_matmul", {**{f"parts[{i}]": p for i, p in enumerate(a)},
                                                     "weight": weight, "weight1": ws[-1], "gate": g, "residual": res,
                                                     "out": out})
    if r1 == r0 or N == 0:  # nothing to write (a grid of 0 programs)
        return out, None
    return out, {"a": a, "ws": ws, "split": not isinstance(weight_arg, torch.Tensor), "g": g, "stride_g": stride_g, "mode": mode, "res": res, "out": out_rows,
                 "M": r1 - r0, "N": N, "S": S, "r0": r0, "ks": [p.shape[-1] for p in parts], "cfg": cfg,
                 "tma": len(parts) == 1 and tma_ready(a[0], weight)}


def _launch(segs: list[dict]) -> None:
    """One launch of the kernel over one segment, or two compatible ones (see :func:`_pairable`)."""
    s0, s1 = segs[0], segs[-1]
    cfg, weight = s0["cfg"], s0["ws"][0]
    grid = (sum(triton.cdiv(s["M"], cfg["BLOCK_M"]) for s in segs) * triton.cdiv(s0["N"], cfg["BLOCK_N"]),)
    two = len(segs) == 2
    a1, w1 = (s1["a"][0], s1["ws"][0]) if two else (s0["a"][-1], s0["ws"][-1])

    def ptr(s, key, fallback):
        return s[key] if s[key] is not None else fallback

    _row_parallel_mm_kernel[grid](
        s0["a"][0], a1, weight, w1, ptr(s0, "g", weight), ptr(s0, "res", s0["out"]), s0["out"],
        ptr(s1, "g", weight), ptr(s1, "res", s1["out"]), s1["out"],
        s0["M"], s0["N"], s0["ks"][0], s0["ks"][1] if len(s0["ks"]) > 1 else 0, s0["S"], s0["r0"],
        s1["M"], s1["S"], s1["r0"],
        s0["a"][0].stride(0), a1.stride(0), weight.stride(0), w1.stride(0), s0["stride_g"],
        s0["res"].stride(0) if s0["res"] is not None else 0, s0["out"].stride(0),
        s1["stride_g"], s1["res"].stride(0) if s1["res"] is not None else 0, s1["out"].stride(0),
        NUM_PARTS=len(s0["a"]), SPLIT_W=len(s0["a"]) > 1 and s0["split"], SEGMENTS=len(segs), GATE=s0["mode"], HAS_RESIDUAL=s0["res"] is not None,
        BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"], GROUP_M=cfg["GROUP_M"],
        EVEN_K=cfg["EVEN_K"], USE_TMA=s0["tma"], INPUT_PRECISION="ieee" if weight.dtype == torch.float32 else "tf32",
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )


def _pairable(s0: dict, s1: dict) -> bool:
    """Two segments one launch can run: one part each of the same width, the same output width, dtype, tile
    configuration, gate mode, residual presence and main loop (TMA or not)."""
    return (len(s0["a"]) == len(s1["a"]) == 1 and s0["ks"] == s1["ks"] and s0["N"] == s1["N"]
            and s0["cfg"] == s1["cfg"] and s0["mode"] == s1["mode"] and s0["tma"] == s1["tma"]
            and (s0["res"] is None) == (s1["res"] is None) and s0["ws"][0].dtype == s1["ws"][0].dtype)


def row_parallel_matmul_triton(parts, weight, gate=None, residual=None, add_residual=False, out=None,
                               row_range: tuple[int, int] | None = None) -> torch.Tensor:
    """The kernel on rows ``row_range`` of the flattened ``[B*S]`` tokens, written into ``out`` (``[B*S, N]``)
    when given: the chunked overlap computes each chunk straight into its slice of one output buffer. ``weight``:
    the packed ``[N, sum K_i]`` tensor or one ``[N, K_i]`` tensor per part."""
    out, seg = _segment(parts, weight, gate, residual, add_residual, out, row_range)
    if seg is not None:
        _launch([seg])
    return out


def row_parallel_matmul_segments_triton(segments) -> None:
    """:func:`row_parallel_matmul_triton` for several ``(parts, weight, gate, residual, add_residual, out,
    row_range)`` segments (each ``out`` given): two compatible segments in ONE launch (a joint reduce's chunk that
    spans a stream boundary), any others one launch each."""
    segs = [seg for _, seg in (_segment(*args) for args in segments) if seg is not None]
    if len(segs) == 2 and _pairable(*segs):
        _launch(segs)
        return
    for seg in segs:
        _launch([seg])


def row_parallel_matmul_forward(parts, weight, gate=None, residual=None, add_residual=False, out=None,
                                row_range: tuple[int, int] | None = None, backend: str = "torch") -> torch.Tensor:
    """No-autograd forward on rows ``row_range`` of the flattened tokens into ``out`` (``[B*S, N]``), on the
    given backend: the building block of the chunked, overlapped row-parallel layer."""
    if backend == "triton":
        return row_parallel_matmul_triton(parts, weight, gate, residual, add_residual, out, row_range)
    B, S = parts[0].shape[:2]
    w0 = split_weights(parts, weight)[0]
    N = w0.shape[0]
    r0, r1 = row_range if row_range is not None else (0, B * S)
    if out is None:
        out = torch.empty((B * S, N), device=w0.device, dtype=w0.dtype)
    y = _cat_linear([_rows(p)[r0:r1] for p in parts], weight)  # [rows, N]
    if gate is not None:
        rows = torch.arange(r0, r1, device=gate.device)  # global token indices among B*S
        if gate_layout(gate.shape, B, S, N) == "token":  # [B, S, N]: each row's own gate; [1, S, N]: row mod S
            g = _rows(gate)[r0:r1] if gate.shape[0] == B else gate[0][rows % S]
        else:
            g = gate.reshape(gate.shape[0], N)
            g = g[rows // S] if g.shape[0] > 1 else g
        y = y * g
    if add_residual:
        y = y + _rows(residual)[r0:r1]
    out[r0:r1] = y
    return out


def row_parallel_matmul_backward(grad: torch.Tensor, parts, weight, gate, needs: Sequence[bool]):
    """Local gradients of ``gate * (cat(parts) @ W^T) + residual`` for ``grad`` ``[B, S, N]``:
    ``(dparts..., dweight, dgate, dresidual)``, ``None`` where ``needs`` is False. ``dgate`` has the gate's
    shape: summed over S for an entry gate, per token as it is for a ``[B, S, N]`` one, summed over B for a gate
    broadcast over the batch.

    ``dgate`` recomputes the (local) product rather than keeping it from the forward: one GEMM in exchange for
    no saved ``[B, S, N]`` activation. For a row-parallel shard it is this rank's partial sum (the caller
    all-reduces it).
    """
    n_parts = len(parts)
    need_parts, need_w, need_gate, need_res = needs[:n_parts], needs[n_parts], needs[n_parts + 1], needs[n_parts + 2]
    scaled = grad
    if gate is not None:
        scaled = grad * (gate.unsqueeze(1) if gate.dim() == 2 else gate)  # [B, S, N]
    widths = [p.shape[-1] for p in parts]
    packed = isinstance(weight, torch.Tensor)
    dparts = [None] * n_parts
    if any(need_parts):
        if packed:
            dparts = list((scaled @ weight).split(widths, dim=-1))  # [B, S, K_i] each
        else:
            dparts = [scaled @ w if need else None for w, need in zip(weight, need_parts)]
        dparts = [d if need else None for d, need in zip(dparts, need_parts)]
    dweight = None
    if need_w:  # packed: [N, sum K_i]; per-part weights: a list of [N, K_i]
        g2 = _rows(scaled)
        dweight = [g2.T @ _rows(p) for p in parts]
        dweight = torch.cat(dweight, dim=1) if packed else dweight
    dgate = None
    if need_gate:
        local = _cat_linear(parts, weight)  # [B, S, N]
        dgate = grad * local  # [B, S, N]: a per-token gate's gradient as it is
        if gate_layout(gate.shape, *local.shape) == "entry":
            dgate = dgate.sum(dim=1, keepdim=gate.dim() == 3)  # [B, N] or [B, 1, N]
        if gate.shape[0] == 1 and dgate.shape[0] > 1:
            dgate = dgate.sum(dim=0, keepdim=True)  # a gate broadcast over the batch
    return (*dparts, dweight, dgate, grad if need_res else None)


@torch.library.custom_op("tpfuse::row_parallel_matmul", mutates_args=())
def _row_parallel_matmul_op(parts: list[torch.Tensor], weight: torch.Tensor, gate: torch.Tensor | None,
                            residual: torch.Tensor | None, add_residual: bool, backend: str) -> torch.Tensor:
    """Contiguous ``[B, S, N]`` on every backend (``backend``: "torch" or "triton", chosen by the launcher)."""
    if backend == "torch":
        return row_parallel_matmul_reference(parts, weight, gate, residual, add_residual).contiguous()
    B, S = parts[0].shape[:2]
    return row_parallel_matmul_triton(parts, weight, gate, residual, add_residual).view(B, S, weight.shape[0])


@_row_parallel_matmul_op.register_fake
def _(parts, weight, gate, residual, add_residual, backend):
    return weight.new_empty((*parts[0].shape[:2], weight.shape[0]))


def _rpm_setup(ctx, inputs, output):
    parts, weight, gate, _residual, _add, _backend = inputs
    ctx.save_for_backward(weight, gate, *parts)


def _rpm_backward(ctx, grad):
    weight, gate, *parts = ctx.saved_tensors
    need_parts, need_w, need_gate, need_res = ctx.needs_input_grad[:4]
    need_parts = each_needs(need_parts, len(parts))
    *dparts, dweight, dgate, dres = row_parallel_matmul_backward(grad, parts, weight, gate,
                                                                 [*need_parts, need_w, need_gate, need_res])
    return dparts, dweight, dgate, dres, None, None


_row_parallel_matmul_op.register_autograd(_rpm_backward, setup_context=_rpm_setup)


def row_parallel_matmul(parts: Sequence[torch.Tensor], weight: torch.Tensor, gate: torch.Tensor | None = None,
                        residual: torch.Tensor | None = None, add_residual: bool = False,
                        backend: str | None = None) -> torch.Tensor:
    """``gate * (cat(parts) @ weight^T) (+ residual)`` with no materialized cat: the local (pre-all-reduce)
    product of a row-parallel layer, residual added on the one rank that passes ``add_residual=True``.

    Args:
        parts: 1 or 2 tensors ``[B, S, K_i]`` whose widths sum to ``weight.shape[1]``.
        weight: ``[N, sum(K_i)]`` (``nn.Linear`` layout; a row-parallel shard).
        gate: ``[B, N]`` or ``[B, 1, N]``, multiplied into every token of a batch entry, or per token
            ``[B, S, N]``; ``B`` may be 1 (broadcast over the batch).
        residual: ``[B, S, N]``, added when ``add_residual``.
        backend: ``"torch"`` or ``"triton"``; default: triton for CUDA tensors, torch on CPU.

    Differentiable on both backends (triton: the kernel forward, a torch backward).
    """
    cast = autocast_dtype(weight.device) if isinstance(weight, torch.Tensor) else None
    if cast is not None and not isinstance(parts, torch.Tensor):
        # Autocast: the GEMM in the autocast dtype; gate and residual then applied in torch with type promotion,
        # as eager code applies them outside the linear (kernels/_autocast.py).
        with autocast_off(weight.device):
            y = row_parallel_matmul([_like(p, dtype=cast) for p in parts], weight.to(cast), backend=backend)
        if gate is not None:
            _check_gate(gate, *y.shape)  # [B, S, N] broadcasting would also take shapes the op refuses
            y = y * (gate.unsqueeze(1) if gate.dim() == 2 else gate)
        return residual + y if add_residual else y
    parts = _validate(parts, weight, gate, residual, add_residual)
    chosen = select_backend("row_parallel_matmul", weight.device, backend)
    return _row_parallel_matmul_op(parts, weight, gate, residual if add_residual else None, add_residual, chosen)
