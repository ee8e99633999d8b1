"""The two-stream block's fused projections against their torch references (Triton in the interpreter, fp32):
``joint_qkv_proj`` (per-stream Q/K/V GEMMs with the QK-norm + RoPE epilogue into the joint buffers) and
``fused_linear_act`` (the feed-forward's ``linear_in`` with its SwiGLU or GELU(tanh) epilogue)."""

import pytest
import torch
import torch.nn.functional as F

from tpfuse.kernels import fused_linear_act, fused_linear_act_reference, joint_qkv_proj, joint_qkv_proj_reference
from tpfuse.kernels._dispatch import interpreting, record_backends
from tpfuse.kernels.qk_norm_rope import qk_norm_rope_reference
from tpfuse.tp_layers.numerics import rel_error, tolerance

DEV = "cuda" if torch.cuda.is_available() else "cpu"
TOL = tolerance(torch.float32)
pytestmark = pytest.mark.skipif(DEV == "cpu" and not interpreting(), reason="needs CUDA or TRITON_INTERPRET=1")


def _rand(*shape, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(*shape, generator=g)).to(DEV)


def _angles(s, d, seed=0):
    ang = torch.rand(s, d // 2, generator=torch.Generator().manual_seed(seed)) * 6.28
    return ang.cos().repeat_interleave(2, 1).to(DEV), ang.sin().repeat_interleave(2, 1).to(DEV)


def _grads(outs, inputs, seed=9):
    gs = [_rand(*o.shape, seed=seed + i) for i, o in enumerate(outs)]
    return torch.autograd.grad(outs, inputs, gs, allow_unused=True)


# M not a multiple of the 64-column SwiGLU / 128-column GELU tile (a tail tile), tokens not a multiple of BLOCK_M,
# K not a multiple of BLOCK_K (70: rows not 16-byte aligned in fp32, the cp.async path even with TMA allowed).
@pytest.mark.parametrize("activation", ["swiglu", "gelu_tanh"])
@pytest.mark.parametrize("lead,K,M,bias,tma", [((2, 37), 64, 200, True, False), ((1, 130), 70, 64, False, False),
                                               ((3, 5), 64, 128, True, True), ((67,), 96, 40, False, True)])
def test_fused_linear_act(activation, lead, K, M, bias, tma, monkeypatch):
    from tpfuse.kernels import _tma

    monkeypatch.setattr(_tma, "TMA_DTYPES", (torch.float32,) if tma else ())
    rows = 2 * M if activation == "swiglu" else M
    x = _rand(*lead, K, seed=1).requires_grad_()
    w = _rand(rows, K, seed=2, scale=K ** -0.5).requires_grad_()
    b = _rand(rows, seed=3).requires_grad_() if bias else None
    with record_backends() as ran:
        out = fused_linear_act(x, w, b, activation, backend="triton")
    assert ran == [("fused_linear_act", "triton")]
    ref = fused_linear_act_reference(x, w, b, activation)
    # the reference is the eager module's math
    h = F.linear(x, w, b)
    eager = F.silu(h[..., :M]) * h[..., M:] if activation == "swiglu" else F.gelu(h, approximate="tanh")
    assert out.shape == (*lead, M)
    torch.testing.assert_close(ref, eager)
    torch.testing.assert_close(out, ref)
    inputs = [t for t in (x, w, b) if t is not None]
    for g_out, g_ref in zip(_grads([out], inputs), _grads([eager], inputs)):
        assert rel_error(g_out, g_ref) <= TOL


def _joint_case(B, lens, K, heads, d, bias, seed=0):
    xs = [_rand(B, s, K, seed=seed + i).requires_grad_() for i, s in enumerate(lens)]
    ws = [[_rand(heads * d, K, seed=seed + 10 + 3 * i + j, scale=K ** -0.5).requires_grad_() for j in range(3)]
          for i in range(len(lens))]
    bs = [[_rand(heads * d, seed=seed + 30 + 3 * i + j).requires_grad_() for j in range(3)]
          for i in range(len(lens))] if bias else None
    qn = [(1 + 0.1 * _rand(d, seed=seed + 50 + i)).requires_grad_() for i in range(len(lens))]
    kn = [(1 + 0.1 * _rand(d, seed=seed + 60 + i)).requires_grad_() for i in range(len(lens))]
    return xs, ws, bs, qn, kn


def _eager_joint(xs, ws, bs, qn, kn, cos, sin, heads, d, eps):
    """What the dense two-stream attention computes: per-stream linears and norms, cat, RoPE on the joint rows."""
    qs, ks, vs = [], [], []
    row = 0
    for i, x in enumerate(xs):
        q, k, v = (F.linear(x, w, None if bs is None else bs[i][j]).unflatten(-1, (heads, d))
                   for j, w in enumerate(ws[i]))
        c, s = (None, None) if cos is None else (cos[row:row + x.shape[1]], sin[row:row + x.shape[1]])
        q, k = qk_norm_rope_reference(q, k, qn[i], kn[i], c, s, eps[i])
        qs.append(q), ks.append(k), vs.append(v)
        row += x.shape[1]
    return [torch.cat(t, dim=1).transpose(1, 2) for t in (qs, ks, vs)]


@pytest.mark.parametrize("B,lens,K,heads,d,rope,bias,tma", [
    (2, (7, 77), 64, 2, 32, True, False, False),  # ragged row tiles in both streams, B > 1
    (1, (5, 130), 70, 1, 64, True, True, False),  # K not a multiple of BLOCK_K; biases (Qwen-Image)
    (1, (3, 67), 64, 3, 32, False, True, True),  # TMA addressing of the per-tile weight pointer
    (2, (0, 9), 32, 1, 32, True, False, False),  # an empty stream
])
def test_joint_qkv_proj(B, lens, K, heads, d, rope, bias, tma, monkeypatch):
    from tpfuse.kernels import _tma

    monkeypatch.setattr(_tma, "TMA_DTYPES", (torch.float32,) if tma else ())
    xs, ws, bs, qn, kn = _joint_case(B, lens, K, heads, d, bias)
    cos, sin = _angles(sum(lens), d, seed=7) if rope else (None, None)
    eps = [1e-6, 1e-5]
    with record_backends() as ran:
        out = joint_qkv_proj(xs, ws, qn, kn, cos, sin, heads, d, eps, biases=bs, backend="triton")
    assert ran == [("joint_qkv_proj", "triton")]
    ref = joint_qkv_proj_reference(xs, [w for s in ws for w in s], [b for s in bs for b in s] if bs else [],
                                   [t for i in range(len(xs)) for t in (qn[i], kn[i])], cos, sin, heads, d, eps)
    eager = _eager_joint(xs, ws, bs, qn, kn, cos, sin, heads, d, eps)
    for o, r, e in zip(out, ref.unbind(0), eager):
        assert o.shape == (B, heads, sum(lens), d)
        torch.testing.assert_close(r, e)
        torch.testing.assert_close(o, r)
    inputs = [*xs, *[w for s in ws for w in s], *qn, *kn, *([b for s in bs for b in s] if bs else [])]
    for g_out, g_ref in zip(_grads(list(out), inputs), _grads(eager, inputs)):
        if g_ref is None:
            assert g_out is None or not g_out.abs().max() > 0
            continue
        assert rel_error(g_out, g_ref) <= TOL


def test_joint_qkv_proj_angle_gradients():
    xs, ws, _bs, qn, kn = _joint_case(1, (4, 9), 32, 1, 32, False, seed=3)
    cos, sin = _angles(13, 32, seed=1)
    cos, sin = cos.requires_grad_(), sin.requires_grad_()
    out = joint_qkv_proj(xs, ws, qn, kn, cos, sin, 1, 32, 1e-6, backend="triton")
    eager = _eager_joint(xs, ws, None, qn, kn, cos, sin, 1, 32, [1e-6, 1e-6])
    for a, b in zip(_grads(list(out), [cos, sin]), _grads(eager, [cos, sin])):
        assert rel_error(a, b) <= TOL


def test_bad_input_is_refused_by_name():
    xs, ws, bs, qn, kn = _joint_case(1, (3, 5), 32, 1, 32, True)
    with pytest.raises(ValueError, match=r"weights\[1\]\[2\] must be \[heads\*head_dim, K\] = \[32, 32\]"):
        joint_qkv_proj(xs, [ws[0], [ws[1][0], ws[1][1], ws[1][2][:16]]], qn, kn, None, None, 1, 32)
    with pytest.raises(ValueError, match=r"cos must be \[sum S_i, head_dim\] = \[8, 32\]"):
        joint_qkv_proj(xs, ws, qn, kn, *_angles(5, 32), 1, 32)
    with pytest.raises(ValueError, match="one entry per stream"):
        joint_qkv_proj(xs, ws[:1], qn, kn, None, None, 1, 32)
    with pytest.raises(ValueError, match=r"xs\[1\] must be \[B, S_i, K\]"):
        joint_qkv_proj([xs[0], xs[1][..., :16]], ws, qn, kn, None, None, 1, 32)
    with pytest.raises(ValueError, match="biases must be None or one"):
        joint_qkv_proj(xs, ws, qn, kn, None, None, 1, 32, biases=[bs[0], None])
    x, w = _rand(2, 3, 16), _rand(7, 16)
    with pytest.raises(ValueError, match="even row count, got 7"):
        fused_linear_act(x, w)
    with pytest.raises(ValueError, match="activation must be one of"):
        fused_linear_act(x, w[:6], activation="relu")
    with pytest.raises(ValueError, match=r"bias must be \[6\], got \(7,\)"):
        fused_linear_act(x, w[:6], _rand(7))
    with pytest.raises(ValueError, match=r"do not chain: weight must be \[N, 16\]"):
        fused_linear_act(x, _rand(6, 15))


# (sequence lengths, gate, TMA, one launch?): the per-entry gate of S >= 128 is read as two vectors per tile in
# both streams; B*S of 10 and 74 rows take different row tiles (64 and 128): two launches.
@pytest.mark.parametrize("lens,gate_kind,tma,paired", [((130, 200), "entry", False, True),
                                                       ((20, 30), "token", True, True),
                                                       ((5, 37), "token", False, False),
                                                       ((200, 131), "entry", True, True)])
def test_two_row_segments_in_one_launch_equal_two_launches(lens, gate_kind, tma, paired, monkeypatch):
    """A joint reduce's chunk across the stream boundary: both streams' rows (own input, weight, gate, residual,
    output) in ONE launch, bitwise equal to one launch per stream; pairs the launcher cannot run together (other
    tile configurations) still run, one launch each."""
    from tpfuse.kernels import _tma
    from tpfuse.kernels import row_parallel_matmul as rpm

    monkeypatch.setattr(_tma, "TMA_DTYPES", (torch.float32,) if tma else ())
    B, K, N = 2, 64, 72
    segs, refs = [], []
    for i, s in enumerate(lens):
        x, w = _rand(B, s, K, seed=i), _rand(N, K, seed=10 + i, scale=K ** -0.5)
        gate = _rand(B, N, seed=20 + i) if gate_kind == "entry" else _rand(B, s, N, seed=20 + i)
        res = _rand(B, s, N, seed=30 + i)
        lo, hi = (3, B * s) if i == 0 else (0, B * s - 2)  # a chunk: the first stream's tail, the second's head
        segs.append(([x], w, gate, res, True, torch.zeros(B * s, N, device=DEV), (lo, hi)))
        refs.append(rpm.row_parallel_matmul_triton([x], w, gate, res, True, torch.zeros(B * s, N, device=DEV),
                                                   (lo, hi)))
    launches = []
    kernel = rpm._row_parallel_mm_kernel

    class Spy:
        def __getitem__(self, grid):
            launches.append(grid)
            return kernel[grid]

    monkeypatch.setattr(rpm, "_row_parallel_mm_kernel", Spy())
    rpm.row_parallel_matmul_segments_triton(segs)
    assert len(launches) == (1 if paired else 2)
    for seg, ref in zip(segs, refs):
        assert torch.equal(seg[5], ref)


@pytest.mark.parametrize("frozen", [("out", "ff"), ("ff",), ()])
def test_joint_row_with_a_layer_per_part_and_frozen_weights(frozen):
    """FLUX.3's to_out + ff.linear_out as one reduce (a layer per part): input gradients through frozen weights
    (guidance, partial fine-tuning) equal the eager sum; frozen weights get no gradient."""
    from torch import nn

    from tpfuse.tp_layers import RowParallelLinear
    from tpfuse.tp_layers.joint_row import joint_row_parallel

    torch.manual_seed(0)
    dense = {"out": nn.Linear(16, 12, bias=False), "ff": nn.Linear(8, 12, bias=False)}
    layers = {k: RowParallelLinear.from_dense(v) for k, v in dense.items()}
    for k in frozen:
        layers[k].weight.requires_grad_(False)
    a, m = _rand(2, 5, 16, seed=1).requires_grad_(), _rand(2, 5, 8, seed=2).requires_grad_()
    gate, res = _rand(2, 5, 12, seed=3), _rand(2, 5, 12, seed=4)
    y = joint_row_parallel([[layers["out"], layers["ff"]]], [[a, m]], [gate], [res])[0]
    ref = res + gate * (F.linear(a, dense["out"].weight) + F.linear(m, dense["ff"].weight))
    torch.testing.assert_close(y, ref)
    inputs = [a, m] + [layers[k].weight for k in ("out", "ff") if k not in frozen]
    for g_out, g_ref in zip(torch.autograd.grad(y.sum(), inputs),
                            torch.autograd.grad(ref.sum(), [a, m] + [dense[k].weight for k in ("out", "ff")
                                                                     if k not in frozen])):
        assert rel_error(g_out, g_ref) <= TOL
    for k in frozen:
        assert layers[k].weight.grad is None


def test_joint_row_bad_input_is_refused_by_name():
    from torch import nn

    from tpfuse.tp_layers import RowParallelLinear
    from tpfuse.tp_layers.joint_row import joint_row_parallel

    lay = RowParallelLinear.from_dense(nn.Linear(16, 12, bias=False))
    a = _rand(2, 5, 16)
    with pytest.raises(ValueError, match="one entry per stream"):
        joint_row_parallel([lay, lay], [[a]], [None], [None])
    with pytest.raises(ValueError, match=r"parts\[0\] widths \[8\] must sum to layers\[0\]'s local in_features 16"):
        joint_row_parallel([lay], [[a[..., :8]]], [None], [None])
    with pytest.raises(ValueError, match=r"residuals\[0\] must be \[2, 5, 12\], got \(2, 4, 12\)"):
        joint_row_parallel([lay], [[a]], [None], [_rand(2, 4, 12)])
    with pytest.raises(ValueError, match=r"gates\[0\] must be \[B, out\], \[B, 1, out\] or \[B, S, out\]"):
        joint_row_parallel([lay], [[a]], [_rand(2, 3, 12)], [None])
    with pytest.raises(TypeError, match=r"layers\[0\] must be RowParallelLinear"):
        joint_row_parallel([nn.Linear(16, 12)], [[a]], [None], [None])
