"""Per-token modulation in ``layernorm_modulate``: shift/scale ``[B, S, D]`` (FLUX.3, FLUX.2's KV-extract mode)
or ``[1, S, D]`` broadcast over the batch, against the torch reference.

Without a GPU the Triton kernel runs in the interpreter (``TRITON_INTERPRET=1``, set by ``conftest.py`` before
triton is imported), fp32 only (bf16 arithmetic is wrong in the interpreter); small ragged shapes, so the file takes
a few seconds. Tolerances come from the dtype: the forward with ``torch.testing.assert_close``'s fp32 defaults
(one fused op), gradients -- sums over the tokens or the batch -- within :data:`tpfuse.tp_layers.numerics.TOLERANCE`
of autograd through the reference in fp64.
"""

import pytest
import torch

from tpfuse.kernels import layernorm_modulate, layernorm_modulate_reference, record_backends
from tpfuse.kernels._dispatch import interpreting
from tpfuse.tp_layers.numerics import rel_error, tolerance

pytestmark = pytest.mark.skipif(not (interpreting() or torch.cuda.is_available()),
                                reason="needs TRITON_INTERPRET=1 or a GPU")
DEV = "cuda" if torch.cuda.is_available() else "cpu"
TOL = tolerance(torch.float32)


def _rand(*shape, seed=0, scale=1.0, shift=0.0):
    return (scale * torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) + shift).to(DEV)


def _fp64_grads(x, shift, scale, grad, eps):
    """Autograd through the torch reference in fp64: the ground truth the op's gradients are measured against."""
    leaves = [t.detach().double().requires_grad_() for t in (x, shift, scale)]
    out = layernorm_modulate_reference(*leaves, eps)
    return torch.autograd.grad(out, leaves, grad.double())


# Ragged: S not a multiple of a program's rows; D = 40 is one padded chunk, 96 three full chunks, 200 one padded
# 256-wide chunk; x is a strided view (token stride != D).
@pytest.mark.parametrize("S,D,mod_batch", [(5, 40, 2), (37, 96, 1), (3, 200, 2), (1, 40, 1)])
def test_per_token_forward_and_backward_match_the_reference(S, D, mod_batch):
    B, eps = 2, 1e-6
    x = _rand(B, S + 3, D, seed=1, scale=3.0, shift=0.5)[:, 2:S + 2].requires_grad_()
    shift = _rand(mod_batch, S, D, seed=2).requires_grad_()  # [B, S, D] or [1, S, D]
    scale = _rand(mod_batch, S, D, seed=3, scale=0.5).requires_grad_()
    with record_backends() as ran:
        out = layernorm_modulate(x, shift, scale, eps, backend="triton")
    assert ran == [("layernorm_modulate", "triton")]
    assert out.shape == (B, S, D) and out.is_contiguous()
    torch.testing.assert_close(out, layernorm_modulate_reference(x, shift, scale, eps))
    grad = _rand(B, S, D, seed=4)
    got = torch.autograd.grad(out, [x, shift, scale], grad)
    for g, ref, t in zip(got, _fp64_grads(x, shift, scale, grad, eps), (x, shift, scale)):
        assert g.shape == t.shape and g.dtype == t.dtype  # the modulation's own shape: [1, S, D] summed over B
        assert rel_error(g, ref) <= TOL


def test_per_token_rows_equal_the_per_batch_kernel_when_every_token_has_the_batch_row():
    """The per-token path (a row per token) against the per-batch one (one row per batch entry, loaded once per
    program): same numbers when every token's row is its batch entry's."""
    B, S, D = 2, 9, 64
    x = _rand(B, S, D, seed=5)
    shift, scale = _rand(B, D, seed=6), _rand(B, D, seed=7, scale=0.5)
    per_batch = layernorm_modulate(x, shift, scale, backend="triton")
    per_token = layernorm_modulate(x, shift[:, None].expand(B, S, D), scale[:, None].expand(B, S, D),
                                   backend="triton")
    torch.testing.assert_close(per_token, per_batch, rtol=0, atol=0)


def test_per_token_torch_backend_and_fake_implementation():
    """The reference backend takes the per-token shapes too, and the op traces: one graph node whose fake output is
    ``[B, S, D]`` contiguous."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    x, shift, scale = torch.randn(2, 4, 16), torch.randn(1, 4, 16), torch.randn(1, 4, 16)
    with record_backends() as ran:
        out = layernorm_modulate(x, shift, scale, backend="torch")
    assert ran == [("layernorm_modulate", "torch")]
    expected = (1 + scale) * torch.nn.functional.layer_norm(x, (16,), eps=1e-6) + shift
    torch.testing.assert_close(out, expected)
    with FakeTensorMode():
        fake = torch.ops.tpfuse.layernorm_modulate(torch.empty(2, 4, 16), torch.empty(2, 4, 16),
                                                   torch.empty(2, 4, 16), 1e-6, "triton")
    assert fake.shape == (2, 4, 16) and fake.is_contiguous()


@pytest.mark.parametrize("shape,fragment", [
    ((2, 4, 8), r"with B=2, D=8, got shape \(2, 4, 8\) \(or per token \[B, S, D\] with S=3"),  # S + 1 rows
    ((2, 3, 9), r"with B=2, D=8, got shape \(2, 3, 9\)"),  # D + 1 features
    ((3, 3, 8), r"with B=2, D=8, got shape \(3, 3, 8\)"),  # 3 batch entries for 2
    ((2, 2, 3, 8), r"with B=2, D=8, got shape \(2, 2, 3, 8\)"),
])
def test_bad_per_token_shapes_name_the_offending_shape(shape, fragment):
    x = torch.randn(2, 3, 8)
    with pytest.raises(ValueError, match=r"layernorm_modulate: shift must be \[B, D\] or \[B, 1, D\] " + fragment):
        layernorm_modulate(x, torch.zeros(shape), torch.zeros(shape))


def test_per_token_shift_with_per_batch_scale_is_refused():
    x = torch.randn(2, 3, 8)
    with pytest.raises(ValueError, match=r"shift \(2, 3, 8\) and scale \(2, 1, 8\) differ"):
        layernorm_modulate(x, torch.zeros(2, 3, 8), torch.zeros(2, 1, 8))
