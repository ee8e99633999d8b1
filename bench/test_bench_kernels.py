"""pytest-benchmark entry point: ``pytest bench/test_bench_kernels.py --benchmark-only`` (GPU: klein-4B TP 2
shapes, bf16; CPU: tiny shapes with the torch backend). The full sweep with roofline ratios is
``python bench/bench_kernels.py``."""

import pytest
import torch

from tpfuse.kernels import fused_qkv_mlp_proj, layernorm_modulate, qk_norm_rope
from tpfuse.tp_layers import Flux2Config, rope_cos_sin
from tpfuse.tp_layers.verify import position_ids

CUDA = torch.cuda.is_available()
DEV, DTYPE = ("cuda", torch.bfloat16) if CUDA else ("cpu", torch.float32)
CFG = Flux2Config.preset("klein-4b") if CUDA else Flux2Config(num_attention_heads=4, attention_head_dim=32,
                                                               axes_dims_rope=(8, 8, 8, 8))
TP, TOKENS = (2, 4608) if CUDA else (2, 64)


def _sync(fn):
    def run():
        out = fn()
        if CUDA:
            torch.cuda.synchronize()
        return out
    return run


@pytest.fixture(scope="module")
def inputs():
    heads, d, hidden, mlp = CFG.heads // TP, CFG.head_dim, CFG.hidden_size, CFG.mlp_hidden // TP
    cos, sin = (t.to(DEV) for t in rope_cos_sin(position_ids(512 if CUDA else 16, TOKENS - (512 if CUDA else 16)),
                                                 CFG.axes_dims_rope, CFG.rope_theta))
    x = torch.randn(1, TOKENS, hidden, device=DEV, dtype=DTYPE)
    w = torch.randn(3 * heads * d + 2 * mlp, hidden, device=DEV, dtype=DTYPE) * hidden ** -0.5
    nw = torch.ones(d, device=DEV, dtype=DTYPE)
    q = torch.randn(1, TOKENS, heads, d, device=DEV, dtype=DTYPE)
    return dict(heads=heads, d=d, mlp=mlp, cos=cos, sin=sin, x=x, w=w, nw=nw, q=q)


def test_fused_qkv_mlp_proj(benchmark, inputs):
    i = inputs
    benchmark(_sync(lambda: fused_qkv_mlp_proj(i["x"], i["w"], i["nw"], i["nw"], i["cos"], i["sin"], i["heads"],
                                               i["d"], i["mlp"])))


def test_qk_norm_rope(benchmark, inputs):
    i = inputs
    benchmark(_sync(lambda: qk_norm_rope(i["q"], i["q"], i["nw"], i["nw"], i["cos"], i["sin"])))


def test_layernorm_modulate(benchmark, inputs):
    x = inputs["x"]
    mod = torch.zeros(1, x.shape[-1], device=DEV, dtype=DTYPE)
    benchmark(_sync(lambda: layernorm_modulate(x, mod, mod)))
