"""The fused ops' registered backwards against autograd through their plain-torch references.

Every op is a ``torch.library`` op whose backward is written by hand (torch ops on every backend, plus the Triton
QK-norm backward kernel), so these are the checks of that math: all inputs requiring grad (``cos``/``sin``
included), each differentiable input alone (a subset must never crash, on any backend), and every modulation shape
``layernorm_modulate`` accepts. The torch backend in fp64 (``tolerance(float64)``: the formulas are exact up to
rounding), the Triton kernels in the interpreter in fp32 (``tolerance(float32)``).
"""

import pytest
import torch

from tpfuse.kernels import (
    fused_qkv_mlp_proj,
    fused_qkv_mlp_proj_reference,
    layernorm_modulate,
    layernorm_modulate_reference,
    qk_norm_rope,
    qk_norm_rope_joint,
    qk_norm_rope_joint_reference,
    qk_norm_rope_reference,
)
from tpfuse.kernels._dispatch import interpreting
from tpfuse.kernels.row_parallel_matmul import row_parallel_matmul, row_parallel_matmul_reference
from tpfuse.tp_layers.flux2 import rope_cos_sin
from tpfuse.tp_layers.numerics import rel_error, tolerance
from tpfuse.tp_layers.verify import position_ids

B, S0, S1, H, D, K, M = 2, 3, 4, 2, 32, 24, 20  # odd token counts and widths; head_dim 32 for the Triton tiles
S = S0 + S1
BACKENDS = [("torch", torch.float64), ("triton", torch.float32)]


def _cases(dtype, mod_shape=(B, 1, 48)):
    """(name, op(backend, *inputs), reference(*inputs), inputs): every float input differentiable."""
    g = torch.Generator().manual_seed(0)

    def rand(*shape, scale=1.0, shift=0.0):
        return (shift + scale * torch.randn(*shape, generator=g, dtype=torch.float64)).to(dtype)

    cos, sin = (t.to(dtype) for t in rope_cos_sin(position_ids(S0, S1), (8, 8, 8, 8), 2000.0))
    w = [rand(D, scale=0.1, shift=1.0) for _ in range(4)]
    return [
        ("layernorm_modulate",
         lambda b, x, sh, sc: layernorm_modulate(x, sh, sc, 1e-6, backend=b),
         lambda x, sh, sc: layernorm_modulate_reference(x, sh, sc, 1e-6),
         [rand(B, S, 48), rand(*mod_shape, scale=0.5), rand(*mod_shape, scale=0.5)]),
        ("qk_norm_rope",
         lambda b, q, k, qw, kw, c, s: qk_norm_rope(q, k, qw, kw, c, s, 1e-6, backend=b),
         lambda q, k, qw, kw, c, s: qk_norm_rope_reference(q, k, qw, kw, c, s, 1e-6),
         [rand(B, S, H, D), rand(B, S, H, D), w[0], w[1], cos, sin]),
        ("qk_norm_rope_joint",
         lambda b, *t: qk_norm_rope_joint(t[0:2], t[2:4], t[4:6], t[6:8], t[8:10], t[10], t[11], (1e-6, 1e-5),
                                          backend=b),
         lambda *t: qk_norm_rope_joint_reference(t[0:2], t[2:4], t[4:6], t[6:8], t[8:10], t[10], t[11],
                                                 (1e-6, 1e-5)),
         [rand(B, S0, H, D), rand(B, S1, H, D), rand(B, S0, H, D), rand(B, S1, H, D), rand(B, S0, H, D),
          rand(B, S1, H, D), *w, cos, sin]),
        ("fused_qkv_mlp_proj",
         lambda b, x, wt, qw, kw, c, s: fused_qkv_mlp_proj(x, wt, qw, kw, c, s, H, D, M, 1e-6, backend=b),
         lambda x, wt, qw, kw, c, s: fused_qkv_mlp_proj_reference(x, wt, qw, kw, c, s, H, D, M, 1e-6),
         [rand(B, S, K), rand(3 * H * D + 2 * M, K, scale=0.2), w[0], w[1], cos, sin]),
        ("row_parallel_matmul",
         lambda b, a, m, wt, gate, res: row_parallel_matmul([a, m], wt, gate, res, True, backend=b),
         lambda a, m, wt, gate, res: row_parallel_matmul_reference([a, m], wt, gate, res, True),
         [rand(B, S, 7), rand(B, S, 9), rand(K, 16), rand(B, 1, K), rand(B, S, K)]),
    ]


def _grads(fn, inputs, wanted: list[bool], seed: int = 1):
    leaves = [t.detach().clone().requires_grad_(need) for t, need in zip(inputs, wanted)]
    out = fn(*leaves)
    outs = list(out) if isinstance(out, (tuple, list)) else [out]
    gen = torch.Generator().manual_seed(seed)
    grads = [torch.randn(o.shape, generator=gen, dtype=torch.float64).to(o.dtype) for o in outs]
    # An output that does not depend on the differentiable inputs has no graph in the reference (the op's outputs
    # all require grad; such an output's gradient adds nothing).
    pairs = [(o, g) for o, g in zip(outs, grads) if o.requires_grad]
    got = torch.autograd.grad([o for o, _ in pairs], [t for t in leaves if t.requires_grad], [g for _, g in pairs],
                              allow_unused=True)
    return [o.detach() for o in outs], list(got)


def _check(name, op, ref, inputs, backend, dtype, wanted):
    outs, got = _grads(lambda *t: op(backend, *t), inputs, wanted)
    ref_outs, expected = _grads(ref, inputs, wanted)
    tol = tolerance(dtype)
    for i, (o, r) in enumerate(zip(outs, ref_outs)):
        assert rel_error(o, r) <= tol, f"{name} ({backend}) output {i}: {rel_error(o, r)}"
    names = [i for i, need in enumerate(wanted) if need]
    for i, a, e in zip(names, got, expected):
        if e is None:  # the input does not reach the outputs: a zero gradient either way
            assert a is None or not a.any(), f"{name} ({backend}) grad of input {i}"
            continue
        assert a is not None and a.dtype == e.dtype and a.shape == e.shape, f"{name} ({backend}) grad of input {i}"
        assert rel_error(a, e) <= tol, f"{name} ({backend}) grad of input {i}: {rel_error(a, e)} > {tol}"


def _skip_triton(backend):
    if backend == "triton" and not (interpreting() or torch.cuda.is_available()):
        pytest.skip("needs TRITON_INTERPRET=1 or a GPU")


@pytest.mark.parametrize("backend,dtype", BACKENDS, ids=[b for b, _ in BACKENDS])
def test_backward_matches_reference_autograd(backend, dtype):
    """All inputs requiring grad, then each differentiable input alone."""
    _skip_triton(backend)
    for name, op, ref, inputs in _cases(dtype):
        _check(name, op, ref, inputs, backend, dtype, [True] * len(inputs))
        for i in range(len(inputs)):
            _check(name, op, ref, inputs, backend, dtype, [j == i for j in range(len(inputs))])


@pytest.mark.parametrize("mod_shape", [(B, 48), (B, 1, 48), (1, 48), (1, 1, 48)])
@pytest.mark.parametrize("backend,dtype", BACKENDS, ids=[b for b, _ in BACKENDS])
def test_layernorm_modulate_backward_every_modulation_shape(backend, dtype, mod_shape):
    _skip_triton(backend)
    name, op, ref, inputs = _cases(dtype, mod_shape)[0]
    _check(name, op, ref, inputs, backend, dtype, [True] * 3)


def test_torch_backwards_pass_gradcheck():
    """fp64 finite differences of the torch backend's formulas (independent of the references)."""
    for name, op, _, inputs in _cases(torch.float64):
        leaves = [t.detach().clone().requires_grad_() for t in inputs]
        assert torch.autograd.gradcheck(lambda *t: op("torch", *t), leaves, fast_mode=True), name
