"""The registry of model families: what :func:`~tpfuse.tp_layers.parallelize`, ``from_pretrained``, the loader and
the consistency checks dispatch on.

A family is a sub-package (``tpfuse.tp_layers.flux2``, ``.qwenimage``, ``.flux3``) holding its plan (which blocks
are sharded and how, which sizes the world size must divide), its TP blocks, its checkpoint key maps and its config
checks, described by one :class:`Family` object. The core (communication, parallel linears, loading, saving, LoRA
sharding, consistency checks) knows no family: it asks the registry. A new family is one new sub-package plus one
line in :data:`_BUILTIN` (or a :func:`register_family` call from outside tpfuse). Families are imported on first
use, so ``import tpfuse.tp_layers`` imports neither diffusers nor any family's blocks.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from torch import nn

__all__ = ["Family", "OriginalFormat", "UnsupportedModelError", "families", "family_for_class", "family_named",
           "family_of", "original_format", "register_family", "supported_classes"]


@dataclasses.dataclass(frozen=True)
class OriginalFormat:
    """A family's original (non-diffusers) checkpoint key names, read directly by the sharded loader."""

    name: str  # what LoadReport.key_format says, e.g. "bfl"
    detect: Callable[[Iterable[str]], bool]  # whether a checkpoint's keys are in this format
    # key, shape -> [(diffusers name, Source)] (a fused tensor may give several), or None for a key it does not know
    to_diffusers: Callable[[str, Sequence[int]], list | None]


@dataclasses.dataclass(frozen=True)
class Family:
    """How one model family is sharded. Everything here is data or a small function of the dense model."""

    name: str  # "flux2": what `tpfuse verify --family` and error messages say
    model_classes: tuple[str, ...]  # diffusers' class names this family parallelizes
    diffusers_class: str  # "module:Class" that from_pretrained builds from a config
    # Dotted paths of the model's nn.ModuleLists of blocks, each with the function that shards one of its blocks:
    # (dense block, group) -> TP block.
    block_lists: tuple[tuple[str, Callable[[nn.Module, Any], nn.Module]], ...]
    tp_block_classes: Callable[[], tuple[type, ...]]  # the TP block classes (regional compilation, "already" check)
    sizes: Callable[[nn.Module], dict[str, int]]  # sizes the world size must divide, by name (heads, MLP width)
    # (dense block, world size) -> None or an error: run on every block before any is sharded, so that a refused
    # model is left as it was (not half-sharded)
    check_block: Callable[[nn.Module, int], None] | None = None
    # (config field, checkpoint key prefix, what a block is, the field's default): a config asking for more blocks
    # than the checkpoint holds is refused before the model is built
    block_counts: tuple[tuple[str, str, str, int], ...] = ()
    validate_config: Callable[[dict, str], None] | None = None  # (config dict, where) -> None or ValueError
    infer_config: Callable[[Any, str | None], dict] | None = None  # a single file's config from its shapes
    check_model_inputs: Callable[[nn.Module, tuple, dict], None] | None = None  # model-level input checks
    original_format: OriginalFormat | None = None
    # A model built on the meta device (from_pretrained) -> the state its constructor computes that no checkpoint
    # holds, rebuilt on the CPU (Qwen-Image's RoPE tables are plain attributes, not buffers).
    after_meta_build: Callable[[nn.Module], None] | None = None
    # Called once the blocks are sharded (e.g. to tell a block how the model uses its outputs).
    after_parallelize: Callable[[nn.Module], None] | None = None
    # `tpfuse verify --family`: named configs (diffusers kwargs; "tiny" at least, and one block at real width), a
    # seeded dense model of one (preset, seed) -> model, and seeded model inputs (model, batch, text tokens, image
    # tokens, seed) -> forward kwargs; the float tensors among them are the inputs whose gradients are checked.
    presets: dict[str, dict] = dataclasses.field(default_factory=dict)
    # Hybrid meshes (sp, cfg, dp; see .mesh and .hybrid): the forward arguments holding tokens, name -> (token
    # stream, token dim) (a list argument: each element); the arguments with a batch dim (dim 0, or a per-sample
    # list); the stream of the output's tokens (dim 1); the stream sequences attention runs over (which give the
    # all-to-all every rank's token count); a check refusing inputs a mesh cannot compute exactly
    # (model, bound forward arguments, ParallelMesh) -> None; and (model, SequenceParallel) -> None installing what a
    # stream split inside the forward needs (Qwen-Image's RoPE tables are computed for the whole sequence).
    token_inputs: dict[str, tuple[str, int]] = dataclasses.field(default_factory=dict)
    batch_inputs: tuple[str, ...] = ()
    output_stream: str = "img"
    attention_streams: tuple[tuple[str, ...], ...] = (("txt", "img"),)
    check_mesh_inputs: Callable[[nn.Module, dict, Any], None] | None = None
    attach_sequence: Callable[[nn.Module, Any], None] | None = None
    random_model: Callable[[str, int], nn.Module] | None = None
    random_inputs: Callable[[nn.Module, int, int, int, int], dict] | None = None

    def block_prefixes(self) -> tuple[str, ...]:
        return tuple(f"{path}." for path, _ in self.block_lists)

    def model_class(self) -> type:
        module, _, name = self.diffusers_class.partition(":")
        return getattr(importlib.import_module(module), name)


class UnsupportedModelError(TypeError):
    """A model (or config) of a class no registered family parallelizes."""


# name -> Family, or "module:attribute" of one not imported yet.
_BUILTIN: dict[str, str] = {
    "flux2": "tpfuse.tp_layers.flux2.family:FAMILY",
    "qwenimage": "tpfuse.tp_layers.qwenimage.family:FAMILY",
    "flux3": "tpfuse.tp_layers.flux3.family:FAMILY",
}
_REGISTRY: dict[str, Family | str] = dict(_BUILTIN)
# The model class names of the built-in families, known without importing them (error messages, config dispatch).
_CLASS_NAMES = {"Flux2Transformer2DModel": "flux2", "QwenImageTransformer2DModel": "qwenimage",
                "Flux3Transformer2DModel": "flux3"}


def register_family(family: Family | str, name: str | None = None, model_classes: Sequence[str] = ()) -> None:
    """Add a family: a :class:`Family`, or ``"module:attribute"`` naming one (imported on first use; then pass
    ``name`` and ``model_classes``). A name or class already registered is replaced."""
    if isinstance(family, Family):
        name, model_classes = family.name, family.model_classes
    elif not (isinstance(family, str) and ":" in family and name):
        raise TypeError(f"register_family takes a Family, or 'module:attribute' with name=..., got {family!r}")
    _REGISTRY[name] = family
    for cls in model_classes:
        _CLASS_NAMES[cls] = name


def _load(name: str) -> Family:
    entry = _REGISTRY[name]
    if isinstance(entry, str):
        module, _, attr = entry.partition(":")
        entry = _REGISTRY[name] = getattr(importlib.import_module(module), attr)
    return entry


def families() -> list[Family]:
    """Every registered family (imports them)."""
    return [_load(n) for n in list(_REGISTRY)]


def supported_classes() -> str:
    """``"Flux2Transformer2DModel (flux2), ..."``: the model classes tpfuse parallelizes, for error messages."""
    return ", ".join(f"{cls} ({fam})" for cls, fam in sorted(_CLASS_NAMES.items(), key=lambda kv: kv[1]))


def family_named(name: str) -> Family:
    """A family by its name (``"flux2"``, ``"qwenimage"``, ``"flux3"``); ``ValueError`` listing the names."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown model family {name!r}; known: {sorted(_REGISTRY)}")
    return _load(name)


def family_for_class(class_name: str) -> Family:
    """The family of a diffusers class name (e.g. a config's ``_class_name``); :class:`UnsupportedModelError`
    naming the supported classes otherwise."""
    name = _CLASS_NAMES.get(class_name)
    if name is None:
        raise UnsupportedModelError(f"tpfuse has no tensor-parallel family for the model class {class_name!r}; "
                                    f"supported: {supported_classes()}")
    return _load(name)


def family_of(model: nn.Module | type) -> Family:
    """The family of a (dense or parallelized) model, or of a model class, by its class or a base class's name."""
    model_cls = model if isinstance(model, type) else type(model)
    for cls in model_cls.__mro__:
        if cls.__name__ in _CLASS_NAMES:
            return _load(_CLASS_NAMES[cls.__name__])
    raise UnsupportedModelError(f"parallelize: tpfuse has no tensor-parallel family for "
                                f"{model_cls.__module__}.{model_cls.__name__}; supported: {supported_classes()}")


def original_format(keys: Iterable[str], family: Family | None = None) -> OriginalFormat | None:
    """The original key format of a checkpoint's keys, or ``None`` (diffusers' names). With ``family``, only that
    family's format is considered (another family's diffusers names can look like one: Qwen-Image's ``img_in``
    is also a BFL FLUX.2 key); without, the FLUX.2 family's (the only single-file format tpfuse infers)."""
    keys = list(keys)
    for fam in [family] if family is not None else [family_named("flux2")]:
        fmt = fam.original_format
        if fmt is not None and fmt.detect(keys):
            return fmt
    return None
