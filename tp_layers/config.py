"""FLUX.2 transformer configuration and the published presets.

Field names follow diffusers' ``Flux2Transformer2DModel`` config keys, so ``Flux2Config(**diffusers_config)``
(minus unknown keys, see :meth:`Flux2Config.from_dict`) round-trips.

Preset values: diffusers' ``scripts/convert_flux2_to_diffusers.py`` (``get_flux2_transformer_config``) and BFL's
``Flux2Params`` / ``Klein4BParams`` / ``Klein9BParams``; the ``dev`` preset equals the
``Flux2Transformer2DModel.__init__`` defaults of diffusers 0.42 (checked by a test).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

__all__ = ["Flux2Config", "PRESETS", "preset_shapes"]


@dataclass(frozen=True)
class Flux2Config:
    num_attention_heads: int = 48
    attention_head_dim: int = 128
    num_layers: int = 8  # double-stream blocks
    num_single_layers: int = 48
    mlp_ratio: float = 3.0
    axes_dims_rope: tuple[int, ...] = (32, 32, 32, 32)
    rope_theta: int = 2000
    eps: float = 1e-6
    in_channels: int = 128
    joint_attention_dim: int = 15360
    timestep_guidance_channels: int = 256
    guidance_embeds: bool = True
    patch_size: int = 1
    out_channels: int | None = None
    name: str = field(default="custom", compare=False)

    def __post_init__(self):
        object.__setattr__(self, "axes_dims_rope", tuple(int(a) for a in self.axes_dims_rope))
        if self.num_attention_heads <= 0 or self.attention_head_dim <= 0:
            raise ValueError(f"heads ({self.num_attention_heads}) and head_dim ({self.attention_head_dim}) "
                             "must be positive")
        if self.attention_head_dim % 2:
            raise ValueError(f"attention_head_dim={self.attention_head_dim} must be even for RoPE pairs")
        if sum(self.axes_dims_rope) != self.attention_head_dim:
            raise ValueError(f"axes_dims_rope {self.axes_dims_rope} sum to {sum(self.axes_dims_rope)}, "
                             f"not attention_head_dim={self.attention_head_dim}")
        if any(a % 2 for a in self.axes_dims_rope):
            raise ValueError(f"every RoPE axis must be even, got axes_dims_rope={self.axes_dims_rope}")

    # Derived sizes -------------------------------------------------------------------------------------------
    @property
    def hidden_size(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def heads(self) -> int:
        return self.num_attention_heads

    @property
    def head_dim(self) -> int:
        return self.attention_head_dim

    @property
    def mlp_hidden(self) -> int:
        """Width of one SwiGLU half (gate or up): ``int(hidden * mlp_ratio)`` as diffusers computes it."""
        return int(self.hidden_size * self.mlp_ratio)

    # Construction --------------------------------------------------------------------------------------------
    @classmethod
    def preset(cls, name: str) -> Flux2Config:
        try:
            return PRESETS[name]
        except KeyError:
            raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}") from None

    @classmethod
    def from_dict(cls, config: dict) -> Flux2Config:
        """From a diffusers ``config.json`` dict (keys starting with ``_`` and unknown keys are ignored)."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in config.items() if k in names})

    def to_diffusers_kwargs(self) -> dict:
        """Keyword arguments for ``diffusers.Flux2Transformer2DModel(**kwargs)``."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "name"}


PRESETS: dict[str, Flux2Config] = {
    "dev": Flux2Config(name="dev"),
    "klein-4b": Flux2Config(
        name="klein-4b", num_attention_heads=24, num_layers=5, num_single_layers=20,
        joint_attention_dim=7680, guidance_embeds=False,
    ),
    "klein-9b": Flux2Config(
        name="klein-9b", num_attention_heads=32, num_layers=8, num_single_layers=24,
        joint_attention_dim=12288, guidance_embeds=False,
    ),
    # Not a published model: the smallest shape with every structural feature (4 heads so 1, 2 and 4 ranks
    # split them; 4 RoPE axes), for tests and quick CPU runs.
    "tiny": Flux2Config(
        name="tiny", num_attention_heads=4, attention_head_dim=16, num_layers=1, num_single_layers=1,
        axes_dims_rope=(4, 4, 4, 4), in_channels=8, joint_attention_dim=32, timestep_guidance_channels=16,
        guidance_embeds=False,
    ),
}


def preset_shapes(presets, tps, token_pairs):
    """``(label, config, tp, text tokens, image tokens)`` for every preset x TP degree that divides its heads and
    MLP width x (text, image) token pair: the sweep the compile report and the benchmarks share."""
    for name in presets:
        cfg = Flux2Config.preset(name)
        for tp in tps:
            if cfg.heads % tp or cfg.mlp_hidden % tp:
                continue
            for txt, img in token_pairs:
                yield f"{name} tp{tp} {txt}+{img}", cfg, tp, txt, img
