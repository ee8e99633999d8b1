"""Issue: row-parallel output projection with the all-reduce overlapped (chunked), gate and residual folded into
the reduce, and the column-parallel input-gradient all-reduce overlapped with the weight-gradient GEMMs."""

import pytest
import torch
import torch.distributed as dist
from torch import nn

from tpfuse.kernels import record_backends
from tpfuse.kernels._dispatch import interpreting
from tpfuse.kernels.row_parallel_matmul import (
    row_parallel_matmul,
    row_parallel_matmul_forward,
    row_parallel_matmul_reference,
)
from tpfuse.tp_layers import (
    ColumnParallelLinear,
    RowParallelLinear,
    TPDoubleStreamBlock,
    TPSingleStreamBlock,
    comm_stats,
    run_ranks,
)
from tpfuse.tp_layers.schedule import gemm_waves, wave_schedule
from tpfuse.tp_layers.linear import (
    chunk_bounds,
    column_parallel_linear,
)
from tpfuse.tp_layers.numerics import rel_error, tolerance
from tpfuse.tp_layers.sharding import shard_tensor
from tpfuse.tp_layers.verify import block_inputs, random_dense_block
from tpfuse.tp_layers.flux2.config import Flux2Config

TOL = tolerance(torch.float32)
# Chunk launches are bitwise the one-launch result on a GPU (same tile config, same instruction sequence per row).
# In the interpreter tl.dot is numpy's sgemm, whose result for a row depends on the row's position in the tile
# (seen with numpy 2.4's OpenBLAS: rows 3..12 of a 128x64 @ 64x128 product differ in the last bit from the same
# rows computed at positions 0..9), so there the chunked result is held to fp32 rounding instead.
KERNEL_BITWISE = torch.cuda.is_available()
KERNEL = pytest.mark.skipif(not (interpreting() or torch.cuda.is_available()),
                            reason="needs TRITON_INTERPRET=1 or a GPU")


def _rand(*shape, seed=0, scale=1.0):
    return scale * torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------------------------
# The kernel (interpreter, fp32, ragged shapes)
# ---------------------------------------------------------------------------------------------------------------


@KERNEL
# S >= BLOCK_M (128 here) takes the [BLOCK_N] gate-vector epilogue; (2, 130): a row tile straddles two entries.
@pytest.mark.parametrize("B,S,widths,N", [(2, 7, (40, 70), 50), (1, 77, (64,), 130), (1, 333, (16, 48), 33),
                                          (1, 1, (70,), 128), (2, 130, (40, 70), 50), (3, 128, (64, 128), 130)])
@pytest.mark.parametrize("gate_shape", ["bn", "b1n", "1n", None])
@pytest.mark.parametrize("add_residual", [False, True])
@pytest.mark.parametrize("tma", [False, True])
def test_row_parallel_matmul_kernel(B, S, widths, N, gate_shape, add_residual, tma, monkeypatch):
    from tpfuse.kernels import _tma

    # TMA (bf16 on a GPU) is checked here in fp32: one part with 16-byte aligned rows takes it, the rest cp.async.
    monkeypatch.setattr(_tma, "TMA_DTYPES", (torch.float32,) if tma else ())
    parts = [_rand(B, S, k, seed=i).requires_grad_() for i, k in enumerate(widths)]
    w = _rand(N, sum(widths), seed=7, scale=sum(widths) ** -0.5).requires_grad_()
    assert (len(widths) == 1 and _tma.tma_ready(parts[0].detach().reshape(B * S, -1), w.detach())) == (
        tma and len(widths) == 1 and widths[0] % 4 == 0)
    gate = None
    if gate_shape is not None:
        gate = _rand(*{"bn": (B, N), "b1n": (B, 1, N), "1n": (1, N)}[gate_shape], seed=8).requires_grad_()
    res = _rand(B, S, N, seed=9).requires_grad_()
    with record_backends() as ran:
        out = row_parallel_matmul(parts, w, gate, res, add_residual, backend="triton")
    assert ran == [("row_parallel_matmul", "triton")]
    ref = row_parallel_matmul_reference(parts, w, gate, res, add_residual)
    torch.testing.assert_close(out, ref)
    inputs = [*parts, w] + ([gate] if gate is not None else []) + ([res] if add_residual else [])
    g = _rand(*out.shape, seed=10)
    for a, b in zip(torch.autograd.grad(out, inputs, g), torch.autograd.grad(ref, inputs, g)):
        assert rel_error(a, b) <= TOL


@KERNEL
@pytest.mark.parametrize("backend", ["triton"])  # the torch path multiplies once (see tpfuse::row_parallel_linear)
@pytest.mark.parametrize("S", [37, 130])  # 130: gate vectors, chunks starting inside a row tile and a batch entry
def test_chunked_forward_fills_one_buffer_like_one_launch(backend, S):
    B, N = 2, 50
    parts = [_rand(B, S, 40, seed=1), _rand(B, S, 24, seed=2)]
    w, gate, res = _rand(N, 64, seed=3), _rand(B, N, seed=4), _rand(B, S, N, seed=5)
    whole = row_parallel_matmul_forward(parts, w, gate, res, True, backend=backend)
    for chunks in (2, 3, 5, 37):  # down to 2-row chunks
        out = torch.empty(B * S, N)
        for r0, r1 in chunk_bounds(B * S, chunks):
            row_parallel_matmul_forward(parts, w, gate, res, True, out, (r0, r1), backend=backend)
        if KERNEL_BITWISE:
            assert torch.equal(out, whole)
        else:
            torch.testing.assert_close(out, whole)


def test_kernel_bad_input():
    p, w = torch.randn(1, 3, 8), torch.randn(5, 8)
    with pytest.raises(ValueError, match=r"part widths \[8, 4\] sum to 12, but the weight has shape \(5, 8\)"):
        row_parallel_matmul([p, torch.randn(1, 3, 4)], w)
    with pytest.raises(ValueError, match="1 to 2 parts are supported, got 3"):
        row_parallel_matmul([p, p, p], torch.randn(5, 24))
    with pytest.raises(TypeError, match="parts must be a list of tensors"):
        row_parallel_matmul(p, w)
    with pytest.raises(ValueError, match="add_residual=True needs a residual"):
        row_parallel_matmul([p], w, add_residual=True)
    with pytest.raises(ValueError, match=r"gate must be \[B, N\] or \[B, 1, N\] with B=1, N=5, got shape \(1, 4\)"):
        row_parallel_matmul([p], w, gate=torch.randn(1, 4))
    with pytest.raises(TypeError, match="weight has dtype torch.float64"):
        row_parallel_matmul([p], w.double())


# ---------------------------------------------------------------------------------------------------------------
# Chunk choice (pure)
# ---------------------------------------------------------------------------------------------------------------


def test_chunk_bounds_cover_ragged_rows():
    for rows in (1, 7, 37, 4608):
        for chunks in (1, 2, 3, 5):
            bounds = chunk_bounds(rows, chunks)
            assert bounds[0][0] == 0 and bounds[-1][1] == rows
            assert all(a < b and b == c for (a, b), (c, _) in zip(bounds, bounds[1:] + [(rows, None)]))
            assert len(bounds) == min(rows, chunks)
    assert chunk_bounds(4608, 4, align=128) == [(0, 1152), (1152, 2304), (2304, 3456), (3456, 4608)]
    with pytest.raises(ValueError, match="overlap chunks must be >= 1, got 0"):
        chunk_bounds(10, 0)


def test_wave_schedule_klein_4b_single_stream_out_projection():
    """The issue's worked example: 4,608 tokens x 3,072 features, 128 x 128 tiles, 132 SMs: 7 waves unchunked.
    Equal chunks would take 8 waves and leave 25% of the all-reduce exposed; the schedule takes 7 and 8%."""
    for tp in (2, 4, 8):
        s = wave_schedule(4608, 3072, (3072 + 9216) // tp, tp, 2, 132)
        assert [r // 128 for r in s.rows] == [11, 11, 11, 3] and s.waves == (2, 2, 2, 1)
        assert s.unchunked_waves == 7 and s.extra_waves == 0 and s.edges == [0, 1408, 2816, 4224, 4608]
        assert s.last_share == pytest.approx(3 / 36)
    equal = [gemm_waves(r1 - r0, 3072, 132) for r0, r1 in chunk_bounds(4608, 4, align=128)]
    assert sum(equal) == 8  # what the equal split cost
    # dev at 2048^2 (16,896 tokens x 6,144): exactly 48 waves, no partial one: whole granules of 11 row tiles
    s = wave_schedule(16896, 6144, 6144 * 4 // 8, 8, 2, 132)
    assert [r // 128 for r in s.rows] == [44, 44, 33, 11] and sum(s.waves) == s.unchunked_waves == 48


@pytest.mark.parametrize("sms", [132, 142, 114, 78, 16])
def test_wave_schedule_properties(sms):
    """For many shapes: the chunks cover the rows, boundaries sit on the row tile, the waves add up to the
    unchunked count (at most one more where no split is wave-exact), chunks are front-loaded, and small or
    single-rank messages are not chunked."""
    import random

    rng = random.Random(sms)
    for _ in range(300):
        rows, n = rng.randint(1, 20000), rng.choice([64, 200, 3072, 4096, 6144])
        k, tp = rng.choice([384, 1536, 6144]), rng.choice([1, 2, 4, 8])
        s = wave_schedule(rows, n, k, tp, 2, sms)
        assert sum(s.rows) == rows and min(s.rows) >= 1
        assert all(e % 128 == 0 for e in s.edges[1:-1])
        assert s.unchunked_waves == gemm_waves(rows, n, sms) and 0 <= s.extra_waves <= 1
        assert all(w == gemm_waves(r, n, sms) for r, w in zip(s.rows, s.waves))
        if len(s.rows) > 1:
            assert s.rows[-1] <= min(s.rows[:-1]) and list(s.rows[:-1]) == sorted(s.rows[:-1], reverse=True)
            assert len(s.rows) <= 4 and rows * n * 2 >= 4 * 2**20 and tp > 1
    assert len(wave_schedule(4608, 3072, 6144, 1, 2).rows) == 1  # one rank: nothing to overlap
    assert len(wave_schedule(300, 3072, 6144, 2, 2).rows) == 1  # 1.8 MB: latency-bound, one chunk
    with pytest.raises(ValueError, match="wave_schedule: out_features must be a positive int, got 0"):
        wave_schedule(10, 0, 8, 2, 2)


# ---------------------------------------------------------------------------------------------------------------
# Overlapped row-parallel layer on gloo ranks
# ---------------------------------------------------------------------------------------------------------------


def _row_overlap(chunk_counts, widths, n, tokens):
    rank, ws = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    dense = nn.Linear(sum(widths), n, bias=False)
    x = [_rand(1, tokens, k, seed=i) for i, k in enumerate(widths)]
    gate, res = _rand(1, n, seed=11), _rand(1, tokens, n, seed=12)
    g = _rand(1, tokens, n, seed=13)
    # dense reference: residual + gate * (cat(x) @ W^T)
    xd = [t.clone().requires_grad_() for t in x]
    gd, rd = gate.clone().requires_grad_(), res.clone().requires_grad_()
    ref = rd + gd[:, None] * dense(torch.cat(xd, -1))
    ref.backward(g)
    results = {}
    for chunks in chunk_counts:
        layer = RowParallelLinear.from_dense(dense, blocks=list(widths), overlap=chunks)
        xt = [shard_tensor(t, -1, rank, ws).requires_grad_() for t in x]
        gt, rt = gate.clone().requires_grad_(), res.clone().requires_grad_()
        with comm_stats() as stats:
            out = layer.forward_fused(xt, gt, rt)
        out.backward(g)
        assert layer.last_chunks == chunks
        assert stats.count("all_reduce", "forward") == (chunks if ws > 1 else 0)
        assert rel_error(out, ref) <= TOL
        for t, d in zip(xt, xd):
            assert rel_error(t.grad, shard_tensor(d.grad, -1, rank, ws)) <= TOL
        assert rel_error(layer.weight.grad, shard_tensor(dense.weight.grad, 1, rank, ws, list(widths))) <= TOL
        assert rel_error(gt.grad, gd.grad) <= TOL and rel_error(rt.grad, rd.grad) <= TOL
        results[chunks] = [out.detach(), layer.weight.grad, gt.grad, rt.grad, *[t.grad for t in xt]]
    base = results[chunk_counts[0]]
    # Each rank's own terms: y_0 = gate * p_0 + residual, y_r = gate * p_r. Their sum in any two orders differs by
    # at most 2 (N - 1) u sum_r |y_r| (u: fp32 unit roundoff).
    local = gate[:, None] * nn.functional.linear(torch.cat([shard_tensor(t, -1, rank, ws) for t in x], -1),
                                                 shard_tensor(dense.weight.detach(), 1, rank, ws, list(widths)))
    abs_sum = (local + (res if rank == 0 else 0)).abs()
    dist.all_reduce(abs_sum)
    bound = 2 * (ws - 1) * 2.0**-24 * abs_sum
    for chunks, tensors in results.items():
        # The GEMM chunks are exact and the backward is not chunked: gradients are bitwise the C=1 ones.
        assert all(torch.equal(a, b) for a, b in zip(tensors[1:], base[1:])), f"C={chunks}: gradients differ"
        if ws <= 2:  # a sum of two terms is the same in either order: bitwise the un-chunked output
            assert torch.equal(tensors[0], base[0]), f"C={chunks} differs from C=1"
        else:  # gloo's (like NCCL's) ring all-reduce orders each element's sum by its position in the message
            assert bool(((tensors[0] - base[0]).abs() <= bound).all()), f"C={chunks} beyond the reordering bound"
    return base[0]


@pytest.mark.parametrize("world_size", [2, 4])
@pytest.mark.parametrize("widths", [(24,), (16, 32)])
def test_overlapped_row_parallel_matches_dense_and_unchunked(world_size, widths):
    outs = run_ranks(_row_overlap, world_size, [1, 2, 3, 5], widths, 20, 37)  # 37 tokens: no C divides it
    assert all(torch.equal(o, outs[0]) for o in outs)  # replicated, bitwise, on every rank


def _auto_schedule_vs_one_chunk():
    import tpfuse.tp_layers.linear as linear_mod

    linear_mod.DEFAULT_SM_COUNT = 8  # a small "GPU", so that a CPU-sized layer gets several waves to schedule
    torch.manual_seed(0)
    dense = nn.Linear(1024, 1536, bias=False)  # 4,608 tokens x 1,536 fp32 features: a 28 MB all-reduce
    x = shard_tensor(_rand(1, 4608, 1024, seed=1), -1, dist.get_rank(), dist.get_world_size())
    gate, res = _rand(1, 1536, seed=2), _rand(1, 4608, 1536, seed=3)
    outs = {}
    with torch.no_grad():
        for overlap in ("auto", 1):
            layer = RowParallelLinear.from_dense(dense, overlap=overlap, check_weights=False)
            outs[overlap] = (layer.forward_fused([x], gate, res), layer.last_chunks)
    expected = wave_schedule(4608, 1536, 512, 2, 4, 8)
    return torch.equal(outs["auto"][0], outs[1][0]), outs["auto"][1], len(expected.rows)


def test_auto_overlap_uses_the_wave_schedule_and_stays_exact():
    """overlap="auto" cuts where wave_schedule says (4 chunks here) and is bitwise the one-chunk output on 2
    ranks."""
    for same, used, expected in run_ranks(_auto_schedule_vs_one_chunk, 2, timeout=300):
        assert same and used == expected == 4


def _block_overlap(kind, chunks, backend="torch"):
    import os

    os.environ["TPFUSE_BACKEND"] = backend
    # head_dim 32 for the triton run: the smallest the fused projection kernel takes.
    cfg = Flux2Config.preset("tiny") if backend == "torch" else Flux2Config(
        num_attention_heads=4, attention_head_dim=32, axes_dims_rope=(8, 8, 8, 8), num_layers=1, num_single_layers=1)
    dense = random_dense_block(cfg, kind, seed=0)
    tensors, rope = block_inputs(cfg, kind, 1, 7, 30, seed=1)
    outs = dense(**tensors, image_rotary_emb=rope)
    outs = list(outs) if isinstance(outs, tuple) else [outs]
    torch.autograd.backward(outs, [torch.ones_like(o) for o in outs])
    ref = [o.detach() for o in outs] + [t.grad.clone() for t in tensors.values()]
    results = {}
    for c in (1, chunks):
        tp = (TPDoubleStreamBlock if kind == "double" else TPSingleStreamBlock).from_dense(dense)
        rows = [m for m in tp.modules() if isinstance(m, RowParallelLinear)]
        for m in rows:
            m.overlap = c
        for t in tensors.values():
            t.grad = None
        outs = tp(**tensors, image_rotary_emb=rope)
        outs = list(outs) if isinstance(outs, tuple) else [outs]
        torch.autograd.backward(outs, [torch.ones_like(o) for o in outs])
        assert all(m.last_chunks == c for m in rows)
        results[c] = [o.detach() for o in outs] + [t.grad.clone() for t in tensors.values()]
    # Bitwise on 2 ranks (on more, the all-reduce order depends on the chunk), where the local products are too:
    # the torch path multiplies once; the kernel's chunks are bitwise only on a GPU (see KERNEL_BITWISE).
    if dist.get_world_size() <= 2 and (backend == "torch" or KERNEL_BITWISE):
        assert all(torch.equal(a, b) for a, b in zip(results[chunks], results[1]))
    assert max(rel_error(a, b) for a, b in zip(results[chunks], results[1])) <= TOL
    assert max(rel_error(a, b) for a, b in zip(results[chunks], ref)) <= TOL
    return results[chunks][0]


@pytest.mark.parametrize("kind", ["single", "double"])
@pytest.mark.parametrize("world_size", [2, 4])
def test_blocks_with_overlapped_reduce_match_dense(kind, world_size):
    outs = run_ranks(_block_overlap, world_size, kind, 3)
    assert all(torch.equal(o, outs[0]) for o in outs)


@KERNEL
@pytest.mark.parametrize("kind", ["single", "double"])
def test_blocks_with_overlapped_triton_row_matmul(kind):
    """Each chunk is its own kernel launch on a row range; 2 ranks: bitwise the one-chunk result."""
    outs = run_ranks(_block_overlap, 2, kind, 3, "triton")
    assert torch.equal(outs[0], outs[1])


def _column_async(world_size):
    rank = dist.get_rank()
    torch.manual_seed(0)
    dense = [nn.Linear(12, 8 * world_size) for _ in range(3)]
    layers = [ColumnParallelLinear.from_dense(d) for d in dense]
    x = _rand(2, 5, 12, seed=1)
    xd, xt = x.clone().requires_grad_(), x.clone().requires_grad_()
    g = [_rand(2, 5, 8 * world_size, seed=2 + i) for i in range(3)]
    torch.autograd.backward([d(xd) for d in dense], g)
    with comm_stats() as stats:
        outs = column_parallel_linear(xt, layers)
        torch.autograd.backward(outs, [shard_tensor(t, -1, rank, world_size) for t in g])
    assert stats.count("all_reduce", "backward") == 1  # one input-gradient all-reduce for the three layers
    assert rel_error(xt.grad, xd.grad) <= TOL
    for layer, d in zip(layers, dense):
        assert rel_error(layer.weight.grad, shard_tensor(d.weight.grad, 0, rank, world_size)) <= TOL
        assert rel_error(layer.bias.grad, shard_tensor(d.bias.grad, 0, rank, world_size)) <= TOL
    return xt.grad


@pytest.mark.parametrize("world_size", [2, 4])
def test_column_parallel_async_input_grad(world_size):
    grads = run_ranks(_column_async, world_size, world_size)
    assert all(torch.equal(g, grads[0]) for g in grads)


# ---------------------------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------------------------


def test_overlap_argument_is_validated():
    with pytest.raises(ValueError, match="overlap must be 'auto' or an int >= 1, got 0"):
        RowParallelLinear(8, 4, overlap=0)
    with pytest.raises(ValueError, match="overlap must be 'auto' or an int >= 1, got 'fast'"):
        RowParallelLinear.from_dense(nn.Linear(8, 4), overlap="fast")


def test_forward_fused_bad_input():
    layer = RowParallelLinear(12, 4, bias=False)
    with pytest.raises(ValueError, match=r"input widths \[8, 8\] must sum to the local in_features 12"):
        layer.forward_fused([torch.randn(1, 3, 8), torch.randn(1, 3, 8)])
    with pytest.raises(ValueError, match=r"residual must be \[1, 3, 4\], got \(1, 2, 4\)"):
        layer.forward_fused([torch.randn(1, 3, 12)], residual=torch.randn(1, 2, 4))
    with pytest.raises(ValueError, match=r"gate must be \[B, out\] or \[B, 1, out\] with B=1, got \(3, 4\)"):
        layer.forward_fused([torch.randn(1, 3, 12)], gate=torch.randn(3, 4))


def _wrong_group():
    layer = RowParallelLinear(12, 4, bias=False)  # a shard for 2 ranks
    sub = dist.new_group([dist.get_rank()])  # ... used with a group of 1
    layer.group = sub
    layer.forward_fused([torch.randn(1, 3, 6)])


def test_group_not_matching_the_shard():
    with pytest.raises(Exception, match="weight shard has 6 of 12 input features, which does not match a group of "
                                        "size 1"):
        run_ranks(_wrong_group, 2)


def _shapes_only_tracing():
    """Each layer under a FakeTensorMode (shape propagation, what torch.compile traces with) and on meta, forward
    and backward, on both backends: shapes from the fake implementations, no collective on fake values. The
    skipped cross-rank input check then still runs at the first real call."""
    import os

    from torch._subclasses.fake_tensor import FakeTensorMode

    from tpfuse.tp_layers.consistency import InputMismatchError

    shapes = []
    for backend in ("torch", "triton"):
        os.environ["TPFUSE_BACKEND"] = backend
        for mode in ("fake", "meta"):
            dev = "meta" if mode == "meta" else "cpu"
            with FakeTensorMode() if mode == "fake" else torch.device("meta"):
                row = RowParallelLinear(16, 12, bias=False, device=dev, overlap=2)
                row_dense_in = RowParallelLinear(16, 12, bias=True, device=dev, input_is_parallel=False)
                col = ColumnParallelLinear(16, 16, device=dev, gather_output=True)
                x = torch.randn(2, 3, 16, device=dev, requires_grad=True)
                outs = [row.forward_fused([torch.randn(2, 3, 8, device=dev, requires_grad=True)],
                                          torch.randn(2, 12, device=dev), torch.randn(2, 3, 12, device=dev)),
                        row(torch.randn(2, 3, 8, device=dev)), row_dense_in(x), col(x)]
                sum(o.sum() for o in outs).backward()
                shapes.append([tuple(o.shape) for o in outs] + [tuple(x.grad.shape)])
    os.environ.pop("TPFUSE_BACKEND")
    col = ColumnParallelLinear(16, 16)
    try:
        col(torch.ones(2, 3 + dist.get_rank(), 16))  # first real call: the ranks disagree on the token count
    except InputMismatchError:
        return shapes, True
    return shapes, False


def test_layers_trace_under_fake_tensors_and_meta_on_both_backends():
    for shapes, checked in run_ranks(_shapes_only_tracing, 2, timeout=300):
        assert shapes == [[(2, 3, 12), (2, 3, 12), (2, 3, 12), (2, 3, 16), (2, 3, 16)]] * 4
        assert checked


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_kernel_inputs_are_named_and_empty_widths_work(backend):
    p, w = torch.randn(2, 3, 8), torch.randn(5, 8)
    with pytest.raises(TypeError, match="parts must be a list of tensors, got NoneType"):
        row_parallel_matmul(None, w, backend=backend)
    with pytest.raises(TypeError, match=r"parts\[0\] must be floating point, got torch.int64"):
        row_parallel_matmul([p.long()], w.long(), backend=backend)  # the torch path returned an int64 product
    with pytest.raises(TypeError, match="add_residual must be a bool, got 'yes'"):
        row_parallel_matmul([p], w, residual=torch.randn(2, 3, 5), add_residual="yes", backend=backend)
    # A residual that is not added (every rank but one of a row-parallel layer) is still checked.
    with pytest.raises(ValueError, match=r"residual must be \[2, 3, 5\], got shape \(7,\)"):
        row_parallel_matmul([p], w, residual=torch.randn(7), backend=backend)
    # K = 0 (the product is zero) and N = 0: the triton path failed to flatten them
    out = row_parallel_matmul([torch.randn(2, 3, 0)], torch.randn(5, 0), torch.randn(2, 5), backend=backend)
    assert out.shape == (2, 3, 5) and not out.any()
    assert row_parallel_matmul([p], torch.randn(0, 8), backend=backend).shape == (2, 3, 0)


def test_layer_input_that_is_not_a_tensor_is_named():
    layer = RowParallelLinear(8, 4)
    with pytest.raises(TypeError, match="RowParallelLinear: input 0 must be a torch.Tensor, got NoneType"):
        layer(None)
    with pytest.raises(ValueError, match="RowParallelLinear: input 1 is a 0-dim tensor"):
        layer.forward_fused([torch.randn(2, 4), torch.tensor(1.0)])
    with pytest.raises(TypeError, match="RowParallelLinear: parts must be a tensor or a list of tensors, got NoneType"):
        layer.forward_fused(None)
