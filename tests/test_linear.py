"""ColumnParallelLinear / RowParallelLinear against nn.Linear: outputs, input gradients, weight-gradient shards.

float64 on CPU: the only difference from the dense layer is the order of the row layer's partial sums, so the
tolerance is float64's (1e-12 relative).
"""

import pytest
import torch
import torch.distributed as dist
from torch import nn

from tpfuse.tp_layers import ColumnParallelLinear, RowParallelLinear, run_ranks
from tpfuse.tp_layers.numerics import rel_error, tolerance
from tpfuse.tp_layers.sharding import shard_tensor

TOL = tolerance(torch.float64)


def _dense(in_f, out_f, bias, seed):
    torch.manual_seed(seed)
    return nn.Linear(in_f, out_f, bias=bias, dtype=torch.float64)


def _column(in_f, out_f, bias, blocks, gather_output):
    rank, ws = dist.get_rank(), dist.get_world_size()
    dense = _dense(in_f, out_f, bias, 0)
    layer = ColumnParallelLinear.from_dense(dense, blocks=blocks, gather_output=gather_output)
    assert layer.weight.shape == (out_f // ws, in_f)
    x = torch.randn(2, 7, in_f, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    xd, xt = x.clone().requires_grad_(), x.clone().requires_grad_()
    ref = dense(xd)
    g = torch.randn(ref.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    ref.backward(g)
    out = layer(xt)
    if gather_output:
        assert rel_error(out, ref) <= TOL
        out.backward(g)
    else:
        assert rel_error(out, shard_tensor(ref.detach(), -1, rank, ws, blocks)) <= TOL
        out.backward(shard_tensor(g, -1, rank, ws, blocks))
    # Column layers all-reduce the input gradient: every rank gets the full dense gradient.
    assert rel_error(xt.grad, xd.grad) <= TOL
    assert rel_error(layer.weight.grad, shard_tensor(dense.weight.grad, 0, rank, ws, blocks)) <= TOL
    if bias:
        assert rel_error(layer.bias.grad, shard_tensor(dense.bias.grad, 0, rank, ws, blocks)) <= TOL
    return out.detach(), xt.grad


def _row(in_f, out_f, bias, blocks, input_is_parallel):
    rank, ws = dist.get_rank(), dist.get_world_size()
    dense = _dense(in_f, out_f, bias, 0)
    layer = RowParallelLinear.from_dense(dense, blocks=blocks, input_is_parallel=input_is_parallel)
    assert layer.weight.shape == (out_f, in_f // ws)
    x = torch.randn(3, 5, in_f, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    xd = x.clone().requires_grad_()
    ref = dense(xd)
    g = torch.randn(ref.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    ref.backward(g)
    if input_is_parallel:
        xt = shard_tensor(x, -1, rank, ws, blocks).requires_grad_()
        expected_xgrad = shard_tensor(xd.grad, -1, rank, ws, blocks)
    else:
        xt = x.clone().requires_grad_()
        expected_xgrad = xd.grad
    out = layer(xt)
    assert rel_error(out, ref) <= TOL
    out.backward(g)
    assert rel_error(xt.grad, expected_xgrad) <= TOL
    assert rel_error(layer.weight.grad, shard_tensor(dense.weight.grad, 1, rank, ws, blocks)) <= TOL
    if bias:  # added once after the reduce: the full bias gradient on every rank
        assert rel_error(layer.bias.grad, dense.bias.grad) <= TOL
    return out.detach()


COLUMN_CASES = [
    (True, None, False),
    (False, [12, 12, 12, 20, 20], False),  # [Q, K, V, gate, up]
    (True, [12, 12, 12, 20, 20], True),
]
ROW_CASES = [
    (True, None, True),
    (False, [12, 20], True),  # cat(attn, mlp)
    (True, [12, 20], False),
]


def _all_cases():
    """Every column and row case in one set of rank processes (a spawn costs more than the cases)."""
    return ([_column(13, 76, *case) for case in COLUMN_CASES], [_row(32, 11, *case) for case in ROW_CASES])


@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_parallel_linears_match_linear(world_size):
    results = run_ranks(_all_cases, world_size)
    for i, (_bias, _blocks, gather_output) in enumerate(COLUMN_CASES):
        column = [r[0][i] for r in results]
        if gather_output:
            assert all(torch.equal(c[0], column[0][0]) for c in column)
        assert all(torch.equal(c[1], column[0][1]) for c in column)  # input gradient identical on every rank
    for i in range(len(ROW_CASES)):
        outs = [r[1][i] for r in results]
        assert all(torch.equal(o, outs[0]) for o in outs)  # replicated output, bitwise


def test_single_process_layers_are_plain_linears():
    torch.manual_seed(0)
    dense = nn.Linear(6, 10)
    x = torch.randn(4, 6)
    col = ColumnParallelLinear.from_dense(dense)
    row = RowParallelLinear.from_dense(dense)
    assert torch.equal(col(x), dense(x)) and torch.equal(row(x), dense(x))
    assert col.weight.data_ptr() != dense.weight.data_ptr()  # owns its storage


def test_fresh_layers_use_global_fan_in():
    torch.manual_seed(0)
    row = RowParallelLinear(400, 8)
    assert row.weight.abs().max() <= 1 / 400 ** 0.5
    assert row.weight.abs().max() > 0.8 / 400 ** 0.5
    col = ColumnParallelLinear(16, 8, device="meta")
    assert col.weight.is_meta


def test_from_dense_on_meta_keeps_shapes():
    dense = nn.Linear(8, 24, bias=False, device="meta")
    col = ColumnParallelLinear.from_dense(dense, blocks=[8, 16])
    assert col.weight.is_meta and col.weight.shape == (24, 8)


def test_linear_bad_input():
    layer = ColumnParallelLinear(8, 6)
    with pytest.raises(ValueError, match=r"input has shape \(2, 5\), expected last dim 8"):
        layer(torch.zeros(2, 5))
    with pytest.raises(TypeError, match="input has dtype torch.float64 but the weight is torch.float32"):
        layer(torch.zeros(2, 8, dtype=torch.float64))
    with pytest.raises(ValueError, match="input is on meta but the weight is on cpu"):
        layer(torch.zeros(2, 8, device="meta"))
    with pytest.raises(TypeError, match="expects an nn.Linear, got Conv1d"):
        ColumnParallelLinear.from_dense(nn.Conv1d(3, 3, 1))
    with pytest.raises(ValueError, match=r"sum to 7, but the dimension has 6"):
        ColumnParallelLinear.from_dense(nn.Linear(8, 6), blocks=[3, 4])
    with pytest.raises(TypeError, match="1-D DeviceMesh, got str"):
        RowParallelLinear(8, 6, group="world")


def _indivisible():
    ColumnParallelLinear(8, 7)


def _indivisible_blocks():
    RowParallelLinear.from_dense(nn.Linear(10, 4), blocks=[4, 6])


def _bad_dtype_row():
    layer = RowParallelLinear(8, 6)
    layer(torch.zeros(3, 4, dtype=torch.float16))


def test_indivisible_features_raise_on_ranks():
    with pytest.raises(Exception, match="out_features=7 is not divisible by the world size 2"):
        run_ranks(_indivisible, 2)
    with pytest.raises(Exception, match=r"block size\(s\) \[6\] not divisible by the world size 4"):
        run_ranks(_indivisible_blocks, 4)
    with pytest.raises(Exception, match="input has dtype torch.float16 but the weight is torch.float32"):
        run_ranks(_bad_dtype_row, 2)
