"""Ranks holding different weights or getting different inputs: a clear error on every rank, never a wrong answer
or an abort inside gloo (issue 13, items 5 and 6)."""

import re

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
from tpfuse.tp_layers import consistency
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


def _differs(a: torch.Tensor, b: torch.Tensor) -> bool:
    return not torch.equal(tensor_checksum(a), tensor_checksum(b))


def test_checksum_sees_changes_that_cancelled_in_the_old_wrapping_sums():
    # Issue 21 item 8: the old int64 sums mod 2^64 saw a sign bit at the top of a word as +-2^63, and two of them
    # (times any odd weight) cancel.
    torch.manual_seed(0)
    w = torch.randn(48, 64)
    v = w.clone()
    v[2, 5], v[7, 9] = -v[2, 5], -v[7, 9]  # two fp32 sign flips at odd indices: the top bits of two int64 words
    assert _differs(w, v)
    d = torch.randn(6, 10, dtype=torch.float64)
    assert _differs(d, -d)  # a whole fp64 tensor negated: 60 changes of 2^63
    for dtype in (torch.float16, torch.bfloat16):
        b = torch.randn(40, 24).to(dtype)
        two, every4th, pair = b.clone(), b.clone(), b.clone()
        two.view(-1)[[3, 7]] *= -1
        every4th.view(-1)[3::4] *= -1  # 240 sign flips
        pair.view(-1)[[10, 11]] *= -1  # two elements of one old int64 word
        assert _differs(b, two) and _differs(b, every4th) and _differs(b, pair) and _differs(b, -b), dtype
    # Two values swapped far apart (1.0 and 2.0 differ by 2^7 in bf16 bits, 2^8 rows of the old fold apart).
    t = torch.full((4 * 251 * 260,), 0.5).bfloat16()
    i, j = 3, 4 * 251 * 256 + 3
    t[i], t[j] = 1.0, 2.0
    u = t.clone()
    u[i], u[j] = t[j], t[i]
    assert _differs(t, u)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int32])
def test_checksum_sees_every_pair_of_sign_flips_and_swaps(dtype):
    n = 64  # every pair of sign flips, every swap of two different elements: at every distance
    x = (torch.randn(n, generator=torch.Generator().manual_seed(1)) * 1000).to(dtype)
    sign = None if dtype.is_floating_point else torch.tensor(1, dtype=dtype) << (8 * x.element_size() - 1)
    base = tuple(tensor_checksum(x).tolist())
    for i in range(n):
        for j in range(i + 1, n):
            u = x.clone()
            if sign is None:
                u[[i, j]] = -u[[i, j]]
            else:
                u[[i, j]] ^= sign  # an int's sign bit
            assert tuple(tensor_checksum(u).tolist()) != base, (i, j)
            if x[i] != x[j]:
                u = x.clone()
                u[i], u[j] = x[j], x[i]
                assert tuple(tensor_checksum(u).tolist()) != base, (i, j)


def _reference_checksum(t: torch.Tensor) -> list[int]:
    """The documented hash, in Python: signed 16-bit words (zero-padded odd byte), then the byte count."""
    data = t.detach().resolve_conj().contiguous().view(-1).view(torch.uint8).tolist() if t.numel() else []
    nbytes = len(data)
    data += [0] * (nbytes % 2)
    words = [int.from_bytes(bytes(data[k:k + 2]), "little", signed=True) for k in range(0, len(data), 2)]
    out = []
    for x, p in zip(consistency._BASES, consistency._PRIMES):
        h = nbytes
        for w in reversed(words):  # Horner: sum_i w_i x^i + nbytes x^n
            h = (h * x + w) % p
        out.append(h)
    return out


def test_checksum_is_the_documented_hash_across_chunks(monkeypatch):
    # 3-row matmuls, 2 per reduction, so that small tensors cross every boundary (a short matmul, the Horner step
    # between reductions, the short last row, an odd byte).
    monkeypatch.setitem(consistency._MM_ROWS, "cpu", 3)
    monkeypatch.setitem(consistency._MMS_PER_REDUCTION, "cpu", 2)
    row = 2 * consistency._COLS  # bytes
    for n in (0, 1, 2, row - 1, row, row + 1, 3 * row, 6 * row + 1, 13 * row + 77):
        for dtype in (torch.uint8, torch.bfloat16, torch.float32, torch.complex64):
            t = (torch.randn(n, generator=torch.Generator().manual_seed(n)) * 100).to(dtype)
            assert tensor_checksum(t).tolist() == _reference_checksum(t), (n, dtype)
    monkeypatch.undo()
    t = torch.randn(5000).bfloat16()
    assert tensor_checksum(t).tolist() == _reference_checksum(t)


def _factor(n: int) -> set[int]:
    out, d = set(), 2
    while d * d <= n:
        while n % d == 0:
            out.add(d)
            n //= d
        d += 1
    return out | ({n} if n > 1 else set())


def test_checksum_constants_give_its_guarantees():
    """The primes are prime and each base is a primitive root, so x^k != +-1 for 0 < k < (p-1)/2 (two changes by
    equal or opposite amounts never cancel); and no change confined to two adjacent 16-bit words (one 32-bit
    element) vanishes modulo both primes: the lattice {(a, b): a + b x = 0 mod p, both primes} has no nonzero
    vector with |a|, |b| < 2^16 (its shortest, found by Lagrange-Gauss reduction, is far longer)."""
    (p1, p2), (x1, x2) = consistency._PRIMES, consistency._BASES
    assert p1 != p2 and 2**30 < p1 < 2**31 and 2**30 < p2 < 2**31
    for x, p in ((x1, p1), (x2, p2)):
        assert _factor(p) == {p}
        assert all(pow(x, (p - 1) // q, p) != 1 for q in _factor(p - 1))  # order p - 1
    m = p1 * p2
    step = (x1 * p2 * pow(p2, -1, p1) + x2 * p1 * pow(p1, -1, p2)) % m  # x mod both primes
    u, v = (m, 0), (-step % m, 1)  # basis: (a, b) = b (-x, 1) + k (m, 0)
    norm = lambda w: w[0] ** 2 + w[1] ** 2  # noqa: E731
    while True:  # Lagrange-Gauss reduction, exact integers
        if norm(u) < norm(v):
            u, v = v, u
        k = (2 * (u[0] * v[0] + u[1] * v[1]) + norm(v)) // (2 * norm(v))
        u = (u[0] - k * v[0], u[1] - k * v[1])
        if norm(u) >= norm(v):
            break
    assert norm(v) > 2 * (2**16) ** 2, v  # shortest vector v: longer than any (a, b) with |a|, |b| < 2^16


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_checksum_is_the_same_on_cuda():
    for dtype in (torch.float32, torch.bfloat16, torch.float64, torch.uint8, torch.bool):
        for n in (0, 1, 3, 129, 5000, 3 * 2**20 + 5):
            t = (torch.randn(n, generator=torch.Generator().manual_seed(n)) * 50).to(dtype)
            assert torch.equal(tensor_checksum(t.cuda()).cpu(), tensor_checksum(t)), (dtype, n)


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


def _model_with_rank1_sign_flips(case):
    from tpfuse.tp_layers import parallelize
    from tpfuse.tp_layers.verify import random_diffusers_model

    model = random_diffusers_model(TINY, seed=0)
    if case == "fp64":
        model = model.double()
    if dist.get_rank() == 1:
        with torch.no_grad():
            if case == "two":  # two sign flips at odd indices of to_q's rows (the top bits of two int64 words)
                model.transformer_blocks[0].attn.to_q.weight[[1, 4], [3, 7]] *= -1
            else:
                model.single_transformer_blocks[0].attn.to_out.weight.neg_()  # a whole fp64 weight negated
    kind, res = _caught(parallelize, model)
    return kind, res if kind != "ok" else None


def test_parallelize_sees_sign_flips_that_used_to_cancel():
    pytest.importorskip("diffusers")
    for case, name in (("two", "transformer_blocks.0.attn.to_q.weight"),
                       ("fp64", "single_transformer_blocks.0.attn.to_out.weight")):
        for kind, msg in run_ranks(_model_with_rank1_sign_flips, 2, case, timeout=120):
            assert kind == "WeightMismatchError", (case, msg)
            assert f"first: {name!r}: values differ (ranks grouped by equal values: [[0], [1]]) (1 of " in msg, msg


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
    # Out of step: rank 1 skips the column layer and goes straight to a fresh row layer's first call.
    torch.manual_seed(1)  # the uneven randn above left the ranks' generators apart
    col2 = ColumnParallelLinear.from_dense(torch.nn.Linear(8, 6))
    row2 = RowParallelLinear.from_dense(torch.nn.Linear(6, 4))
    step = _caught(col2, x) if rank == 0 else _caught(row2, torch.randn(2, 5, row2.in_features))
    return (ok.shape, col_err[0], "x: rank 0 [2, 5, 8] float32, rank 1 [2, 6, 8] float32" in col_err[1],
            again.shape, step)


def test_layers_check_their_first_call():
    for row_shape, err, named, again, step in run_ranks(_layers_first_call, 2, timeout=120):
        assert row_shape == (3, 4) and err == "InputMismatchError" and named and again == (2, 5, 3)
        assert step[0] == "InputMismatchError" and ("out of step: they are checking the inputs of different "
                                                    "modules (rank 0 ColumnParallelLinear, rank 1 "
                                                    "RowParallelLinear)") in step[1], step


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


# ---------------------------------------------------------------------------------------------------------------
# broadcast_from: a rank number of the group, checked at every world size
# ---------------------------------------------------------------------------------------------------------------

_BAD_SOURCES = [("0", TypeError, "broadcast_from must be a rank number (an int) or None, got '0' (str)"),
                (True, TypeError, "got True (bool)"), (1.5, TypeError, "got 1.5 (float)"),
                (5, ValueError, "broadcast_from=5 is not a rank of the 1-rank tensor-parallel group (valid: 0)"),
                (-1, ValueError, "broadcast_from=-1 is not a rank of the 1-rank tensor-parallel group (valid: 0)")]


@pytest.mark.parametrize("value,error,text", _BAD_SOURCES)
def test_broadcast_from_is_checked_on_one_process(value, error, text):
    pytest.importorskip("diffusers")
    from tpfuse.tp_layers import parallelize
    from tpfuse.tp_layers.verify import random_diffusers_model

    # Used to be accepted silently at world size 1 (no broadcast to do), failing only on the cluster.
    with pytest.raises(error, match=re.escape(text)):
        parallelize(random_diffusers_model(TINY, seed=0), broadcast_from=value)
    for cls, kind in ((TPSingleStreamBlock, "single"), (TPDoubleStreamBlock, "double")):
        with pytest.raises(error, match=re.escape(text)):
            cls.from_dense(random_dense_block(TINY, kind, seed=0), broadcast_from=value)
    with pytest.raises(error, match=re.escape(text)):
        RowParallelLinear.from_dense(torch.nn.Linear(4, 4), broadcast_from=value)
    assert RowParallelLinear.from_dense(torch.nn.Linear(4, 4), broadcast_from=0).weight.shape == (4, 4)


def _bad_sources_on_ranks():
    out = []
    for value in (2, "0"):
        try:
            ColumnParallelLinear.from_dense(torch.nn.Linear(4, 4), broadcast_from=value)
            out.append("ok")
        except (TypeError, ValueError) as exc:
            out.append(f"{type(exc).__name__}: {exc}")
    return out


def test_broadcast_from_outside_the_group_is_an_error_on_every_rank():
    for res in run_ranks(_bad_sources_on_ranks, 2):
        assert res == ["ValueError: broadcast_from=2 is not a rank of the 2-rank tensor-parallel group (valid: 0 to 1)",
                       "TypeError: broadcast_from must be a rank number (an int) or None, got '0' (str)"]
