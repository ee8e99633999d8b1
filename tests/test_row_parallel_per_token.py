"""Issue 23 (item 4): the gated row-parallel epilogue takes a per-token gate ``[B, S, N]`` (FLUX.3, FLUX.2's
KV-extract mode), or ``[1, S, N]`` shared by the batch, without leaving the fused path.

Kernels run in the interpreter (tests/conftest.py sets ``TRITON_INTERPRET=1`` before triton is imported), fp32
only. Kept to a few seconds: small shapes, one 2-rank spawn.
"""

import os

import pytest
import torch
import torch.distributed as dist
from torch import nn

from tpfuse.kernels import record_backends
from tpfuse.kernels._dispatch import interpreting
from tpfuse.kernels.row_parallel_matmul import (
    _gate_mode,
    gate_layout,
    row_parallel_matmul,
    row_parallel_matmul_forward,
    row_parallel_matmul_reference,
    rpm_config,
)
from tpfuse.tp_layers import RowParallelLinear, comm_stats, run_ranks
from tpfuse.tp_layers.numerics import rel_error, tolerance
from tpfuse.tp_layers.sharding import shard_tensor

KERNEL = pytest.mark.skipif(not (interpreting() or torch.cuda.is_available()),
                            reason="needs TRITON_INTERPRET=1 or a GPU")


def _rand(*shape, seed=0, scale=1.0):
    return scale * torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _assert_within(actual, expected, magnitude, terms, dtype=torch.float32):
    """|actual - expected| <= 2 gamma_n * magnitude elementwise: both sides are sums of at most n = ``terms``
    products in ``dtype``, each within gamma_n = n u / (1 - n u) of the exact value times the sum of the terms'
    absolute values (``magnitude``: the same expression on absolute values)."""
    u = torch.finfo(dtype).eps / 2
    gamma = terms * u / (1 - terms * u)
    bound = 2 * gamma * magnitude.double() * (1 + gamma)  # the magnitude is an fp32 sum too: within gamma_n
    err = (actual.detach().double() - expected.detach().double()).abs()
    worst = (err - bound).max().item()
    assert worst <= 0, f"error beyond 2 gamma_{terms} |terms|: max excess {worst:.3g}, max error {err.max():.3g}"


def _abs(ts):
    return [None if t is None else t.detach().abs().requires_grad_(t.requires_grad) for t in ts]


# ---------------------------------------------------------------------------------------------------------------
# The kernel vs the torch reference (interpreter, fp32, ragged shapes)
# ---------------------------------------------------------------------------------------------------------------

# (B, S, widths, N, gate shape as "BSN" or "1SN", add_residual, TMA, the kernel's GATE mode)
CASES = [
    (2, 7, (40, 70), 50, "BSN", True, False, "token"),  # short rows: one 64-row tile spans both entries
    (2, 130, (64,), 130, "BSN", False, True, "token"),  # S, N not multiples of the 128 x 128 tile; TMA
    (3, 130, (40, 24), 50, "1SN", True, False, "token_bcast"),  # S >= BLOCK_M: one wrap per row
    (3, 7, (64,), 50, "1SN", False, False, "token"),  # S < BLOCK_M: the launch's rows gathered in torch
    (1, 77, (16, 48), 33, "1SN", True, False, "token"),  # B = 1: [1, S, N] is the per-token gate itself
]


@KERNEL
@pytest.mark.parametrize("B,S,widths,N,gate_shape,add_residual,tma,mode", CASES)
def test_per_token_gate_kernel_matches_reference(B, S, widths, N, gate_shape, add_residual, tma, mode,
                                                 monkeypatch):
    from tpfuse.kernels import _tma

    monkeypatch.setattr(_tma, "TMA_DTYPES", (torch.float32,) if tma else ())
    parts = [_rand(B, S, k, seed=i).requires_grad_() for i, k in enumerate(widths)]
    w = _rand(N, sum(widths), seed=7, scale=sum(widths) ** -0.5).requires_grad_()
    gate = _rand(B if gate_shape == "BSN" else 1, S, N, seed=8).requires_grad_()  # [B or 1, S, N]
    res = _rand(B, S, N, seed=9).requires_grad_()
    assert gate_layout(gate.shape, B, S, N) == "token"
    assert _gate_mode(gate, B, S, N, 0, B * S, rpm_config(B * S, N, widths, w.dtype)["BLOCK_M"])[0] == mode
    with record_backends() as ran:
        out = row_parallel_matmul(parts, w, gate, res, add_residual, backend="triton")
    assert ran == [("row_parallel_matmul", "triton")]
    ref = row_parallel_matmul_reference(parts, w, gate, res, add_residual)
    inputs = [*parts, w, gate] + ([res] if add_residual else [])
    mag_inputs = _abs(inputs)
    mag_parts, mag_w, mag_gate = mag_inputs[:len(parts)], mag_inputs[len(parts)], mag_inputs[len(parts) + 1]
    mag = row_parallel_matmul_reference(mag_parts, mag_w, mag_gate, mag_inputs[-1] if add_residual else None,
                                        add_residual)
    k = sum(widths)
    _assert_within(out, ref, mag, k + 2)  # K products, the gate, the residual
    # Backward: the op's gradients vs autograd through the reference; the gate's has the gate's shape (a
    # [1, S, N] gate sums over the batch).
    g = _rand(*out.shape, seed=10)
    got = torch.autograd.grad(out, inputs, g)
    want = torch.autograd.grad(ref, inputs, g)
    mags = torch.autograd.grad(mag, mag_inputs, g.abs())
    assert got[len(parts) + 1].shape == gate.shape
    for a, b, m in zip(got, want, mags):
        _assert_within(a, b, m, max(k, N, B * S) + 2)


@KERNEL
@pytest.mark.parametrize("gate_shape", ["BSN", "1SN"])
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_row_range_chunks_crossing_batch_entries(gate_shape, backend):
    """The overlapped layer's chunks are launches on row ranges of the B*S tokens; chunks that start inside a
    row tile and a batch entry, and that span an entry boundary, read each row's own gate."""
    B, S, N, widths = 3, 130, 50, (40, 24)  # 390 rows: 128-row tiles, S >= BLOCK_M
    parts = [_rand(B, S, k, seed=1 + i) for i, k in enumerate(widths)]
    w, res = _rand(N, sum(widths), seed=3, scale=0.125), _rand(B, S, N, seed=5)
    gate = _rand(B if gate_shape == "BSN" else 1, S, N, seed=4)
    ref = row_parallel_matmul_reference(parts, w, gate, res, True).reshape(B * S, N)
    mag = row_parallel_matmul_reference(_abs(parts), w.abs(), gate.abs(), res.abs(), True).reshape(B * S, N)
    # Entries start at rows 130 and 260, tiles at multiples of 128: (100, 131) crosses a tile and an entry
    # boundary, (131, 259) starts inside a tile and an entry, (259, 261) is two rows across an entry boundary.
    out = torch.full((B * S, N), float("nan"))
    edges = [0, 100, 131, 259, 261, 390]
    for r0, r1 in zip(edges, edges[1:]):
        row_parallel_matmul_forward(parts, w, gate, res, True, out, (r0, r1), backend=backend)
    _assert_within(out, ref, mag, sum(widths) + 2)  # every row written (NaN otherwise), with its own gate


@KERNEL
def test_broadcast_views_read_as_the_smaller_gate():
    """An expanded gate (stride 0) is read as the gate it expands: no [B*S, N] copy to flatten it."""
    B, S, N = 2, 130, 50
    parts, w = [_rand(B, S, 64, seed=1)], _rand(N, 64, seed=2, scale=0.125)
    entry, shared = _rand(B, 1, N, seed=3), _rand(1, S, N, seed=4)
    for gate, mode in ((entry.expand(B, S, N), "pair"), (shared.expand(B, S, N), "token_bcast")):
        assert _gate_mode(gate, B, S, N, 0, B * S, 128)[0] == mode
        out = row_parallel_matmul(parts, w, gate, backend="triton")
        mag = row_parallel_matmul_reference(parts, w.abs(), gate.abs()).abs()
        _assert_within(out, row_parallel_matmul_reference(parts, w, gate), mag, 64 + 1)


def test_autocast_per_token_gate_applied_after_the_gemm():
    """Under autocast the GEMM runs in bf16, the per-token gate multiplies its result in torch with type
    promotion (the fp32 gate keeps an fp32 output), as eager code applies it."""
    B, S, N = 2, 5, 16
    parts, w = [_rand(B, S, 32, seed=1)], _rand(N, 32, seed=2)
    gate, res = _rand(B, S, N, seed=3), _rand(B, S, N, seed=4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = row_parallel_matmul(parts, w, gate, res, True, backend="torch")
        with pytest.raises(ValueError, match=r"per token it must be \[B, S, N\] = \[2, 5, 16\]"):
            row_parallel_matmul(parts, w, _rand(B, S + 1, N), backend="torch")
    y = torch.nn.functional.linear(parts[0].bfloat16(), w.bfloat16())
    assert out.dtype == torch.float32 and torch.equal(out, res + y * gate)


def test_per_token_gate_bad_input():
    p, w = torch.randn(2, 3, 8), torch.randn(5, 8)
    msg = r"gate must be \[B, N\] or \[B, 1, N\] with B=2, N=5, got shape {}; per token it must be \[B, S, N\] = " \
          r"\[2, 3, 5\] \(B may be 1: broadcast over the batch\)"
    for bad in ((2, 4, 5), (3, 3, 5), (2, 3, 4), (1, 2, 3, 5)):
        with pytest.raises(ValueError, match=msg.format(str(bad).replace("(", r"\(").replace(")", r"\)"))):
            row_parallel_matmul([p], w, gate=torch.randn(bad))
    layer = RowParallelLinear(8, 5, bias=False)
    with pytest.raises(ValueError, match=r"RowParallelLinear: gate must be \[B, out\] or \[B, 1, out\] with B=2, "
                                         r"got \(2, 4, 5\); per token it must be \[B, S, out\] = \[2, 3, 5\]"):
        layer.forward_fused([p], gate=torch.randn(2, 4, 5))
    assert [gate_layout(s, 2, 3, 5) for s in ((2, 5), (1, 1, 5), (2, 3, 5), (1, 3, 5), (2, 2, 5))] == [
        "entry", "entry", "token", "token", None]
    assert gate_layout((2, 1, 5), 2, 1, 5) == "entry"  # S = 1: the per-entry and per-token gates are one


# ---------------------------------------------------------------------------------------------------------------
# RowParallelLinear.forward_fused on 2 gloo ranks
# ---------------------------------------------------------------------------------------------------------------


def _layer_per_token():
    rank, ws = dist.get_rank(), dist.get_world_size()
    B, S, K, N = 2, 37, 48, 20  # 74 rows: no chunk count divides them
    x, g = _rand(B, S, K, seed=1), _rand(B, S, N, seed=4)
    outs = []
    for backend in ("triton", "torch"):
        os.environ["TPFUSE_BACKEND"] = backend
        for bias, gate_shape in ((False, (B, S, N)), (True, (1, S, N))):  # folded before the reduce; after it
            torch.manual_seed(0)
            dense = nn.Linear(K, N, bias=bias)
            gate, res = _rand(*gate_shape, seed=2), _rand(B, S, N, seed=3)
            xd, gd, rd = (t.clone().requires_grad_() for t in (x, gate, res))
            ref = rd + gd * dense(xd)
            ref.backward(g)
            layer = RowParallelLinear.from_dense(dense, overlap=3)
            xt = shard_tensor(x, -1, rank, ws).requires_grad_()
            gt, rt = gate.clone().requires_grad_(), res.clone().requires_grad_()
            with record_backends() as ran, comm_stats() as stats:
                out = layer.forward_fused([xt], gt, rt)
            assert ("row_parallel_matmul", backend) in ran, ran
            assert stats.count("all_reduce", "forward") == 3
            out.backward(g)
            tol = tolerance(torch.float32)
            assert rel_error(out, ref) <= tol
            assert rel_error(xt.grad, shard_tensor(xd.grad, -1, rank, ws)) <= tol
            assert rel_error(layer.weight.grad, shard_tensor(dense.weight.grad, 1, rank, ws)) <= tol
            # the gate's gradient: every rank's partial all-reduced ([1, S, N]: summed over the batch too)
            assert gt.grad.shape == gate.shape and rel_error(gt.grad, gd.grad) <= tol
            assert rel_error(rt.grad, rd.grad) <= tol
            outs += [out.detach(), gt.grad]
    os.environ.pop("TPFUSE_BACKEND")
    return outs


@KERNEL
def test_forward_fused_per_token_gate_on_two_ranks():
    """A per-token gate through the overlapped layer (3 chunks) on both backends: folded into the reduce without a
    bias, after it with one; output and gate gradient equal the dense block and are bitwise identical on every
    rank."""
    results = run_ranks(_layer_per_token, 2, timeout=120)
    assert len(results[0]) == 8 and all(torch.equal(a, b) for a, b in zip(results[0], results[1]))
