"""Autocast on tpfuse's ops: each op does what its launcher's policy says (kernels/_autocast.py), exactly.

GEMM ops run on the autocast dtype's copies of the activation and weight; norm ops take their auxiliary inputs in
the activation's dtype. Each result under ``torch.autocast`` must equal the op called with those casts done by
hand and autocast off (bitwise: same backend, same inputs). CPU autocast, torch backend (the references).
"""

import pytest
import torch

from tpfuse.kernels import fused_qkv_mlp_proj, layernorm_modulate, qk_norm_rope, qk_norm_rope_joint
from tpfuse.kernels.row_parallel_matmul import row_parallel_matmul

BF16 = torch.bfloat16


def _r(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def _under_autocast(fn):
    with torch.autocast("cpu", dtype=BF16):
        return fn()


def _equal(a, b):
    a, b = (a,) if isinstance(a, torch.Tensor) else tuple(a), (b,) if isinstance(b, torch.Tensor) else tuple(b)
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.dtype == y.dtype and torch.equal(x, y)


def test_gemm_ops_run_in_the_autocast_dtype():
    B, S, K, H, Dh, M = 2, 5, 24, 2, 8, 12
    x, w = _r(B, S, K, seed=1), _r(3 * H * Dh + 2 * M, K, seed=2)
    qw, kw, cos, sin = _r(Dh, seed=3), _r(Dh, seed=4), _r(S, Dh, seed=5), _r(S, Dh, seed=6)
    got = _under_autocast(lambda: fused_qkv_mlp_proj(x, w, qw, kw, cos, sin, H, Dh, M, 1e-6, backend="torch"))
    _equal(got, fused_qkv_mlp_proj(x.to(BF16), w.to(BF16), qw, kw, cos, sin, H, Dh, M, 1e-6, backend="torch"))
    assert got[0].dtype == BF16

    parts, wr, gate, res = [_r(B, S, 7, seed=7), _r(B, S, 5, seed=8)], _r(6, 12, seed=9), _r(B, 6, seed=10), \
        _r(B, S, 6, seed=11)
    got = _under_autocast(lambda: row_parallel_matmul(parts, wr, gate, res, True, backend="torch"))
    y = row_parallel_matmul([p.to(BF16) for p in parts], wr.to(BF16), backend="torch")
    _equal(got, res + y * gate.unsqueeze(1))  # gate and the fp32 residual outside the GEMM, as eager code
    assert got.dtype == torch.float32


def test_norm_ops_take_their_inputs_in_the_activation_dtype():
    x, shift, scale = _r(2, 5, 16, seed=1, dtype=BF16), _r(2, 16, seed=2), _r(2, 16, seed=3)  # fp32 modulation
    got = _under_autocast(lambda: layernorm_modulate(x, shift, scale, 1e-6, backend="torch"))
    _equal(got, layernorm_modulate(x, shift.to(BF16), scale.to(BF16), 1e-6, backend="torch"))

    q, k = _r(2, 5, 3, 8, seed=4, dtype=BF16), _r(2, 5, 3, 8, seed=5)  # k in fp32: autocast aligns it with q
    qw, kw, cos, sin = _r(8, seed=6), _r(8, seed=7), _r(5, 8, seed=8), _r(5, 8, seed=9)
    got = _under_autocast(lambda: qk_norm_rope(q, k, qw, kw, cos, sin, 1e-6, backend="torch"))
    _equal(got, qk_norm_rope(q, k.to(BF16), qw, kw, cos, sin, 1e-6, backend="torch"))

    segs = [(_r(2, s, 3, 8, seed=10 + s, dtype=BF16), _r(2, s, 3, 8, seed=20 + s), _r(2, s, 3, 8, seed=30 + s))
            for s in (2, 3)]
    qs, ks, vs = ([seg[i] for seg in segs] for i in range(3))
    got = _under_autocast(lambda: qk_norm_rope_joint(qs, ks, vs, [qw, qw], [kw, kw], cos, sin, 1e-6,
                                                     backend="torch"))
    _equal(got, qk_norm_rope_joint(qs, [t.to(BF16) for t in ks], [t.to(BF16) for t in vs], [qw, qw], [kw, kw],
                                   cos, sin, 1e-6, backend="torch"))


def test_without_autocast_dtypes_must_still_match():
    x, w = _r(1, 3, 8), _r(2 * 4 * 3 + 2 * 4, 8, dtype=BF16)
    with pytest.raises(TypeError, match="weight dtype torch.bfloat16 differs from x dtype torch.float32"):
        fused_qkv_mlp_proj(x, w, _r(4), _r(4), None, None, 2, 4, 4, backend="torch")
