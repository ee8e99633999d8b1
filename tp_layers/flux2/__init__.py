"""The FLUX.2 family (diffusers' ``Flux2Transformer2DModel``, BFL's FLUX.2 checkpoints).

* :mod:`.blocks` — the dense blocks in plain torch (the reference), diffusers-compatible names and processors;
* :mod:`.tp_blocks` — their tensor-parallel versions with the fused kernels;
* :mod:`.config` — ``Flux2Config`` and the published presets; :mod:`.presets_table` — per-rank sizes;
* :mod:`.keymap` — BFL's original checkpoint keys -> diffusers';
* :mod:`.family` — the plan registered in :mod:`tpfuse.tp_layers.families`.

The dense blocks' names stay importable from here, as before the family sub-packages existed
(``from tpfuse.tp_layers.flux2 import DoubleStreamBlock``).
"""

from .blocks import (
    BatchMismatchError,
    DoubleStreamBlock,
    FeedForward,
    JointAttention,
    JointAttnProcessor,
    SingleAttnProcessor,
    SingleStreamAttention,
    SingleStreamBlock,
    apply_rope,
    attention,
    modulate,
    rope_cos_sin,
    split_modulation,
    swiglu,
)
from .config import PRESETS, Flux2Config

__all__ = ["BatchMismatchError", "DoubleStreamBlock", "FeedForward", "Flux2Config", "JointAttention",
           "JointAttnProcessor", "PRESETS", "SingleAttnProcessor", "SingleStreamAttention", "SingleStreamBlock",
           "apply_rope", "attention", "modulate", "rope_cos_sin", "split_modulation", "swiglu"]
