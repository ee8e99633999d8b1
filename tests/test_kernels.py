"""Triton kernels against their torch references, in the interpreter (fp32) on ragged shapes, plus dispatch.

Tolerances: single fused ops in fp32 are compared with ``torch.testing.assert_close``'s fp32 defaults
(rtol 1.3e-6, atol 1e-5); weight gradients, which sum over every (token, head) row, with the fp32 relative
tolerance of :mod:`tpfuse.tp_layers.numerics`.
"""

import importlib

import pytest
import torch

from tpfuse.kernels import (
    fused_qkv_mlp_proj,
    fused_qkv_mlp_proj_reference,
    layernorm_modulate,
    layernorm_modulate_reference,
    qk_norm_rope,
    qk_norm_rope_reference,
    record_backends,
)
from tpfuse.kernels._dispatch import interpreting
from tpfuse.tp_layers.numerics import rel_error, tolerance

pytestmark = pytest.mark.skipif(not (interpreting() or torch.cuda.is_available()),
                                reason="needs TRITON_INTERPRET=1 or a GPU")
DEV = "cuda" if torch.cuda.is_available() else "cpu"
TOL = tolerance(torch.float32)


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _rand(*shape, seed=0, scale=1.0):
    return (scale * torch.randn(*shape, generator=_gen(seed))).to(DEV)


def _angles(s, d, seed=0):
    ang = torch.rand(s, d // 2, generator=_gen(seed)) * 6.28
    return ang.cos().repeat_interleave(2, 1).to(DEV), ang.sin().repeat_interleave(2, 1).to(DEV)


def _grads(outs, inputs, seed=9):
    gs = [_rand(*o.shape, seed=seed + i) for i, o in enumerate(outs)]
    return torch.autograd.grad(outs, inputs, gs)


# ---------------------------------------------------------------------------------------------------------------
# layernorm_modulate
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("S", [1, 7, 77, 333])
@pytest.mark.parametrize("D,mod_shape", [(40, "b1d"), (64, "bd"), (200, "1d")])
def test_layernorm_modulate(S, D, mod_shape):
    B = 2
    base = _rand(B, S + 3, D, seed=1, scale=3.0) + 0.5
    x = base[:, 2:S + 2].requires_grad_()  # a strided view: sequence stride != D... honoured without a copy
    mb = 1 if mod_shape == "1d" else B
    shape = (mb, 1, D) if mod_shape == "b1d" else (mb, D)
    shift = _rand(*shape, seed=2).requires_grad_()
    scale = _rand(*shape, seed=3, scale=0.5).requires_grad_()
    with record_backends() as ran:
        out = layernorm_modulate(x, shift, scale, 1e-6, backend="triton")
    assert ran == [("layernorm_modulate", "triton")]
    ref = layernorm_modulate_reference(x, shift, scale, 1e-6)
    torch.testing.assert_close(out, ref)
    for a, b in zip(_grads([out], [x, shift, scale]), _grads([ref], [x, shift, scale])):
        assert rel_error(a, b) <= TOL


def test_layernorm_modulate_reference_is_layernorm_then_modulate():
    x, shift, scale = _rand(2, 5, 16, seed=1), _rand(2, 16, seed=2), _rand(2, 16, seed=3)
    expected = (1 + scale[:, None]) * torch.nn.functional.layer_norm(x, (16,), eps=1e-6) + shift[:, None]
    torch.testing.assert_close(layernorm_modulate_reference(x, shift, scale, 1e-6), expected)


# ---------------------------------------------------------------------------------------------------------------
# qk_norm_rope
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("S", [1, 7, 77, 333])
@pytest.mark.parametrize("H,D", [(1, 32), (3, 24)])  # D=24: the 32-wide block is masked
@pytest.mark.parametrize("layout", ["bshd", "bhsd"])
def test_qk_norm_rope_forward_backward(S, H, D, layout):
    B = 2
    if layout == "bhsd":  # a [B, H, S, D] buffer seen as [B, S, H, D]
        q = _rand(B, H, S, D, seed=1).transpose(1, 2).requires_grad_()
        k = _rand(B, H, S, D, seed=2, scale=2.0).transpose(1, 2).requires_grad_()
    else:
        q = _rand(B, S, H, D, seed=1).requires_grad_()
        k = _rand(B, S, H, D, seed=2, scale=2.0).requires_grad_()
    qw = (1 + 0.1 * _rand(D, seed=3)).requires_grad_()
    kw = (1 + 0.1 * _rand(D, seed=4)).requires_grad_()
    cos, sin = _angles(S, D, seed=5)
    with record_backends() as ran:
        out = qk_norm_rope(q, k, qw, kw, cos, sin, 1e-6, backend="triton")
    assert ran == [("qk_norm_rope", "triton")]
    ref = qk_norm_rope_reference(q, k, qw, kw, cos, sin, 1e-6)
    for o, r in zip(out, ref):
        torch.testing.assert_close(o, r)
        assert o.stride() == (q if o is out[0] else k).stride()  # the output keeps the input's layout
    g_out = _grads(list(out), [q, k, qw, kw])
    g_ref = _grads(list(ref), [q, k, qw, kw])
    torch.testing.assert_close(g_out[0], g_ref[0])
    torch.testing.assert_close(g_out[1], g_ref[1])
    assert rel_error(g_out[2], g_ref[2]) <= TOL and rel_error(g_out[3], g_ref[3]) <= TOL


@pytest.mark.parametrize("S0,S1", [(1, 7), (5, 37), (33, 2)])
@pytest.mark.parametrize("H,D", [(1, 32), (3, 24), (4, 64)])  # H=4: two-head blocks per program; D=24: masked
@pytest.mark.parametrize("rope", [True, False])
def test_qk_norm_rope_joint_forward_backward(S0, S1, H, D, rope):
    from tpfuse.kernels import qk_norm_rope_joint, qk_norm_rope_joint_reference

    B = 2
    seg = []
    for i, S in enumerate((S0, S1)):
        q = _rand(B, H, S, D, seed=10 * i + 1).transpose(1, 2).requires_grad_()  # a [B, H, S, D] buffer's view
        k = _rand(B, S, H, D, seed=10 * i + 2, scale=2.0).requires_grad_()
        v = _rand(B, S, H, D, seed=10 * i + 3).requires_grad_()
        qw = (1 + 0.1 * _rand(D, seed=10 * i + 4)).requires_grad_()
        kw = (1 + 0.1 * _rand(D, seed=10 * i + 5)).requires_grad_()
        seg.append((q, k, v, qw, kw))
    cos, sin = _angles(S0 + S1, D, seed=7) if rope else (None, None)
    args = ([s[0] for s in seg], [s[1] for s in seg], [s[2] for s in seg], [s[3] for s in seg], [s[4] for s in seg],
            cos, sin, (1e-6, 1e-5))
    with record_backends() as ran:
        out = qk_norm_rope_joint(*args, backend="triton")
    assert ran == [("qk_norm_rope_joint", "triton")]
    ref = qk_norm_rope_joint_reference(*args)
    for o, r in zip(out, ref):
        assert o.shape == (B, S0 + S1, H, D)
        torch.testing.assert_close(o, r)
    inputs = [t for s in seg for t in s]
    for a, b in zip(_grads(list(out), inputs), _grads(list(ref), inputs)):
        assert rel_error(a, b) <= TOL


def test_bad_input_qk_norm_rope_joint():
    from tpfuse.kernels import qk_norm_rope_joint

    q0, q1 = torch.randn(1, 3, 2, 8), torch.randn(1, 5, 2, 8)
    w = torch.ones(8)
    with pytest.raises(ValueError, match="pass two segments"):
        qk_norm_rope_joint([q0], [q0], [q0], [w], [w], None, None, 1e-6)
    with pytest.raises(ValueError, match=r"cos must be \[S_0 \+ S_1, D\] = \[8, D\], got shape \(5, 8\)"):
        qk_norm_rope_joint([q0, q1], [q0, q1], [q0, q1], [w, w], [w, w], torch.ones(5, 8), torch.ones(5, 8), 1e-6)
    with pytest.raises(ValueError, match=r"vs\[1\] must match qs\[1\]"):
        qk_norm_rope_joint([q0, q1], [q0, q1], [q0, q1[:, :4]], [w, w], [w, w], None, None, 1e-6)
    with pytest.raises(ValueError, match="segments differ beyond their token counts"):
        q2 = torch.randn(1, 5, 4, 8)
        qk_norm_rope_joint([q0, q2], [q0, q2], [q0, q2], [w, w], [w, w], None, None, 1e-6)
    with pytest.raises(ValueError, match="eps must be >= 0, got -1e-06"):
        qk_norm_rope_joint([q0, q1], [q0, q1], [q0, q1], [w, w], [w, w], None, None, (1e-6, -1e-6))
    with pytest.raises(ValueError, match="vs\\[1\\] is on meta, qs\\[0\\] is on cpu"):
        qk_norm_rope_joint([q0, q1], [q0, q1], [q0, q1.to("meta")], [w, w], [w, w], None, None, 1e-6)


def test_qk_norm_rope_backward_with_and_without_the_saved_rstd():
    """The backward reads the forward's 1/rms; after a csrc forward (none saved) it recomputes it: same result."""
    mod = importlib.import_module("tpfuse.kernels.qk_norm_rope")  # the module (the package re-exports the op)
    q, k = _rand(2, 19, 3, 32, seed=1), _rand(2, 19, 3, 32, seed=2, scale=3.0)
    qw, kw = 1 + 0.1 * _rand(32, seed=3), 1 + 0.1 * _rand(32, seed=4)
    cos, sin = _angles(19, 32, seed=5)
    gq, gk = _rand(2, 19, 3, 32, seed=6), _rand(2, 19, 3, 32, seed=7)
    qo, ko, rstd = mod._fwd_triton(q, k, qw, kw, cos, sin, 1e-6, save_rstd=True)
    assert rstd.shape == (2, 2, 19, 3)
    torch.testing.assert_close(rstd[0], torch.rsqrt(q.pow(2).mean(-1) + 1e-6))
    saved = mod._bwd_triton(q, k, qw, kw, cos, sin, gq, gk, 1e-6, rstd)
    recomputed = mod._bwd_triton(q, k, qw, kw, cos, sin, gq, gk, 1e-6)
    for a, b in zip(saved, recomputed):
        torch.testing.assert_close(a, b)


def test_rope_ops_under_inference_mode_and_mixed_scale_dtypes():
    """Inference-mode cos/sin carry no version counter (the angle cache skips them); Q's and K's scales (and the
    segments') may have different dtypes (the kernels select one pointer of one element type)."""
    from tpfuse.kernels import qk_norm_rope_joint, qk_norm_rope_joint_reference

    q, k = _rand(1, 6, 2, 32, seed=1), _rand(1, 6, 2, 32, seed=2)
    qw, kw = 1 + 0.1 * _rand(32, seed=3), (1 + 0.1 * _rand(32, seed=4)).double()
    cos, sin = _angles(6, 32, seed=5)
    ref = qk_norm_rope_reference(q, k, qw, kw, cos, sin, 1e-6)
    with torch.inference_mode():
        cos_i, sin_i = cos.clone(), sin.clone()
        out = qk_norm_rope(q, k, qw, kw, cos_i, sin_i, 1e-6, backend="triton")
        for o, r in zip(out, ref):
            torch.testing.assert_close(o, r)
        x, w = _rand(1, 6, 16, seed=6), _rand(3 * 32 + 2 * 8, 16, seed=7)
        torch.testing.assert_close(fused_qkv_mlp_proj(x, w, qw, kw, cos_i, sin_i, 1, 32, 8, backend="triton"),
                                   fused_qkv_mlp_proj_reference(x, w, qw, kw, cos, sin, 1, 32, 8))
        args = ([q[:, :2], q[:, 2:]], [k[:, :2], k[:, 2:]], [q[:, :2], q[:, 2:]], [qw, kw.half()], [kw, qw], cos_i,
                sin_i, 1e-6)
        for o, r in zip(qk_norm_rope_joint(*args, backend="triton"), qk_norm_rope_joint_reference(*args[:-1],
                                                                                                  (1e-6, 1e-6))):
            torch.testing.assert_close(o, r)


def test_qk_norm_rope_without_rotation_is_rms_norm():
    q, k = _rand(1, 5, 2, 32, seed=1).requires_grad_(), _rand(1, 5, 2, 32, seed=2).requires_grad_()
    w = _rand(32, seed=3).requires_grad_()
    out = qk_norm_rope(q, k, w, w, None, None, 1e-6, backend="triton")
    torch.testing.assert_close(out[0], torch.nn.functional.rms_norm(q, (32,), w, 1e-6))
    g_out = _grads(list(out), [q, k, w])
    g_ref = _grads(list(qk_norm_rope_reference(q, k, w, w, None, None, 1e-6)), [q, k, w])
    for a, b in zip(g_out, g_ref):
        assert rel_error(a, b) <= TOL


def test_qk_norm_rope_matches_diffusers_rotary():
    diffusers_embeddings = pytest.importorskip("diffusers.models.embeddings")
    q, k = _rand(2, 9, 3, 32, seed=1), _rand(2, 9, 3, 32, seed=2)
    w = torch.ones(32, device=DEV)
    cos, sin = _angles(9, 32, seed=3)
    out = qk_norm_rope(q, k, w, w, cos, sin, 1e-6, backend="triton")[0]
    normed = torch.nn.functional.rms_norm(q, (32,), w, 1e-6)
    ref = diffusers_embeddings.apply_rotary_emb(normed, (cos, sin), sequence_dim=1)
    torch.testing.assert_close(out, ref)


# ---------------------------------------------------------------------------------------------------------------
# fused_qkv_mlp_proj
# ---------------------------------------------------------------------------------------------------------------

FUSED_CASES = [
    # (B, S, K, heads, head_dim, mlp_hidden): K not a multiple of BLOCK_K=64, mlp not a multiple of the MLP tile's
    # Dh/2 columns (a tail tile), S not a multiple of BLOCK_M (64 up to 64 tokens, 128 above), 1 and 3 local heads,
    # B > 1 with several row tiles per sequence (tiles never straddle two batch entries)
    (2, 7, 40, 3, 32, 50),
    (1, 1, 70, 1, 32, 16),
    (1, 77, 128, 3, 64, 70),
    (1, 333, 96, 1, 32, 33),
    (2, 130, 72, 1, 32, 40),
    (3, 67, 64, 3, 64, 130),
]


@pytest.mark.parametrize("B,S,K,heads,head_dim,mlp", FUSED_CASES)
@pytest.mark.parametrize("rope", [True, False])
@pytest.mark.parametrize("tma", [False, True])
def test_fused_qkv_mlp_proj(B, S, K, heads, head_dim, mlp, rope, tma, monkeypatch):
    from tpfuse.kernels import _tma

    # The TMA main loop (bf16/fp16 on a GPU) is exercised here in fp32: its 3-D weight boxes, zero-filled MLP
    # tail and batch-aligned row boxes are the addressing under test. K=70 rows are not 16-byte aligned in fp32:
    # those cases take the cp.async path either way.
    monkeypatch.setattr(_tma, "TMA_DTYPES", (torch.float32,) if tma else ())
    x = _rand(B, S, K, seed=1).requires_grad_()
    w = _rand(3 * heads * head_dim + 2 * mlp, K, seed=2, scale=K ** -0.5).requires_grad_()
    assert _tma.tma_ready(x.detach().reshape(B * S, K), w.detach()) == (tma and K % 4 == 0)
    qw = (1 + 0.1 * _rand(head_dim, seed=3)).requires_grad_()
    kw = (1 + 0.1 * _rand(head_dim, seed=4)).requires_grad_()
    cos, sin = _angles(S, head_dim, seed=5) if rope else (None, None)
    args = (heads, head_dim, mlp, 1e-6)
    with record_backends() as ran:
        out = fused_qkv_mlp_proj(x, w, qw, kw, cos, sin, *args, backend="triton")
    assert ran == [("fused_qkv_mlp_proj", "triton")]
    ref = fused_qkv_mlp_proj_reference(x, w, qw, kw, cos, sin, *args)
    assert [tuple(o.shape) for o in out] == [(B, heads, S, head_dim)] * 3 + [(B, S, mlp)]
    for o, r in zip(out, ref):
        torch.testing.assert_close(o, r)
    if tma:  # the backward is the shared torch recomputation: checked once per shape
        return
    for a, b in zip(_grads(list(out), [x, w, qw, kw]), _grads(list(ref), [x, w, qw, kw])):
        assert rel_error(a, b) <= TOL


@pytest.mark.skipif(not torch.cuda.is_available(), reason="bf16 through the TMA main loop needs a GPU")
@pytest.mark.parametrize("B,S,K,heads,head_dim,mlp", [(1, 333, 96, 3, 128, 200), (2, 130, 64, 1, 64, 70)])
def test_fused_qkv_mlp_proj_bf16_tma(B, S, K, heads, head_dim, mlp):
    """The production path: bf16 operands, TMA boxes, wgmma; against the fp32 reference on the same bf16 inputs,
    to bf16 output rounding: one rounding of each output is ~u/sqrt(3) = 2.2e-3 in norm (u = 2^-8), held to 2u (the
    GEMM accumulates the same bf16 products in fp32 in both)."""
    from tpfuse.kernels._tma import tma_ready

    x = _rand(B, S, K, seed=1).bfloat16()
    w = _rand(3 * heads * head_dim + 2 * mlp, K, seed=2, scale=K ** -0.5).bfloat16()
    assert tma_ready(x.reshape(B * S, K), w)
    qw, kw = (1 + 0.1 * _rand(head_dim, seed=3)).bfloat16(), (1 + 0.1 * _rand(head_dim, seed=4)).bfloat16()
    cos, sin = _angles(S, head_dim, seed=5)
    out = fused_qkv_mlp_proj(x, w, qw, kw, cos, sin, heads, head_dim, mlp, 1e-6, backend="triton")
    ref = fused_qkv_mlp_proj_reference(x.float(), w.float(), qw.float(), kw.float(), cos, sin, heads, head_dim, mlp)
    for o, r in zip(out, ref):
        assert rel_error(o.float(), r) <= 2 * 2.0**-8


def test_fused_reference_matches_unfused_ops():
    """The reference itself: x @ W^T, split, RMSNorm + RoPE per head, head-major, SwiGLU."""
    heads, d, mlp, K = 2, 32, 24, 48
    x, w = _rand(1, 5, K, seed=1), _rand(3 * heads * d + 2 * mlp, K, seed=2)
    qw, kw = _rand(d, seed=3), _rand(d, seed=4)
    cos, sin = _angles(5, d)
    q, k, v, act = fused_qkv_mlp_proj_reference(x, w, qw, kw, cos, sin, heads, d, mlp, 1e-6)
    proj = x @ w.T
    ref_q, ref_k = qk_norm_rope_reference(proj[..., :64].unflatten(-1, (2, 32)), proj[..., 64:128].unflatten(-1, (2, 32)),
                                          qw, kw, cos, sin, 1e-6)
    torch.testing.assert_close(q, ref_q.transpose(1, 2))
    torch.testing.assert_close(k, ref_k.transpose(1, 2))
    torch.testing.assert_close(v, proj[..., 128:192].unflatten(-1, (2, 32)).transpose(1, 2))
    torch.testing.assert_close(act, torch.nn.functional.silu(proj[..., 192:216]) * proj[..., 216:])


# ---------------------------------------------------------------------------------------------------------------
# Dispatch and bad input
# ---------------------------------------------------------------------------------------------------------------


def test_dispatch_defaults_env_override_and_errors(monkeypatch):
    x, shift, scale = torch.randn(1, 3, 8), torch.randn(1, 8), torch.randn(1, 8)
    with record_backends() as ran:
        layernorm_modulate(x, shift, scale)  # CPU tensors -> the torch reference by default
        monkeypatch.setenv("TPFUSE_BACKEND", "triton")
        layernorm_modulate(x, shift, scale)
        monkeypatch.setenv("TPFUSE_BACKEND", "torch")
        layernorm_modulate(x, shift, scale, backend="triton")  # an explicit argument wins over the env
    assert ran == [("layernorm_modulate", "torch"), ("layernorm_modulate", "triton"),
                   ("layernorm_modulate", "triton")]
    monkeypatch.setenv("TPFUSE_BACKEND", "cuda-graphs")
    with pytest.raises(ValueError, match="unknown backend 'cuda-graphs' \\(from TPFUSE_BACKEND\\)"):
        layernorm_modulate(x, shift, scale)
    monkeypatch.delenv("TPFUSE_BACKEND")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="needs CUDA tensors, or TRITON_INTERPRET=1"):
        layernorm_modulate(x, shift, scale, backend="triton")


def test_bad_input_layernorm_modulate():
    x = torch.randn(2, 3, 8)
    with pytest.raises(ValueError, match=r"x must be \[B, S, D\], got shape \(3, 8\)"):
        layernorm_modulate(x[0], torch.zeros(2, 8), torch.zeros(2, 8))
    with pytest.raises(ValueError, match=r"shift must be \[B, D\] or \[B, 1, D\] with B=2, D=8, got shape \(3, 8\)"):
        layernorm_modulate(x, torch.zeros(3, 8), torch.zeros(3, 8))
    with pytest.raises(ValueError, match="scale is on meta"):
        layernorm_modulate(x, torch.zeros(2, 8), torch.zeros(2, 8, device="meta"))
    with pytest.raises(TypeError, match="shift must be floating point, got torch.int64"):
        layernorm_modulate(x, torch.zeros(2, 8, dtype=torch.long), torch.zeros(2, 8))
    with pytest.raises(ValueError, match="eps must be >= 0, got -1e-06"):
        layernorm_modulate(x, torch.zeros(2, 8), torch.zeros(2, 8), eps=-1e-6)
    torch.testing.assert_close(layernorm_modulate(x, torch.zeros(2, 8), torch.zeros(2, 8), eps=0),
                               torch.nn.functional.layer_norm(x, (8,), eps=0), rtol=0, atol=0)
    with pytest.raises(ValueError, match="x must be contiguous in its last dim"):
        layernorm_modulate(torch.randn(2, 8, 3).transpose(1, 2), torch.zeros(2, 8), torch.zeros(2, 8),
                           backend="triton")


def test_bad_input_qk_norm_rope():
    q = torch.randn(1, 4, 2, 8)
    w = torch.ones(8)
    cos, sin = torch.ones(4, 8), torch.zeros(4, 8)
    with pytest.raises(ValueError, match=r"k has shape \(1, 4, 2, 6\), q has \(1, 4, 2, 8\)"):
        qk_norm_rope(q, torch.randn(1, 4, 2, 6), w, w, cos, sin)
    with pytest.raises(TypeError, match="k dtype torch.float64 differs from q dtype torch.float32"):
        qk_norm_rope(q, q.double(), w, w, cos, sin)
    with pytest.raises(ValueError, match="head_dim D=7 must be even"):
        qk_norm_rope(torch.randn(1, 4, 2, 7), torch.randn(1, 4, 2, 7), torch.ones(7), torch.ones(7), None, None)
    with pytest.raises(ValueError, match=r"cos must be \[S, D\] = \[4, 8\], got shape \(5, 8\)"):
        qk_norm_rope(q, q, w, w, torch.ones(5, 8), torch.ones(5, 8))
    with pytest.raises(ValueError, match="pass both cos and sin, or neither"):
        qk_norm_rope(q, q, w, w, cos, None)
    with pytest.raises(ValueError, match=r"q_weight must be \[8\], got shape \(4,\)"):
        qk_norm_rope(q, q, torch.ones(4), w, cos, sin)
    with pytest.raises(ValueError, match="q must be contiguous in its last dim"):
        qk_norm_rope(q.transpose(2, 3), q.transpose(2, 3), torch.ones(2), torch.ones(2), None, None)


def test_bad_input_fused_qkv_mlp_proj():
    x = torch.randn(1, 4, 16)
    w = torch.randn(3 * 2 * 32 + 2 * 8, 16)
    nw = torch.ones(32)
    cos, sin = _angles(4, 32)
    cos, sin = cos.cpu(), sin.cpu()
    with pytest.raises(ValueError, match=r"weight must be .* = \[208, 16\] \(heads=2, head_dim=32, mlp_hidden=8\), "
                                         r"got shape \(208, 15\)"):
        fused_qkv_mlp_proj(x, w[:, :15], nw, nw, cos, sin, 2, 32, 8)
    with pytest.raises(ValueError, match="heads must be a positive int, got 0"):
        fused_qkv_mlp_proj(x, w, nw, nw, cos, sin, 0, 32, 8)
    with pytest.raises(TypeError, match="weight dtype torch.float64 differs from x dtype torch.float32"):
        fused_qkv_mlp_proj(x, w.double(), nw, nw, cos, sin, 2, 32, 8)
    with pytest.raises(ValueError, match=r"cos must be \[S, head_dim\] = \[4, 32\]"):
        fused_qkv_mlp_proj(x, w, nw, nw, cos[:3], sin[:3], 2, 32, 8)
    x16, w16, nw16 = torch.randn(1, 4, 16), torch.randn(3 * 2 * 16 + 16, 16), torch.ones(16)
    with pytest.raises(ValueError, match=r"supports head_dim in \(32, 64, 128, 256\), got 16"):
        fused_qkv_mlp_proj(x16, w16, nw16, nw16, None, None, 2, 16, 8, backend="triton")
    bad_cos = torch.rand(4, 32)  # not one angle per pair: the kernel would silently differ from the reference
    with pytest.raises(ValueError, match=r"cos\[:, 2i\] != cos\[:, 2i\+1\]"):
        fused_qkv_mlp_proj(x, w, nw, nw, bad_cos, bad_cos, 2, 32, 8, backend="triton")


def test_qk_norm_rope_sin_with_its_own_row_stride():
    q, k = _rand(1, 6, 2, 32, seed=1), _rand(1, 6, 2, 32, seed=2)
    w = torch.ones(32, device=DEV)
    cos, sin = _angles(6, 32, seed=3)
    wide = torch.zeros(6, 48, device=DEV)
    wide[:, :32] = sin
    sin_view = wide[:, :32]  # row stride 48, cos has 32
    out = qk_norm_rope(q, k, w, w, cos, sin_view, 1e-6, backend="triton")
    for o, r in zip(out, qk_norm_rope_reference(q, k, w, w, cos, sin, 1e-6)):
        torch.testing.assert_close(o, r)


def test_pair_angle_check_sees_in_place_changes():
    x, w = _rand(1, 4, 16, seed=1), _rand(3 * 32 + 2 * 8, 16, seed=2)
    nw = torch.ones(32, device=DEV)
    cos, sin = _angles(4, 32, seed=3)
    fused_qkv_mlp_proj(x, w, nw, nw, cos, sin, 1, 32, 8, backend="triton")
    cos[:, 1] += 0.5  # the checked tensor changes in place: its version moves, so it is checked again
    with pytest.raises(ValueError, match=r"cos\[:, 2i\] != cos\[:, 2i\+1\]"):
        fused_qkv_mlp_proj(x, w, nw, nw, cos, sin, 1, 32, 8, backend="triton")


def test_angle_table_is_compact_cached_and_checked():
    from tpfuse.kernels._rope import angle_table

    cos, sin = _angles(5, 32, seed=3)
    table = angle_table("op", cos, sin)
    assert table.shape == (2, 5, 16) and table.dtype == torch.float32 and table.is_contiguous()
    torch.testing.assert_close(table[0], cos[:, 0::2], rtol=0, atol=0)
    torch.testing.assert_close(table[1], sin[:, 1::2], rtol=0, atol=0)
    assert angle_table("op", cos, sin) is table  # one build per rotary embedding (all blocks of a forward share it)
    sin.mul_(0.5)  # an in-place change moves the version: rebuilt, with the new values
    rebuilt = angle_table("op", cos, sin)
    assert rebuilt is not table
    torch.testing.assert_close(rebuilt[1], sin[:, 0::2], rtol=0, atol=0)
    bad = sin.clone()
    bad[3, 7] += 1.0
    with pytest.raises(ValueError, match=r"op: sin\[:, 2i\] != sin\[:, 2i\+1\]"):
        angle_table("op", cos, bad)


def test_tp_block_unfused_when_the_kernel_does_not_fit(monkeypatch):
    """head_dim 16 is below the fused projection's minimum: with the triton backend the block runs unfused."""
    from tpfuse.tp_layers import Flux2Config, TPSingleStreamBlock
    from tpfuse.tp_layers.verify import block_inputs, random_dense_block

    cfg = Flux2Config.preset("tiny")
    dense = random_dense_block(cfg, "single", seed=0).to(DEV)
    tensors, rope = block_inputs(cfg, "single", 1, 3, 5, seed=1, device=DEV)
    monkeypatch.setenv("TPFUSE_BACKEND", "triton")
    with torch.no_grad(), record_backends() as ran:
        out = TPSingleStreamBlock.from_dense(dense)(**tensors, image_rotary_emb=rope)
    assert "fused_qkv_mlp_proj" not in {op for op, _ in ran}
    with torch.no_grad():
        assert rel_error(out, dense(**tensors, image_rotary_emb=rope)) <= TOL


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_eps_must_be_a_positive_finite_float_on_every_op(backend):
    """Not a bare "'>' not supported" from deep inside, and not inf (every row normalized to zero, silently)."""
    from tpfuse.kernels import qk_norm_rope_joint

    q, w = torch.randn(1, 3, 2, 32), torch.ones(32)
    x, wp = torch.randn(1, 3, 16), torch.randn(3 * 2 * 32 + 2 * 8, 16)
    ops = {
        "qk_norm_rope": lambda eps: qk_norm_rope(q, q, w, w, None, None, eps, backend=backend),
        "qk_norm_rope_joint": lambda eps: qk_norm_rope_joint([q, q], [q, q], [q, q], [w, w], [w, w], None, None, eps,
                                                             backend=backend),
        "fused_qkv_mlp_proj": lambda eps: fused_qkv_mlp_proj(x, wp, w, w, None, None, 2, 32, 8, eps, backend=backend),
        "layernorm_modulate": lambda eps: layernorm_modulate(x, torch.zeros(1, 16), torch.zeros(1, 16), eps,
                                                             backend=backend),
    }
    for name, call in ops.items():
        op = "qk_norm_rope" if name == "qk_norm_rope_joint" else name  # the joint op checks each segment's eps
        with pytest.raises(ValueError, match=f"{op}: eps must be finite, got inf"):
            call(float("inf"))
        for bad in ("1e-6", None, torch.tensor(1e-6), True):
            with pytest.raises(TypeError, match="eps must be a float"):
                call(bad)
        import numpy as np

        call(np.float32(1e-6))  # a numpy scalar is a float


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_joint_inputs_are_named_and_the_angles_checked_whole(backend):
    from tpfuse.kernels import qk_norm_rope_joint

    q0, q1, w = torch.randn(1, 3, 2, 8), torch.randn(1, 5, 2, 8), torch.ones(8)
    cos, sin = torch.ones(8, 8), torch.zeros(8, 8)

    def call(qs=(q0, q1), vs=(q0, q1), cos=cos, sin=sin):
        return qk_norm_rope_joint(qs, [q0, q1], vs, [w, w], [w, w], cos, sin, 1e-6, backend=backend)

    with pytest.raises(TypeError, match="qs must be a list of the two segments' tensors, got NoneType"):
        call(qs=None)
    with pytest.raises(TypeError, match=r"vs\[1\] must be a torch.Tensor, got NoneType"):
        call(vs=[q0, None])
    with pytest.raises(ValueError, match=r"qs\[0\] must be \[B, S_0, H, D\], got shape \(3, 2, 8\)"):
        call(qs=[q0[0], q1])
    # sin with more rows than the joint sequence: the torch path used its first rows, the triton path crashed
    with pytest.raises(ValueError, match=r"sin must be \[S_0 \+ S_1, D\] = \[8, D\], got shape \(9, 8\)"):
        call(sin=torch.zeros(9, 8))
    # sin without cos was ignored
    with pytest.raises(ValueError, match="pass both cos and sin, or neither"):
        call(cos=None)


def test_fused_projection_sizes_take_numpy_ints_but_not_bools():
    import numpy as np

    x, w, nw = torch.randn(1, 4, 16), torch.randn(3 * 1 * 32 + 2 * 8, 16), torch.ones(32)
    with pytest.raises(ValueError, match="heads must be a positive int, got True"):
        fused_qkv_mlp_proj(x, w, nw, nw, None, None, True, 32, 8)  # was taken as heads=1
    q = fused_qkv_mlp_proj(x, w, nw, nw, None, None, np.int64(1), np.int64(32), np.int64(8))[0]
    assert q.shape == (1, 1, 4, 32)


@pytest.mark.parametrize("where", ["cos", "sin"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_angle_pairs_propagate_on_every_rope_path(where, value):
    """A pair holding NaN (or +-inf) twice is a pair: on the Triton path of each RoPE op, forward and backward, the
    non-finite values land where the torch path puts them. NaN in one element only is unpaired and refused."""
    from tpfuse.kernels import qk_norm_rope_joint

    cos, sin = (t.cpu() for t in _angles(3, 32))
    (cos if where == "cos" else sin)[1, 4:6] = value
    q, k, w = torch.randn(1, 3, 2, 32), torch.randn(1, 3, 2, 32), torch.rand(32) + 0.5
    x, wp = torch.randn(1, 3, 16), torch.randn(3 * 2 * 32 + 2 * 8, 16) / 4
    ops = {
        "qk_norm_rope": lambda c, s, be, t: qk_norm_rope(t, k, w, w, c, s, backend=be),
        "qk_norm_rope_joint": lambda c, s, be, t: qk_norm_rope_joint([t[:, :1], t[:, 1:]], [k[:, :1], k[:, 1:]],
                                                                     [k[:, :1], k[:, 1:]], [w, w], [w, w], c, s,
                                                                     1e-6, backend=be),
        "fused_qkv_mlp_proj": lambda c, s, be, t: fused_qkv_mlp_proj(t, wp, w, w, c, s, 2, 32, 8, backend=be),
    }
    for name, op in ops.items():
        got = {}
        for be in ("torch", "triton"):
            t = (x if name == "fused_qkv_mlp_proj" else q).clone().requires_grad_()
            angles = [a.clone().requires_grad_() for a in (cos, sin)]
            outs = op(*angles, be, t)
            sum(o.sum() for o in outs).backward()
            got[be] = [*outs, t.grad, *(a.grad for a in angles)]
        for ref, out in zip(got["torch"], got["triton"]):
            assert torch.equal(ref.isnan(), out.isnan()) and torch.equal(ref.isinf(), out.isinf()), name
            torch.testing.assert_close(out.nan_to_num(0, 0, 0), ref.nan_to_num(0, 0, 0), rtol=1e-5, atol=1e-5)
        assert any(o.isnan().any() or o.isinf().any() for o in got["triton"]), name
        half = (cos if where == "cos" else sin).clone()
        half[1, 4:6] = torch.tensor([float("nan"), 0.5])
        with pytest.raises(ValueError, match=rf"{where}\[:, 2i\] != {where}\[:, 2i\+1\] \(first at row 1, pair 2\)"):
            op(*((half, sin) if where == "cos" else (cos, half)), "triton", q if name != "fused_qkv_mlp_proj" else x)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("mode", ["fake", "meta"])
def test_every_op_traces_from_shapes_alone(backend, mode):
    """Shape-only tracing (a FakeTensorMode, as torch.compile traces; meta tensors): no guard of any op reads a
    value (an ``.item()`` there raises), forward and backward, on both backends."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from tpfuse.kernels import qk_norm_rope_joint
    from tpfuse.kernels.row_parallel_matmul import row_parallel_matmul

    dev = "meta" if mode == "meta" else "cpu"
    with FakeTensorMode() if mode == "fake" else torch.device("meta"):
        def t(*shape):
            return torch.randn(*shape, device=dev, requires_grad=True)

        cos, sin = t(3, 32), t(3, 32)
        q, w, x = t(2, 3, 2, 32), t(32), t(2, 3, 16)
        outs = {
            "qk_norm_rope": qk_norm_rope(q, q, w, w, cos, sin, backend=backend),
            "qk_norm_rope_joint": qk_norm_rope_joint([q[:, :1], q[:, 1:]], [q[:, :1], q[:, 1:]], [q[:, :1], q[:, 1:]],
                                                     [w, w], [w, w], cos, sin, 1e-6, backend=backend),
            "fused_qkv_mlp_proj": fused_qkv_mlp_proj(x, t(3 * 2 * 32 + 2 * 8, 16), w, w, cos, sin, 2, 32, 8,
                                                     backend=backend),
            "layernorm_modulate": (layernorm_modulate(x, t(2, 1, 16), t(2, 1, 16), backend=backend),),
            "row_parallel_matmul": (row_parallel_matmul([x, t(2, 3, 8)], t(12, 24), t(2, 12), t(2, 3, 12), True,
                                                        backend=backend),),
        }
        sum(o.sum() for out in outs.values() for o in out).backward()
    shapes = {name: [tuple(o.shape) for o in out] for name, out in outs.items()}
    assert shapes == {"qk_norm_rope": [(2, 3, 2, 32)] * 2, "qk_norm_rope_joint": [(2, 3, 2, 32)] * 3,
                      "fused_qkv_mlp_proj": [(2, 2, 3, 32)] * 3 + [(2, 3, 8)], "layernorm_modulate": [(2, 3, 16)],
                      "row_parallel_matmul": [(2, 3, 12)]}
    assert q.grad.shape == q.shape and cos.grad.shape == cos.shape and x.grad.shape == x.shape
