"""FLUX.2 transformer configuration and the published presets.

Field names follow diffusers' ``Flux2Transformer2DModel`` config keys, so ``Flux2Config(**diffusers_config)``
(minus unknown keys, see :meth:`Flux2Config.from_dict`) round-trips.

Preset values: diffusers' ``scripts/convert_flux2_to_diffusers.py`` (``get_flux2_transformer_config``) and BFL's
``Flux2Params`` / ``Klein4BParams`` / ``Klein9BParams``; the ``dev`` preset equals the
``Flux2Transformer2DModel.__init__`` defaults of diffusers 0.42 (checked by a test).
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass, field

from .._checks import json_kind

__all__ = ["Flux2Config", "PRESETS", "preset_shapes"]

_CLASS_NAME = "Flux2Transformer2DModel"


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)  # True is an int to Python


def _is_number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _field_problems(values: Mapping) -> list[str]:
    """Every field of ``values`` (diffusers' ``Flux2Transformer2DModel.__init__`` arguments; absent ones take its
    defaults) that cannot build the model, as ``"field=value must ..."`` lines. diffusers itself checks none of
    them: a string or negative head count, a float layer count, a null ``guidance_embeds`` fail deep inside torch
    or build a different model silently (``out_channels=0`` means ``in_channels``, ``num_layers=True`` one block)."""
    problems = []
    good = {f.name: f.default for f in dataclasses.fields(Flux2Config)}  # valid values, for the cross-field checks

    def check(name: str, ok, want: str, *, in_range=lambda v: True, range_want: str = "") -> None:
        if name not in values:
            return
        v = values[name]
        if not ok(v):
            problems.append(f"{name}={v!r} must be {want}, not {json_kind(v)}")
            good.pop(name, None)
        elif not in_range(v):
            problems.append(f"{name}={v!r} must be {range_want}")
            good.pop(name, None)
        else:
            good[name] = v

    for name in ("patch_size", "in_channels", "num_attention_heads", "attention_head_dim", "joint_attention_dim",
                 "timestep_guidance_channels"):
        check(name, _is_int, "an int", in_range=lambda v: v > 0, range_want="positive")
    for name in ("num_layers", "num_single_layers"):
        check(name, _is_int, "an int", in_range=lambda v: v >= 0, range_want=">= 0")
    check("out_channels", lambda v: v is None or _is_int(v), "an int or null", in_range=lambda v: v is None or v > 0,
          range_want="positive or null (diffusers reads 0 as in_channels)")
    for name in ("mlp_ratio", "rope_theta"):  # JSON's NaN and Infinity parse to floats
        check(name, _is_number, "a number", in_range=lambda v: math.isfinite(v) and v > 0,
              range_want="positive and finite")
    check("eps", _is_number, "a number", in_range=lambda v: math.isfinite(v) and v >= 0, range_want="finite and >= 0")
    check("guidance_embeds", lambda v: isinstance(v, bool), "true or false")
    if "axes_dims_rope" in values:
        axes = values["axes_dims_rope"]
        if not isinstance(axes, (list, tuple)):
            problems.append(f"axes_dims_rope={axes!r} must be a list of ints, not {json_kind(axes)}")
            good.pop("axes_dims_rope")
        elif not all(_is_int(a) and a >= 0 for a in axes):
            problems.append(f"axes_dims_rope={axes!r} must be a list of ints >= 0")
            good.pop("axes_dims_rope")
        else:
            good["axes_dims_rope"] = tuple(int(a) for a in axes)
    if "attention_head_dim" in good:
        head_dim = good["attention_head_dim"]
        if head_dim % 2:
            problems.append(f"attention_head_dim={head_dim} must be even for RoPE pairs")
        axes = good.get("axes_dims_rope")
        if axes is not None and sum(axes) != head_dim:
            problems.append(f"axes_dims_rope {axes} sum to {sum(axes)}, not attention_head_dim={head_dim}")
    if good.get("axes_dims_rope") is not None and any(a % 2 for a in good["axes_dims_rope"]):
        problems.append(f"every RoPE axis must be even, got axes_dims_rope={good['axes_dims_rope']}")
    if all(k in good for k in ("num_attention_heads", "attention_head_dim", "mlp_ratio")):
        hidden = good["num_attention_heads"] * good["attention_head_dim"]
        if int(hidden * good["mlp_ratio"]) < 1:
            problems.append(f"mlp_ratio={good['mlp_ratio']!r} gives an MLP width of int({hidden} * "
                            f"{good['mlp_ratio']!r}) = 0")
    return problems


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
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "name"}
        problems = _field_problems(values)
        if problems:
            raise ValueError("invalid Flux2Config: " + "; ".join(problems))
        object.__setattr__(self, "axes_dims_rope", tuple(int(a) for a in self.axes_dims_rope))

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
    def validate_dict(cls, config, source: str = "config") -> None:
        """Raise one ``ValueError`` naming ``source`` (e.g. the ``config.json`` path) and listing every problem of
        a diffusers ``Flux2Transformer2DModel`` config dict: not a dict, a ``_class_name`` of another model, no
        field of this model at all, and each field whose type or range cannot build the model (positive ints for
        heads, head dim, channels and dims, ints >= 0 for layer counts, positive ``mlp_ratio``/``rope_theta``,
        ``axes_dims_rope`` even ints summing to the head dim, a bool ``guidance_embeds``, ...). Absent fields take
        diffusers' defaults, as in ``from_config``; unknown keys and ``_``-keys are left alone."""
        if not isinstance(config, Mapping):
            # diffusers' from_config takes a non-dict for a Hub repo id: a "couldn't connect" error for a local file.
            raise ValueError(f"{source}: a FLUX.2 transformer config must be a JSON object, not {json_kind(config)}")
        problems = []
        class_name = config.get("_class_name", _CLASS_NAME)
        if class_name != _CLASS_NAME:
            problems.append(f"_class_name={class_name!r}: the config of another model (tpfuse loads {_CLASS_NAME})")
        fields = [f.name for f in dataclasses.fields(cls) if f.name != "name"]
        if not any(k in config for k in fields):
            problems.append(f"none of {_CLASS_NAME}'s fields {fields} is set (diffusers' config.json has them all)")
        problems += _field_problems({k: v for k, v in config.items() if k in fields})
        if problems:
            raise ValueError(f"{source}: invalid FLUX.2 transformer config:\n  " + "\n  ".join(problems))

    @classmethod
    def from_dict(cls, config: dict, source: str = "config") -> Flux2Config:
        """From a diffusers ``config.json`` dict (keys starting with ``_`` and unknown keys are ignored), checked by
        :meth:`validate_dict` (``source`` names it in the error)."""
        cls.validate_dict(config, source)
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
