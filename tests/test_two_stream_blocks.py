"""The two-stream blocks end to end on the Triton path (interpreter, fp32) at 2 gloo ranks: the forward of a TP
FLUX.2 double block and of a TP Qwen-Image block launches no top-level matmul or activation op (the projections
and activations are epilogues of tpfuse's fused ops), at most 2 row-parallel reductions, and equals diffusers'
dense block (output, input gradients, weight-gradient shards) to the fp32 tolerance, identically on every rank.
FLUX.3's blocks, whose modulation is per token, stay on the same fused path (one reduction each)."""

import os

import pytest
import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode

from tpfuse.tp_layers import comm_stats, run_ranks
from tpfuse.tp_layers.numerics import rel_error, tolerance
from tpfuse.tp_layers.sharding import shard_tensor

pytest.importorskip("diffusers")
TOL = tolerance(torch.float32)
B, TXT, IMG = 2, 5, 37  # odd token counts: ragged row tiles in both streams
MATMULS = {"mm", "addmm", "bmm", "matmul", "linear", "baddbmm", "addmv", "mv"}
ACTIVATIONS = {"silu", "gelu", "sigmoid", "tanh", "silu_", "gelu_"}


class _OpCounter(TorchDispatchMode):
    """Top-level ops (a custom op's insides run below the mode): name -> [input shapes of each call]."""

    def __init__(self):
        super().__init__()
        self.calls: dict[str, list] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = f"{func.namespace}::{func._schema.name.split('::')[-1]}"
        shapes = [tuple(a.shape) for a in args if isinstance(a, torch.Tensor)]
        self.calls.setdefault(name, []).append(shapes)
        return func(*args, **(kwargs or {}))


def _check(dense, tp, inputs, batch_rows):
    """(errors, op counts, forward all-reduces, outputs) of ``tp`` against ``dense`` on the same inputs."""
    rank, ws = dist.get_rank(), dist.get_world_size()
    leaves = {k: v for k, v in inputs.items() if isinstance(v, torch.Tensor) and v.is_floating_point()}

    def run(block):
        for t in leaves.values():
            t.grad = None
        outs = block(**inputs)
        outs = list(outs) if isinstance(outs, (tuple, list)) else [outs]
        gen = torch.Generator().manual_seed(5)
        torch.autograd.backward(outs, [torch.randn(o.shape, generator=gen) for o in outs])
        return [o.detach() for o in outs], {k: t.grad.clone() for k, t in leaves.items()}

    ref, ref_grads = run(dense)
    dense_w = {n: p.grad for n, p in dense.named_parameters() if p.grad is not None}
    with torch.no_grad():
        tp(**inputs)  # the first call checks the inputs across ranks (an all-gather): not counted
    with _OpCounter() as ops, comm_stats() as stats:
        with torch.no_grad():
            tp(**inputs)
    out, grads = run(tp)
    errors = {f"out{i}": rel_error(o, r) for i, (o, r) in enumerate(zip(out, ref))}
    errors |= {f"grad.{k}": rel_error(grads[k], ref_grads[k]) for k in ref_grads}
    for name, p in tp.named_parameters():
        ref_w = dense_w[name]
        if ref_w.shape != p.shape:  # this rank's shard of the dense gradient
            owner = tp.get_submodule(name.rsplit(".", 1)[0])
            ref_w = shard_tensor(ref_w, owner.split_dim(name.rsplit(".", 1)[1]), rank, ws, owner.blocks)
        errors[f"wgrad.{name}"] = rel_error(p.grad, ref_w)
    def on_tokens(shapes):  # an op on token rows, not on the [B, D] timestep embedding (Qwen's adaLN)
        return not (shapes and len(shapes[0]) == 2 and shapes[0][0] == batch_rows)

    matmuls = [(k, s) for k, calls in ops.calls.items() if k.split("::")[1] in MATMULS for s in calls
               if on_tokens(s)]
    acts = [(k, s) for k, calls in ops.calls.items() if k.split("::")[1] in ACTIVATIONS for s in calls
            if on_tokens(s)]
    tpfuse_ops = sorted(k for k in ops.calls if k.startswith("tpfuse::"))
    return errors, matmuls, acts, tpfuse_ops, stats.count("all_reduce", "forward"), out


def _flux2(_=None):
    from diffusers.models.transformers.transformer_flux2 import Flux2TransformerBlock

    from tpfuse.tp_layers import Flux2Config, TPDoubleStreamBlock
    from tpfuse.tp_layers.verify import block_inputs, random_dense_block

    os.environ["TPFUSE_BACKEND"] = "triton"
    cfg = Flux2Config(num_attention_heads=4, attention_head_dim=32, axes_dims_rope=(8, 8, 8, 8), num_layers=1,
                      num_single_layers=1, in_channels=8, joint_attention_dim=16, name="head32")
    dense = Flux2TransformerBlock(cfg.hidden_size, cfg.heads, cfg.head_dim, cfg.mlp_ratio, cfg.eps)
    dense.load_state_dict(random_dense_block(cfg, "double", seed=0).state_dict())
    tensors, rope = block_inputs(cfg, "double", B, TXT, IMG, seed=3, dtype=torch.float32)
    tp = TPDoubleStreamBlock.from_dense(dense)
    return _check(dense, tp, {**tensors, "image_rotary_emb": rope}, None)


def _qwen(_=None):
    import copy

    from diffusers.models.transformers.transformer_qwenimage import QwenImageTransformerBlock

    from tpfuse.tp_layers.qwenimage.tp_blocks import shard_block
    from tpfuse.tp_layers.tp_attention import perturb_norms

    os.environ["TPFUSE_BACKEND"] = "triton"
    torch.manual_seed(0)
    dense = QwenImageTransformerBlock(dim=64, num_attention_heads=2, attention_head_dim=32).eval()
    perturb_norms(dense)
    g = torch.Generator().manual_seed(3)
    mask = torch.ones(B, TXT, dtype=torch.bool)
    mask[1, -2:] = False  # padded text in one batch entry
    img_f = torch.polar(torch.ones(IMG, 16), torch.rand(IMG, 16, generator=g) * 6.28)
    txt_f = torch.polar(torch.ones(TXT, 16), torch.rand(TXT, 16, generator=g) * 6.28)
    inputs = dict(hidden_states=torch.randn(B, IMG, 64, generator=g).requires_grad_(),
                  encoder_hidden_states=torch.randn(B, TXT, 64, generator=g).requires_grad_(),
                  encoder_hidden_states_mask=mask, temb=torch.randn(B, 64, generator=g).requires_grad_(),
                  image_rotary_emb=(img_f, txt_f))
    tp = shard_block(copy.deepcopy(dense))
    return _check(dense, tp, inputs, B)


def _flux3(_=None):
    """FLUX.3's mode block and joint single block, with per-token modulation ([B, S, 3D]) and RoPE."""
    import copy

    from diffusers.models.transformers.transformer_flux3 import (Flux3ModeTransformerBlock,
                                                                  Flux3SingleTransformerBlock)

    from tpfuse.tp_layers.flux3.tp_blocks import shard_block
    from tpfuse.tp_layers.tp_attention import perturb_norms

    os.environ["TPFUSE_BACKEND"] = "triton"
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(3)
    ang = torch.rand(TXT + IMG, 16, generator=g) * 6.28
    rope = (ang.cos().repeat_interleave(2, -1), ang.sin().repeat_interleave(2, -1))  # [S, 32], pairs
    out = []
    for cls in (Flux3ModeTransformerBlock, Flux3SingleTransformerBlock):
        dense = cls(dim=64, num_attention_heads=2, attention_head_dim=32).eval()
        perturb_norms(dense)
        if cls is Flux3ModeTransformerBlock:
            inputs = dict(hidden_states=torch.randn(B, TXT + IMG, 64, generator=g).requires_grad_(),
                          temb_mod=(0.5 * torch.randn(B, TXT + IMG, 192, generator=g)).requires_grad_(),
                          image_rotary_emb=rope)
        else:
            inputs = dict(hidden_states=torch.randn(B, IMG, 64, generator=g).requires_grad_(),
                          encoder_hidden_states=torch.randn(B, TXT, 64, generator=g).requires_grad_(),
                          temb_mod=(0.5 * torch.randn(B, IMG, 192, generator=g)).requires_grad_(),
                          temb_mod_context=(0.5 * torch.randn(B, TXT, 192, generator=g)).requires_grad_(),
                          image_rotary_emb=rope)
        tp = shard_block(copy.deepcopy(dense))
        out.append(_check(dense, tp, inputs, None))
    return out


CASES = {"flux2": (_flux2, {"tpfuse::joint_qkv_proj", "tpfuse::fused_linear_act"}, 2),
         "qwenimage": (_qwen, {"tpfuse::joint_qkv_proj", "tpfuse::fused_linear_act"}, 2),
         # per-token modulation: layernorm_modulate and the gated reduce take [B, S, D] on the fused path
         "flux3": (_flux3, {"tpfuse::fused_qkv_mlp_proj"}, 1)}


@pytest.mark.parametrize("family", ["flux2", "qwenimage", "flux3"])
def test_two_stream_block_runs_fused_ops_only_and_matches_diffusers(family):
    from tpfuse.kernels._dispatch import interpreting

    if not (interpreting() or torch.cuda.is_available()):
        pytest.skip("needs TRITON_INTERPRET=1 or a GPU")
    fn, expected, max_reduces = CASES[family]
    results = run_ranks(fn, 2)
    if family == "flux3":  # two blocks per rank: mode, single
        results = [r for rank in results for r in rank]
    for errors, matmuls, acts, tpfuse_ops, reduces, _ in results:
        bad = {k: v for k, v in errors.items() if not v <= TOL}
        assert not bad, f"relative errors above {TOL}: {bad}"
        # Qwen-Image's adaLN modulation (silu, then temb [B, D] -> [B, 6D]) is all that is left: B rows, no tokens.
        assert not matmuls, f"top-level matmuls on token rows: {matmuls}"
        assert not acts, f"standalone activation ops: {acts}"
        assert expected | {"tpfuse::joint_row_parallel_linear", "tpfuse::layernorm_modulate"} <= set(tpfuse_ops), \
            tpfuse_ops
        assert reduces <= max_reduces, reduces
    outs = [r[-1] for r in results]
    per_rank = len(outs) // 2
    assert all(torch.equal(a, b) for i in range(per_rank)  # identical on every rank
               for a, b in zip(outs[per_rank + i], outs[i]))
