"""Ranks holding different weights or getting different inputs: a clear error on every rank, never a wrong answer
or an abort inside gloo (issue 13, items 5 and 6)."""

import pytest
import torch
import torch.distributed as dist

from tpfuse.tp_layers import (
    ColumnParallelLinear,
    Flux2Config,
    RowParallelLinear,
    TPDoubleStreamBlock,
    TPSingleStreamBlock,
    run_ranks,
)
from tpfuse.tp_layers.consistency import (
    InputMismatchError,
    WeightMismatchError,
    set_debug_checks,
    tensor_checksum,
)
from tpfuse.tp_layers.verify import block_inputs, random_dense_block

TINY = Flux2Config.preset("tiny")


def _caught(fn, *args, **kwargs):
    """(exception type name, message) or ("ok", result)."""
    try:
        return "ok", fn(*args, **kwargs)
    except (WeightMismatchError, InputMismatchError) as exc:
        return type(exc).__name__, str(exc)


# ---------------------------------------------------------------------------------------------------------------
# The checksum
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64, torch.int8, torch.bool])
@pytest.mark.parametrize("n", [1, 3, 251 * 4 + 7, 5000])
def test_checksum_sees_every_changed_and_moved_element(dtype, n):
    gen = torch.Generator().manual_seed(n)
    t = (torch.randn(n, generator=gen) * 50).to(dtype)
    base = tensor_checksum(t)
    assert torch.equal(tensor_checksum(t.clone()), base)
    for i in sorted({0, n // 2, n - 1}):
        u = t.clone()
        u[i] = (~u[i]) if dtype == torch.bool else u[i] + 1
        assert not torch.equal(tensor_checksum(u), base), (dtype, n, i)
    if n > 1 and not torch.equal(t[0], t[-1]):
        u = t.clone()
        u[0], u[-1] = t[-1], t[0]  # same values, two positions swapped
        assert not torch.equal(tensor_checksum(u), base)


def test_checksum_reads_bits_and_ignores_layout():
    for n in (1, 3, 1000):  # a sign bit (the top bit of a word) flipped anywhere is seen
        for i in range(0, n, max(1, n // 50)):
            z = torch.zeros(n)
            w = z.clone()
            w[i] = -0.0
            assert not torch.equal(tensor_checksum(z), tensor_checksum(w)), (n, i)
    t = torch.randn(6, 10)
    assert torch.equal(tensor_checksum(t.t()), tensor_checksum(t.t().contiguous()))
    assert tensor_checksum(torch.empty(0)).tolist() == [0, 0]
    # Views whose bytes do not start 8-byte aligned or have a non-unit stride: read through a copy, same sums.
    b = torch.randn(17).bfloat16()
    for view in (b[1:], b[3], torch.tensor(0.5).expand(1), torch.randn(4, 5)[0:1, 2], b[1:].view(2, 8)):
        assert torch.equal(tensor_checksum(view), tensor_checksum(view.clone())), view.shape
    c = torch.randn(7, dtype=torch.complex64)
    assert torch.equal(tensor_checksum(c.conj()), tensor_checksum(c.conj().resolve_conj()))


# ---------------------------------------------------------------------------------------------------------------
# Weights: checked before sharding, or broadcast from a rank
# ---------------------------------------------------------------------------------------------------------------


def _models_with_rank_seed():
    from tpfuse.tp_layers import parallelize
    from tpfuse.tp_layers.verify import random_diffusers_model

    out = []
    for broadcast_from, check in ((None, True), (0, True), (None, False)):
        model = random_diffusers_model(TINY, seed=dist.get_rank())  # no shared seed: every rank's weights differ
        out.append(_caught(lambda: parallelize(model, broadcast_from=broadcast_from, check_weights=check) and None))
    return out


def test_ranks_with_different_weights_are_refused_on_every_rank_and_broadcast_fixes_it():
    pytest.importorskip("diffusers")
    for checked, broadcast, unchecked in run_ranks(_models_with_rank_seed, 2):
        kind, msg = checked
        assert kind == "WeightMismatchError"
        assert msg.startswith("Flux2Transformer2DModel: the 2 ranks of the tensor-parallel group hold different "
                              "weights; first: 'time_guidance_embed.timestep_embedder.linear_1.weight': values "
                              "differ (ranks grouped by equal values: [[0], [1]])")
        assert "pass broadcast_from=0" in msg
        assert broadcast == ("ok", None) and unchecked == ("ok", None)  # the remedy; the opt-out


def _blocks_with_rank_seed():
    out = {}
    for kind, cls in (("single", TPSingleStreamBlock), ("double", TPDoubleStreamBlock)):
        block = random_dense_block(TINY, kind, seed=0)
        if dist.get_rank() == 1:
            with torch.no_grad():
                block.attn.norm_k.weight[3] += 1e-6  # one element of a replicated weight
        out[kind] = _caught(cls.from_dense, block)
    return out


def _linears_with_rank_seed():
    torch.manual_seed(0 if dist.get_rank() != 1 else 1)  # ranks 0 and 2 agree, rank 1 differs
    dense = torch.nn.Linear(12, 6)
    out = {"column": _caught(ColumnParallelLinear.from_dense, dense)}
    layer = RowParallelLinear.from_dense(dense, broadcast_from=2)  # rank 2's weights on every rank
    full = [torch.empty_like(layer.weight) for _ in range(dist.get_world_size())]
    dist.all_gather(full, layer.weight.detach().contiguous())
    torch.manual_seed(0)
    out["row_broadcast_exact"] = torch.equal(torch.cat(full, 1), torch.nn.Linear(12, 6).weight.detach())
    return out


def test_blocks_and_layers_check_or_broadcast_before_sharding():
    for res in run_ranks(_blocks_with_rank_seed, 2):
        for kind in ("single", "double"):
            assert res[kind][0] == "WeightMismatchError"
            assert ("first: 'attn.norm_k.weight': values differ (ranks grouped by equal values: [[0], [1]]) (1 of "
                    in res[kind][1])
    for res in run_ranks(_linears_with_rank_seed, 3):
        assert res["column"][0] == "WeightMismatchError"
        assert "first: 'weight': values differ (ranks grouped by equal values: [[0, 2], [1]])" in res["column"][1]
        assert res["row_broadcast_exact"]


# ---------------------------------------------------------------------------------------------------------------
# Inputs: the first call checks shapes on every rank; debug mode every call, values too
# ---------------------------------------------------------------------------------------------------------------


def _block_inputs_per_rank(kind, case):
    rank = dist.get_rank()
    dense = random_dense_block(TINY, kind, seed=0)
    tp = (TPDoubleStreamBlock if kind == "double" else TPSingleStreamBlock).from_dense(dense)
    txt, img, batch = 3, 6, 2
    if case == "seq" and rank == 1:
        img += 1  # another sequence length: gloo used to abort (SIGABRT)
    if case == "split" and rank == 1:
        img, batch = img * 2, 1  # the same numel, another batch split: used to be a silent wrong answer
    tensors, rope = block_inputs(TINY, kind, batch, txt, img, seed=1)
    if case == "values":
        tensors["hidden_states"] = tensors["hidden_states"] + rank  # same shapes, other values
    with torch.no_grad():
        first = _caught(tp, **tensors, image_rotary_emb=rope)
        if case != "values":
            return first[0], first[1] if first[0] != "ok" else None
        set_debug_checks(True)  # the first call passed (shapes agree); debug mode compares values every call
        try:
            return _caught(tp, **tensors, image_rotary_emb=rope)[0], first[0]
        finally:
            set_debug_checks(False)


def _shape_cases():
    return {(kind, case): _block_inputs_per_rank(kind, case) for kind in ("single", "double")
            for case in ("seq", "split")}


def test_different_input_shapes_are_an_error_on_every_rank():
    expect = {"seq": "hidden_states: rank 0 [2, 6, 64] float32, rank 1 [2, 7, 64] float32",
              "split": "hidden_states: rank 0 [2, 6, 64] float32, rank 1 [1, 12, 64] float32"}
    for results in run_ranks(_shape_cases, 2, timeout=120):
        for (kind, case), (name, msg) in results.items():
            assert name == "InputMismatchError", (kind, case)
            assert msg.startswith(f"{'TPDoubleStreamBlock' if kind == 'double' else 'TPSingleStreamBlock'}: the "
                                  "2 ranks of the tensor-parallel group got different inputs at the first call: ")
            assert expect[case] in msg and "tensor parallelism shards the weights, not the data" in msg


def test_debug_mode_compares_values():
    assert run_ranks(_block_inputs_per_rank, 2, "single", "values", timeout=120) == [("InputMismatchError", "ok")] * 2


def _layers_first_call():
    rank = dist.get_rank()
    torch.manual_seed(0)
    col = ColumnParallelLinear.from_dense(torch.nn.Linear(8, 6))
    row = RowParallelLinear.from_dense(torch.nn.Linear(10, 4), blocks=[4, 6])
    x = torch.randn(2, 5, 8)
    set_debug_checks(True)
    try:  # a parallel input is each rank's own slice: its values differ by design, no false alarm
        ok = row(torch.randn(3, row.in_features, generator=torch.Generator().manual_seed(rank)))
    finally:
        set_debug_checks(False)
    col_err = _caught(col, torch.randn(2, 5 + rank, 8))
    again = col(x)  # a failed check is repeated at the next call; this one agrees
    return ok.shape, col_err[0], "x: rank 0 [2, 5, 8] float32, rank 1 [2, 6, 8] float32" in col_err[1], again.shape


def test_layers_check_their_first_call():
    for row_shape, err, named, again in run_ranks(_layers_first_call, 2, timeout=120):
        assert row_shape == (3, 4) and err == "InputMismatchError" and named and again == (2, 5, 3)


def _model_inputs_per_rank():
    from tpfuse.tp_layers import parallelize
    from tpfuse.tp_layers.verify import position_ids, random_diffusers_model

    model = parallelize(random_diffusers_model(TINY, seed=0))
    img = 5 + dist.get_rank()
    ids = position_ids(3, img)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        return _caught(model, hidden_states=torch.randn(1, img, TINY.in_channels, generator=g),
                       encoder_hidden_states=torch.randn(1, 3, TINY.joint_attention_dim, generator=g),
                       timestep=torch.tensor([0.5]), img_ids=ids[3:], txt_ids=ids[:3])


def test_parallelized_model_checks_its_first_call():
    pytest.importorskip("diffusers")
    for name, msg in run_ranks(_model_inputs_per_rank, 2, timeout=120):
        assert name == "InputMismatchError" and msg.startswith("Flux2Transformer2DModel: the 2 ranks")
        assert "hidden_states: rank 0 [1, 5, 8] float32, rank 1 [1, 6, 8] float32" in msg
