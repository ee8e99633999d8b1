"""Presets against the published FLUX.2 configurations and diffusers' model."""

import inspect

import pytest
import torch

from tpfuse.tp_layers import PRESETS, Flux2Config

# (heads, double blocks, single blocks, joint_attention_dim, guidance, published parameter count in billions)
PUBLISHED = {
    "klein-4b": (24, 5, 20, 7680, False, 4),
    "klein-9b": (32, 8, 24, 12288, False, 9),
    "dev": (48, 8, 48, 15360, True, 32),
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_published_presets(name):
    cfg = Flux2Config.preset(name)
    heads, double, single, joint, guidance, _ = PUBLISHED[name]
    assert (cfg.heads, cfg.num_layers, cfg.num_single_layers, cfg.joint_attention_dim) == (heads, double, single,
                                                                                         joint)
    assert cfg.guidance_embeds is guidance
    assert cfg.head_dim == 128 and cfg.hidden_size == 128 * heads
    assert cfg.mlp_ratio == 3.0 and cfg.mlp_hidden == 3 * cfg.hidden_size
    assert cfg.axes_dims_rope == (32, 32, 32, 32) and cfg.rope_theta == 2000 and cfg.eps == 1e-6
    assert cfg.in_channels == 128 and cfg.name == name


def test_hidden_sizes():
    assert [Flux2Config.preset(n).hidden_size for n in ("klein-4b", "klein-9b", "dev")] == [3072, 4096, 6144]


def test_dev_preset_is_diffusers_default():
    diffusers = pytest.importorskip("diffusers")
    sig = inspect.signature(diffusers.Flux2Transformer2DModel.__init__)
    defaults = {k: p.default for k, p in sig.parameters.items() if p.default is not inspect.Parameter.empty}
    assert Flux2Config.from_dict(defaults) == Flux2Config.preset("dev")


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_presets_build_the_published_model_size(name):
    """Built on the meta device, diffusers' model from each preset has the published parameter count."""
    diffusers = pytest.importorskip("diffusers")
    cfg = Flux2Config.preset(name)
    with torch.device("meta"):
        model = diffusers.Flux2Transformer2DModel(**cfg.to_diffusers_kwargs())
    billions = sum(p.numel() for p in model.parameters()) / 1e9
    assert round(billions) == PUBLISHED[name][-1], billions
    assert Flux2Config.from_dict(dict(model.config)) == cfg


def test_tiny_shards_on_1_2_4_ranks():
    tiny = PRESETS["tiny"]
    assert all(tiny.heads % n == 0 and tiny.mlp_hidden % n == 0 for n in (1, 2, 4))
