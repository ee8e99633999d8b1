"""``torch.compile(fullgraph=True)``: tpfuse's ops, the TP layers, the TP blocks and a parallelized diffusers model
trace into ONE graph (``torch._dynamo.explain``: no graph break) and the compiled module computes what eager does,
forward and backward, on 2 gloo ranks.

``backend="aot_eager"`` traces what inductor would (dynamo + AOTAutograd: the fake implementations, the registered
backwards, the functional collectives) and runs the traced aten ops without generating code; one case compiles with
inductor. Both may decompose and reorder fp32 reductions, so compiled results are compared with eager to a few fp32
ulp; replicated outputs must be bitwise identical on every rank. (The backward formulas themselves are checked
against autograd through the references in ``tests/test_op_backward.py``.) Tiny shapes: the compile time,
not the math, is what these tests spend.
"""

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch._dynamo.utils import counters

from tpfuse.kernels import fused_qkv_mlp_proj, layernorm_modulate, qk_norm_rope, qk_norm_rope_joint, record_backends
from tpfuse.kernels.row_parallel_matmul import row_parallel_matmul
from tpfuse.tp_layers import ColumnParallelLinear, Flux2Config, RowParallelLinear, parallelize, run_ranks
from tpfuse.tp_layers.flux2 import rope_cos_sin
from tpfuse.tp_layers.linear import column_parallel_linear
from tpfuse.tp_layers.numerics import rel_error
from tpfuse.tp_layers.flux2.tp_blocks import TPDoubleStreamBlock, TPSingleStreamBlock
from tpfuse.tp_layers.verify import block_inputs, position_ids, random_dense_block, random_diffusers_model

TINY = Flux2Config.preset("tiny")
WS = 2


def _explain(fn, *args, **kwargs) -> tuple[int, list[str]]:
    torch._dynamo.reset()
    ex = torch._dynamo.explain(fn)(*args, **kwargs)
    return ex.graph_count, [str(b.reason).splitlines()[0] for b in ex.break_reasons]


def _fwd_bwd(fn, params, args=(), kwargs=None, backward=True, seed=7):
    """Outputs, then the gradients of every tensor argument and parameter requiring grad (seeded output grads)."""
    kwargs = kwargs or {}
    leaves = [t for t in (*args, *kwargs.values(), *params) if isinstance(t, torch.Tensor) and t.requires_grad]
    for t in leaves:
        t.grad = None
    out = fn(*args, **kwargs)
    outs = [o for o in (out if isinstance(out, (tuple, list)) else [out])]
    outs = [o for o in outs if isinstance(o, torch.Tensor)]
    if not backward:
        return [o.detach().clone() for o in outs]
    gen = torch.Generator().manual_seed(seed)
    torch.autograd.backward([o for o in outs if o.requires_grad],
                            [torch.randn(o.shape, generator=gen, dtype=o.dtype) for o in outs if o.requires_grad])
    return [o.detach().clone() for o in outs] + [None if t.grad is None else t.grad.clone() for t in leaves]


def _compiled_vs_eager(name, module, args=(), kwargs=None, backward=True, backend="aot_eager",
                       replicated=True, explain=True) -> dict:
    """{"name", "graphs", "breaks", "eager", "compiled", "replicated"}: ``torch._dynamo.explain`` (or, with
    ``explain=False``, the graphs dynamo compiled: ``fullgraph=True`` raises at any break, so one trace is enough),
    then eager and fullgraph-compiled results (``replicated``: the first output is the same on every rank)."""
    graphs, breaks = _explain(module, *args, **(kwargs or {})) if explain else (None, [])
    params = list(module.parameters()) if isinstance(module, torch.nn.Module) else []
    eager = _fwd_bwd(module, params, args, kwargs, backward)
    torch._dynamo.reset()
    counters.clear()
    compiled = _fwd_bwd(torch.compile(module, fullgraph=True, backend=backend), params, args, kwargs, backward)
    if not explain:
        graphs = counters["stats"]["unique_graphs"]
    return {"name": name, "graphs": graphs, "breaks": breaks, "eager": eager, "compiled": compiled,
            "replicated": replicated}


# A compiled graph may decompose and reorder fp32 reductions: a few ulp (measured: 0 for most aot_eager cases,
# 7.7e-8 for qk_norm_rope's backward, 1.9e-7 with inductor).
REORDER = 8 * torch.finfo(torch.float32).eps


def _assert_same(results: list[list[dict]], rtol: float = REORDER) -> None:
    """Per case: one graph, no break, compiled == eager within ``rtol``, the same outputs on every rank."""
    for case in results[0]:
        assert case["graphs"] == 1 and not case["breaks"], f"{case['name']}: {case['graphs']} graphs, {case['breaks']}"
        assert len(case["compiled"]) == len(case["eager"]) > 0, case["name"]
        for i, (c, e) in enumerate(zip(case["compiled"], case["eager"])):
            if c is None or e is None:  # a leaf the op does not use: no gradient either way
                assert c is None and e is None, f"{case['name']}[{i}]: a gradient only one way"
            else:
                assert rel_error(c, e) <= rtol, f"{case['name']}[{i}]: relative error {rel_error(c, e)} > {rtol}"
    for rank_cases in results[1:]:  # replicated outputs are identical on every rank
        for case, ref in zip(rank_cases, results[0]):
            if case.get("replicated", True):
                assert torch.equal(case["compiled"][0], ref["compiled"][0]), f"{case['name']}: ranks differ"


# --------------------------------------------------------------------------------------------------------------
# The ops: torch.library ops with fake implementations and registered autograd, on every backend
# --------------------------------------------------------------------------------------------------------------


def _op_cases(backend: str):
    """(name, the public op, its tensor arguments) on tiny odd shapes; head_dim 32 so the Triton kernels take them."""
    g = torch.Generator().manual_seed(0)
    B, S, H, D, K, M = 2, 5, 2, 32, 24, 20

    def rand(*shape, scale=1.0):
        return (scale * torch.randn(*shape, generator=g)).requires_grad_()

    cos, sin = rope_cos_sin(position_ids(2, S - 2), (8, 8, 8, 8), 2000.0)
    norm_w = [(1 + 0.1 * torch.randn(D, generator=g)).requires_grad_() for _ in range(4)]
    return [
        ("layernorm_modulate", lambda x, sh, sc: layernorm_modulate(x, sh, sc, 1e-6, backend=backend),
         (rand(B, S, 48), rand(B, 1, 48, scale=0.5), rand(B, 1, 48, scale=0.5))),
        ("qk_norm_rope", lambda q, k, qw, kw: qk_norm_rope(q, k, qw, kw, cos, sin, 1e-6, backend=backend),
         (torch.randn(B, H, S, D, generator=g).transpose(1, 2).requires_grad_(),  # a [B, H, S, D] buffer's view
          rand(B, S, H, D), norm_w[0], norm_w[1])),
        ("qk_norm_rope_joint", lambda q0, k0, v0, q1, k1, v1: qk_norm_rope_joint(
            (q0, q1), (k0, k1), (v0, v1), norm_w[:2], norm_w[2:], cos, sin, (1e-6, 1e-5), backend=backend),
         (rand(B, 2, H, D), rand(B, 2, H, D), rand(B, 2, H, D), rand(B, S - 2, H, D), rand(B, S - 2, H, D),
          rand(B, S - 2, H, D))),
        ("fused_qkv_mlp_proj", lambda x, w: fused_qkv_mlp_proj(x, w, norm_w[0], norm_w[1], cos, sin, H, D, M, 1e-6,
                                                               backend=backend),
         (rand(B, S, K), rand(3 * H * D + 2 * M, K, scale=0.2))),
        ("row_parallel_matmul", lambda a, m, w, gate, res: row_parallel_matmul([a, m], w, gate, res, True,
                                                                               backend=backend),
         (rand(B, S, 7), rand(B, S, 9), rand(K, 16), rand(B, K), rand(B, S, K))),
    ], norm_w


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_ops_compile_fullgraph_and_match_eager(backend):
    cases, norm_w = _op_cases(backend)
    results = []
    for name, fn, args in cases:
        graphs, breaks = _explain(fn, *args)
        eager = _fwd_bwd(fn, norm_w, args)
        torch._dynamo.reset()
        compiled = _fwd_bwd(torch.compile(fn, fullgraph=True, backend="aot_eager"), norm_w, args)
        results.append({"name": name, "graphs": graphs, "breaks": breaks, "eager": eager, "compiled": compiled})
    _assert_same([results])


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_ops_pass_opcheck(backend):
    """``torch.library.opcheck``: schema, fake implementation (shapes and strides) and registered autograd, for
    every op and backend (AOTAutograd is what the fullgraph tests exercise)."""
    cases, _ = _op_cases(backend)
    ops = torch.ops.tpfuse
    b = backend
    (_, _, ln), (_, _, qk), (_, _, joint), (_, _, proj), (_, _, rpm) = cases
    g = torch.Generator().manual_seed(1)
    qw, kw = (torch.randn(32, generator=g).requires_grad_() for _ in range(2))
    cos, sin = rope_cos_sin(position_ids(2, 3), (8, 8, 8, 8), 2000.0)
    checks = [
        (ops.layernorm_modulate.default, (*ln, 1e-6, b)),
        (ops.qk_norm_rope.default, (*qk[:2], qw, kw, cos, sin, 1e-6, b, True)),
        (ops.qk_norm_rope.default, (*qk[:2], qw, kw, None, None, 1e-6, b, False)),
        (ops.qk_norm_rope_joint.default, (*joint[:3], qw, kw, *joint[3:], qw, kw, cos, sin, 1e-6, 1e-5, b, True)),
        (ops.fused_qkv_mlp_proj.default, (*proj, qw, kw, cos, sin, 2, 32, 20, 1e-6, b)),
        (ops.row_parallel_matmul.default, ([rpm[0], rpm[1]], rpm[2], rpm[3], rpm[4], True, b)),
    ]
    for op, args in checks:
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


def test_backend_choice_has_no_side_effect_in_traced_code():
    """Eager calls are recorded; a compiled call is not (its choice was made once, at trace time), and compiles."""
    x, sh, sc = torch.randn(1, 3, 8), torch.randn(1, 8), torch.randn(1, 8)
    with record_backends() as events:
        layernorm_modulate(x, sh, sc)
    assert events == [("layernorm_modulate", "torch")]
    torch._dynamo.reset()
    fn = torch.compile(lambda *a: layernorm_modulate(*a), fullgraph=True, backend="aot_eager")
    with record_backends() as events:
        out = fn(x, sh, sc)
    assert events == [] and torch.equal(out, layernorm_modulate(x, sh, sc))


# --------------------------------------------------------------------------------------------------------------
# Layers, blocks and the model on 2 gloo ranks
# --------------------------------------------------------------------------------------------------------------


def _layers_rank():
    torch.manual_seed(0)
    ws = dist.get_world_size()
    cases = []
    x = torch.randn(2, 5, 16, requires_grad=True)
    col = ColumnParallelLinear.from_dense(torch.nn.Linear(16, 24))
    cases.append(_compiled_vs_eager("column", col, (x,), replicated=False))  # each rank's slice of the output
    with torch.no_grad():
        cases.append(_compiled_vs_eager("column no_grad", col, (x,), backward=False, replicated=False))
    gathered = ColumnParallelLinear.from_dense(torch.nn.Linear(16, 24, bias=False), gather_output=True,
                                               group=dist.device_mesh.init_device_mesh("cpu", (ws,)))
    cases.append(_compiled_vs_eager("column gather_output, DeviceMesh", gathered, (x,)))
    for overlap in (1, 3):
        row = RowParallelLinear.from_dense(torch.nn.Linear(24, 16), overlap=overlap)
        cases.append(_compiled_vs_eager(f"row overlap={overlap}", row, (torch.randn(2, 5, 24 // ws,
                                                                                    requires_grad=True),)))
        fused = torch.compile(row.forward_fused, fullgraph=True, backend="aot_eager")
        gate, res = torch.randn(2, 16, requires_grad=True), torch.randn(2, 5, 16, requires_grad=True)
        part = torch.randn(2, 5, 24 // ws, requires_grad=True)
        eager = _fwd_bwd(row.forward_fused, list(row.parameters()), ([part], gate, res))
        assert row.last_chunks == overlap  # eager calls record the chunk count
        row.last_chunks = None
        cases.append({"name": f"row forward_fused overlap={overlap}", "graphs": 1, "breaks": [], "eager": eager,
                      "compiled": _fwd_bwd(fused, list(row.parameters()), ([part], gate, res))})
        assert row.last_chunks is None  # the compiled call did not write the attribute
    # Several column layers on one input, with and without a bias: one op, one input-gradient all-reduce.
    dense = [torch.nn.Linear(16, 24, bias=False), torch.nn.Linear(16, 8)]
    pair = _ColumnPair([ColumnParallelLinear.from_dense(d) for d in dense])
    cases.append(_compiled_vs_eager("column_parallel_linear, mixed biases", pair, (x,), replicated=False))
    xd = x.detach().clone().requires_grad_()
    outs = pair(xd)
    rank = dist.get_rank()
    for out, d in zip(outs, dense):  # each rank's slice of the dense layer's output
        rows = d.out_features // ws
        assert torch.allclose(out, F.linear(x, d.weight, d.bias)[..., rank * rows:(rank + 1) * rows], atol=1e-6)
    sum(o.square().sum() for o in outs).backward()
    assert pair.layers[1].bias.grad is not None and xd.grad is not None
    scatter = RowParallelLinear.from_dense(torch.nn.Linear(24, 16, bias=False), input_is_parallel=False, overlap=2,
                                           group=dist.new_group(list(range(ws))))
    cases.append(_compiled_vs_eager("row input_is_parallel=False, subgroup", scatter,
                                    (torch.randn(2, 5, 24, requires_grad=True),)))
    return cases


class _ColumnPair(torch.nn.Module):
    def __init__(self, layers):
        super().__init__()
        self.layers = torch.nn.ModuleList(layers)

    def forward(self, x):
        return column_parallel_linear(x, list(self.layers))


def test_tp_linear_layers_compile_fullgraph():
    _assert_same(run_ranks(_layers_rank, WS))


def _blocks_rank():
    """TP blocks built from ours (the parallelized model below builds them from diffusers' blocks)."""
    cases = []
    for kind, cls in (("single", TPSingleStreamBlock), ("double", TPDoubleStreamBlock)):
        tp = cls.from_dense(random_dense_block(TINY, kind, seed=0))
        tensors, rope = block_inputs(TINY, kind, batch=2, txt_tokens=3, img_tokens=7, seed=1)
        cases.append(_compiled_vs_eager(f"TP {kind} block", tp, kwargs={**tensors, "image_rotary_emb": rope}))
    return cases


def test_tp_blocks_compile_fullgraph():
    _assert_same(run_ranks(_blocks_rank, WS))


def _model_inputs():
    g = torch.Generator().manual_seed(3)
    ids = position_ids(3, 7)
    return dict(hidden_states=torch.randn(1, 7, TINY.in_channels, generator=g).requires_grad_(),
                encoder_hidden_states=torch.randn(1, 3, TINY.joint_attention_dim, generator=g).requires_grad_(),
                timestep=torch.tensor([0.5]), img_ids=ids[3:], txt_ids=ids[:3], return_dict=False)


def _model_rank():
    # parallelize builds its TP blocks from diffusers' Flux2TransformerBlock / Flux2SingleTransformerBlock.
    model = parallelize(random_diffusers_model(TINY, seed=0))
    inputs = _model_inputs()
    cases = [_compiled_vs_eager("parallelized Flux2Transformer2DModel", model, kwargs=inputs)]
    # Regional compilation (diffusers' compile_repeated_blocks): each TP block compiled on its own, fullgraph.
    eager = cases[0]["eager"]
    torch._dynamo.reset()
    model.compile_repeated_blocks(fullgraph=True, backend="aot_eager")
    compiled = _fwd_bwd(model, list(model.parameters()), kwargs=inputs)
    blocks = [*model.transformer_blocks, *model.single_transformer_blocks]
    assert all(b._compiled_call_impl is not None for b in blocks)  # every TP block is a compiled region
    cases.append({"name": "compile_repeated_blocks", "graphs": 1, "breaks": [], "eager": eager, "compiled": compiled})
    return cases


def test_parallelized_model_compiles_fullgraph():
    pytest.importorskip("diffusers")
    _assert_same(run_ranks(_model_rank, WS))


def _inductor_rank():
    tp = TPSingleStreamBlock.from_dense(random_dense_block(TINY, "single", seed=0))
    tensors, rope = block_inputs(TINY, "single", batch=1, txt_tokens=3, img_tokens=5, seed=2)
    return [_compiled_vs_eager("single block, inductor", tp, kwargs={**tensors, "image_rotary_emb": rope},
                               backend="inductor", explain=False)]


def test_tp_block_compiles_with_inductor():
    _assert_same(run_ranks(_inductor_rank, WS))


def test_checkout_folder_imported_as_bare_kernels_registers_nothing():
    """Run from a checkout root, ``import kernels`` (transformers and diffusers probe Hugging Face's package by that
    name) finds tpfuse's source folder: it hands over to Hugging Face's package, and no tpfuse module is imported
    under that name (tpfuse's ops would be registered twice)."""
    import subprocess
    import sys
    from pathlib import Path

    code = ("import kernels, os, sys; import tpfuse.kernels, torch; here = os.path.join(os.getcwd(), 'kernels'); "
            "assert not (getattr(kernels, '__file__', None) or '').startswith(here + os.sep); "
            "assert not [n for n, m in sys.modules.items() if n.startswith('kernels.') "
            "and (getattr(m, '__file__', None) or '').startswith(here + os.sep)]; "
            "torch.ops.tpfuse.layernorm_modulate.default")
    proc = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[1], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
