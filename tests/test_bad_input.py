"""Bad input gets a clear exception naming the offending value, never a silent wrong answer."""

import pytest
import torch
from torch import nn

from tpfuse.tp_layers import (
    Flux2Config,
    RankError,
    TPDoubleStreamBlock,
    TPSingleStreamBlock,
    run_ranks,
)
from tpfuse.tp_layers.verify import block_inputs, random_dense_block

TINY = Flux2Config.preset("tiny")


def _shard(kind, cfg):
    block = random_dense_block(cfg, kind, seed=0)
    (TPDoubleStreamBlock if kind == "double" else TPSingleStreamBlock).from_dense(block)


@pytest.mark.parametrize("kind", ["single", "double"])
def test_heads_not_divisible_by_world_size(kind):
    with pytest.raises(RankError, match="cannot shard across 3 ranks: heads=4 not divisible by the world size"):
        run_ranks(_shard, 3, kind, TINY)


@pytest.mark.parametrize("kind", ["single", "double"])
def test_mlp_width_not_divisible_by_world_size(kind):
    cfg = Flux2Config(num_attention_heads=4, attention_head_dim=16, axes_dims_rope=(4, 4, 4, 4),
                      mlp_ratio=194 / 64, num_layers=1, num_single_layers=1)
    assert cfg.mlp_hidden == 194
    with pytest.raises(RankError, match="mlp_hidden=194 not divisible by the world size"):
        run_ranks(_shard, 4, kind, cfg)


def test_wrong_block_type():
    single = random_dense_block(TINY, "single", seed=0)
    double = random_dense_block(TINY, "double", seed=0)
    with pytest.raises(TypeError, match="got torch.nn.modules.linear.Linear"):
        TPSingleStreamBlock.from_dense(nn.Linear(4, 4))
    with pytest.raises(TypeError, match="TPSingleStreamBlock.from_dense expects one of .*got .*DoubleStreamBlock"):
        TPSingleStreamBlock.from_dense(double)
    with pytest.raises(TypeError, match="TPDoubleStreamBlock.from_dense expects one of .*SingleStreamBlock"):
        TPDoubleStreamBlock.from_dense(single)
    with pytest.raises(TypeError, match="got tpfuse.tp_layers.tp_flux2.TPSingleStreamBlock"):
        TPSingleStreamBlock.from_dense(TPSingleStreamBlock.from_dense(single))


def test_missing_weights():
    single = random_dense_block(TINY, "single", seed=0)
    single.attn.norm_q = nn.RMSNorm(TINY.head_dim, elementwise_affine=False)
    with pytest.raises(ValueError, match=r"missing weights \['attn.norm_q.weight'\]"):
        TPSingleStreamBlock.from_dense(single)
    double = random_dense_block(TINY, "double", seed=0)
    del double.ff_context.linear_out.weight
    double.ff_context.linear_out.register_parameter("weight", None)
    double.attn.norm_added_k = nn.RMSNorm(TINY.head_dim, elementwise_affine=False)
    with pytest.raises(ValueError, match=r"missing weights \['attn.norm_added_k.weight', "
                                         r"'ff_context.linear_out.weight'\]"):
        TPDoubleStreamBlock.from_dense(double)


@pytest.mark.parametrize("tp", [False, True], ids=["dense", "tp"])
@pytest.mark.parametrize("kind", ["single", "double"])
def test_input_dtype_device_shape(kind, tp):
    block = random_dense_block(TINY, kind, seed=0)
    if tp:
        block = (TPDoubleStreamBlock if kind == "double" else TPSingleStreamBlock).from_dense(block)
    tensors, rope = block_inputs(TINY, kind, 1, 3, 5, seed=0)
    tensors = {k: v.detach() for k, v in tensors.items()}

    def call(**override):
        return block(**{**tensors, **override}, image_rotary_emb=rope)

    with pytest.raises(TypeError, match="hidden_states has dtype torch.float64 but the block's weights are "
                                        "torch.float32"):
        call(hidden_states=tensors["hidden_states"].double())
    with pytest.raises(ValueError, match="encoder_hidden_states is on meta but the block's weights are on cpu"):
        call(encoder_hidden_states=tensors["encoder_hidden_states"].to("meta"))
    with pytest.raises(ValueError, match=r"hidden_states must be \[B, S, 64\], got shape \(1, 5, 32\)"):
        call(hidden_states=tensors["hidden_states"][..., :32])
    mod_name = "temb_mod" if kind == "single" else "temb_mod_img"
    with pytest.raises(ValueError, match=rf"{mod_name} must be \[B, \d+\], \[B, 1, \d+\] or per token \[B, \d+, \d+\], "
                                         r"got shape \(1, 10\)"):
        call(**{mod_name: torch.zeros(1, 10)})
    with pytest.raises(TypeError, match=f"{mod_name} has dtype torch.float16"):
        call(**{mod_name: tensors[mod_name].half()})
    with pytest.raises(ValueError, match=r"unsupported joint_attention_kwargs \['scale'\]"):
        call(joint_attention_kwargs={"scale": 1.0})
    call(joint_attention_kwargs={"kv_cache": None, "kv_cache_mode": None})  # what the model passes by default


def test_config_errors():
    with pytest.raises(ValueError, match=r"unknown preset 'klein-7b'; choose one of \['dev', 'klein-4b'"):
        Flux2Config.preset("klein-7b")
    with pytest.raises(ValueError, match=r"axes_dims_rope \(4, 4, 4\) sum to 12, not attention_head_dim=16"):
        Flux2Config(num_attention_heads=2, attention_head_dim=16, axes_dims_rope=(4, 4, 4))
    with pytest.raises(ValueError, match="attention_head_dim=15 must be even"):
        Flux2Config(num_attention_heads=2, attention_head_dim=15, axes_dims_rope=(15,))
    with pytest.raises(ValueError, match="every RoPE axis must be even"):
        Flux2Config(num_attention_heads=2, attention_head_dim=16, axes_dims_rope=(5, 5, 6))
    with pytest.raises(ValueError, match="must be positive"):
        Flux2Config(num_attention_heads=0)
