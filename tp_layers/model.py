"""Drop-in tensor parallelism for diffusers' ``Flux2Transformer2DModel``.

``parallelize(model)`` swaps every double- and single-stream block for its tensor-parallel version in place
(same ``forward`` signature and parameter names, ~1/N of the block weights per rank); embedders, modulation and
the final layer stay replicated. It works on a model with real weights (they are sharded) and on one built on
the ``meta`` device (only shapes), which :func:`~tpfuse.tp_layers.checkpoint.load_sharded` then fills with this
rank's slices. ``from_pretrained`` does config -> meta model -> parallelize -> load_sharded in one call.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import torch
from torch import nn

from .checkpoint import LoadReport, load_sharded, resolve_source
from .comm import get_world_size, resolve_group
from .config import Flux2Config
from .consistency import check_inputs_agree, inputs_check_due, sync_or_check
from . import lora
from ._flavour import flavour, resolve
from .lora import is_lora_layer
from .tp_flux2 import TPDoubleStreamBlock, TPSingleStreamBlock

__all__ = ["check_parallelizable", "from_pretrained", "load_config", "parallelize"]

_MODEL_CLASS = "Flux2Transformer2DModel"


def check_parallelizable(model: nn.Module, world_size: int) -> None:
    """Refuse, with the reason, what :func:`parallelize` cannot shard correctly."""
    if type(model).__name__ != _MODEL_CLASS or not hasattr(model, "single_transformer_blocks"):
        raise TypeError(f"parallelize expects diffusers' {_MODEL_CLASS}, got {type(model).__module__}."
                        f"{type(model).__name__}")
    config = getattr(model, "config", {})
    if getattr(model, "is_quantized", False) or getattr(model, "hf_quantizer", None) is not None or \
            (hasattr(config, "get") and config.get("quantization_config")):
        raise ValueError("parallelize: the model is quantized; tensor-parallel sharding needs the dense "
                         "(bf16/fp16/fp32) weights — load it unquantized")
    odd = sorted({f"{n}: {type(p).__name__}/{p.dtype}" for n, p in model.named_parameters()
                  if not p.is_floating_point() or type(p) is not nn.Parameter})
    if odd:
        raise ValueError(f"parallelize: quantized or wrapped parameters cannot be sharded: {odd[:5]}"
                         + (" ..." if len(odd) > 5 else ""))
    other_tuners = sorted({type(m).__name__ for m in model.modules() if type(m).__module__.startswith("peft.")
                           and not is_lora_layer(m) and not isinstance(m, nn.ModuleDict)
                           and type(m).__module__ != "peft.tuners.lora.layer"})
    if other_tuners:
        raise ValueError(f"parallelize: peft adapters other than LoRA ({other_tuners}) cannot be sharded; fuse them "
                         "into the weights first (fuse_lora() then unload_lora_weights())")
    hooked = [n or type(m).__name__ for n, m in model.named_modules()
              if getattr(m, "_hf_hook", None) is not None or getattr(m, "_diffusers_hook", None) is not None]
    device_map = getattr(model, "hf_device_map", None)
    if hooked or (device_map and len(set(map(str, device_map.values()))) > 1):
        raise ValueError(f"parallelize: the model is offloaded or dispatched (hooks on {hooked[:3]}, "
                         f"device map {device_map}); load it without offloading, then parallelize")
    already = [n for n, m in model.named_modules() if isinstance(m, (TPSingleStreamBlock, TPDoubleStreamBlock))]
    if already:
        raise ValueError(f"parallelize: the model is already parallelized ({already[:2]} ...)")
    heads = model.config.get("num_attention_heads") if hasattr(model.config, "get") else None
    heads = heads or model.transformer_blocks[0].attn.heads
    if heads % world_size:
        raise ValueError(f"parallelize: num_attention_heads={heads} is not divisible by the world size {world_size}")


class TPModelMixin:
    """What a parallelized diffusers model adds to its class (``parallelize`` swaps the instance's class for
    ``class Flux2Transformer2DModel(TPModelMixin, Flux2Transformer2DModel)``; ``__name__`` and the config are
    unchanged): adapters are sharded on load and gathered on save, and regional compilation finds the TP blocks."""

    def save_pretrained(self, *args, **kwargs):
        """Refused: each rank holds 1/N of the block weights under the dense config, which diffusers cannot load
        back. :func:`tpfuse.tp_layers.save_pretrained` writes the dense checkpoint instead."""
        raise RuntimeError(
            f"{type(self).__name__} is tensor-parallel over {self.tp_world_size} rank(s): each holds 1/N of the block "
            "weights under the dense config, so diffusers' save_pretrained would write a checkpoint nobody can load. "
            "Call tpfuse.tp_layers.save_pretrained(model, path) on every rank instead (rank 0 writes a normal "
            "diffusers checkpoint). For a pipeline, save the other components with their own save_pretrained.")

    def load_lora_adapter(self, pretrained_model_name_or_path_or_dict, prefix="transformer", hotswap=False,
                          **kwargs):
        """diffusers' ``load_lora_adapter``, with a LoRA made for the dense model sharded for this rank first."""
        return lora.load_lora_adapter(self, super().load_lora_adapter, pretrained_model_name_or_path_or_dict,
                                      prefix, hotswap, **kwargs)

    def add_adapter(self, adapter_config, adapter_name: str = "default") -> None:
        """diffusers' ``add_adapter`` (a fresh adapter, e.g. for training), initialised as on the dense model and
        identical on every rank where it is replicated."""
        lora.check_new_adapter(self, adapter_config)
        super().add_adapter(adapter_config, adapter_name)
        lora.init_new_adapter(self, adapter_name, adapter_config)
        lora.adapt_lora(self)

    def save_lora_adapter(self, save_directory, adapter_name: str = "default", upcast_before_saving: bool = False,
                          safe_serialization: bool = True, weight_name: str | None = None) -> None:
        """diffusers' ``save_lora_adapter``: every rank calls it; rank 0 writes the gathered, dense adapter."""
        lora.save_lora_adapter(self, save_directory, adapter_name, upcast_before_saving, safe_serialization,
                               weight_name)


def _model_flavour(model_cls: type) -> type:
    repeated = list(getattr(model_cls, "_repeated_blocks", None) or [])
    # Regional compilation (compile_repeated_blocks) finds blocks by class name.
    repeated += [c.__name__ for c in (TPDoubleStreamBlock, TPSingleStreamBlock) if c.__name__ not in repeated]
    dense_forward = model_cls.forward

    @functools.wraps(dense_forward)  # the dense signature: diffusers' hooks bind arguments by it
    def forward(self, *args, **kwargs):
        # The first call (every call in debug mode) checks that every rank got the same input shapes.
        if not torch.compiler.is_compiling() and inputs_check_due(self):
            check_inputs_agree(self, self.tp_group, {"args": args, **kwargs})
        return dense_forward(self, *args, **kwargs)

    return flavour(TPModelMixin, model_cls, __name__, namespace={"_repeated_blocks": repeated, "forward": forward},
                   name=model_cls.__name__)


def __getattr__(name: str):  # pickle finds the model flavours by their __qualname__
    return resolve(name, {TPModelMixin.__name__: TPModelMixin}, lambda _mixin, cls: _model_flavour(cls))


def parallelize(model: nn.Module, group=None, *, check_weights: bool = True,
                broadcast_from: int | None = None) -> nn.Module:
    """Shard a diffusers ``Flux2Transformer2DModel`` over ``group`` (a ProcessGroup or 1-D DeviceMesh; default:
    the world) in place and return it.

    ``check_weights`` (default on): before sharding, verify that every rank holds the same weights — one
    all-gather of a checksum per tensor (:func:`~tpfuse.tp_layers.consistency.check_weights_agree`; ``meta``
    tensors are skipped) — and raise :class:`~tpfuse.tp_layers.consistency.WeightMismatchError` naming the first
    tensor that differs. ``broadcast_from=r``: copy rank ``r``'s weights to every rank instead (the remedy when the
    ranks built the model without a shared seed)."""
    group = resolve_group(group)
    world_size = get_world_size(group)
    check_parallelizable(model, world_size)
    sync_or_check(model, group, check_weights, broadcast_from, type(model).__name__)
    for blocks, cls in ((model.transformer_blocks, TPDoubleStreamBlock),
                        (model.single_transformer_blocks, TPSingleStreamBlock)):
        for i in range(len(blocks)):
            blocks[i] = cls.from_dense(blocks[i], group, check_weights=False)  # the dense block is dropped here
    model.tp_world_size = world_size
    model.tp_group = group
    model.__class__ = _model_flavour(type(model))  # adapters sharded on load, gathered on save; _repeated_blocks
    return model


def _load_config(path: Path, subfolder: str | None) -> dict | None:
    candidates = [path / "config.json"] if path.is_dir() else []
    if path.is_dir() and subfolder is None:
        candidates.append(path / "transformer" / "config.json")
    for c in candidates:
        if c.exists():
            try:
                return json.loads(c.read_text())
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise ValueError(f"{c}: not a valid JSON config ({exc})") from None
    return None


def _infer_config(path: Path) -> dict:
    """A config from a single-file checkpoint's tensor shapes (BFL or diffusers keys)."""
    from .checkpoint import _weight_files, bfl_to_diffusers, open_safetensors

    files, _ = _weight_files(path)
    shapes = {}
    for f in files:
        with open_safetensors(f) as h:
            for key in h.keys():
                shape = tuple(h.get_slice(key).get_shape())
                try:
                    targets = bfl_to_diffusers(key, shape) or [(key, None)]
                except ValueError as exc:
                    raise ValueError(f"{f}: {exc}") from None
                for name, _src in targets:
                    shapes[name] = shape if _src is None or _src.rows is None else (_src.rows, *shape[1:])
    try:
        hidden, in_channels = shapes["x_embedder.weight"]
        _, joint = shapes["context_embedder.weight"]
        head_dim = shapes["transformer_blocks.0.attn.norm_q.weight"][0]
        mlp2 = shapes["transformer_blocks.0.ff.linear_in.weight"][0]
        t_channels = shapes["time_guidance_embed.timestep_embedder.linear_1.weight"][1]
    except KeyError as exc:
        raise ValueError(f"cannot infer a FLUX.2 config from {path}: no {exc.args[0]}") from None
    count = lambda prefix: len({k.split(".")[1] for k in shapes if k.startswith(prefix)})
    return Flux2Config(
        num_attention_heads=hidden // head_dim, attention_head_dim=head_dim, num_layers=count("transformer_blocks."),
        num_single_layers=count("single_transformer_blocks."), mlp_ratio=mlp2 / 2 / hidden,
        in_channels=in_channels, joint_attention_dim=joint, timestep_guidance_channels=t_channels,
        guidance_embeds="time_guidance_embed.guidance_embedder.linear_1.weight" in shapes,
        axes_dims_rope=(head_dim // 4,) * 4,
    ).to_diffusers_kwargs()


def load_config(source, subfolder: str | None = None, revision: str | None = None, token=None,
                local_files_only: bool = False) -> tuple[dict, Path]:
    """(diffusers config dict, the directory or file holding the weights) for a checkpoint source."""
    path = resolve_source(source, subfolder, revision, token, local_files_only=local_files_only)
    config = _load_config(path, subfolder)
    if config is None and not path.is_dir():
        config = _infer_config(path)
    if config is None:
        raise ValueError(f"no config.json at {path} (pass subfolder=..., or a single checkpoint file)")
    if path.is_dir() and subfolder is None and not (path / "config.json").exists():
        path = path / "transformer"
    return config, path


def from_pretrained(source, group=None, dtype: torch.dtype | None = None, subfolder: str | None = None,
                    revision: str | None = None, token=None, device=None, progress: bool = True,
                    local_files_only: bool = False) -> nn.Module:
    """Config -> ``meta`` model -> :func:`parallelize` -> :func:`load_sharded`, in one call.

    ``source``: a diffusers model directory (``config.json`` + safetensors; a pipeline directory's
    ``transformer/`` is found without ``subfolder``), a single safetensors file (diffusers or BFL keys; the config
    is inferred from the shapes, RoPE axes split evenly), or a Hub repo id (e.g.
    ``black-forest-labs/FLUX.2-klein-4B`` with ``subfolder="transformer"``; ``local_files_only=True`` reads only
    the Hub cache, as in diffusers). The model comes back in ``eval()``
    mode; ``model.tp_load_report`` is the rank's :class:`LoadReport`.
    """
    from diffusers import Flux2Transformer2DModel

    config, path = load_config(source, subfolder, revision, token, local_files_only)
    with torch.device("meta"):
        model = Flux2Transformer2DModel.from_config(config)
    if dtype is not None:
        model = model.to(dtype)
    parallelize(model, group)
    report: LoadReport = load_sharded(model, path, group, device=device, progress=progress)
    model.tp_load_report = report
    return model.eval()
