"""The whole diffusers pipeline across ranks: the transformer (tensor x sequence x data parallel, as
:func:`~tpfuse.tp_layers.parallelize`), the text encoder (transformers' own tensor-parallel plan, run by tpfuse's
layers: :mod:`.encoders`) and the VAE.

Where each component goes, and why:

* **transformer**: :func:`~tpfuse.tp_layers.parallelize` over ``mesh`` (or ``group``), as always.
* **text encoder**: sharded over as many ranks as its heads allow, because memory is the point (FLUX.2 [dev]'s
  Mistral-Small-3.2 is 24.0B parameters, 44.7 GiB in bf16: more than half of an 80 GB card, on every rank when
  replicated). The group is the whole mesh when its size divides the encoder's query and key/value heads (it runs
  the same prompts on every rank: the pipeline is called alike everywhere and only the transformer splits the
  batch), else the mesh's tp group; ``text_encoder="replicate"`` keeps it whole (an architecture without a
  tensor-parallel plan must). It runs once per prompt, so the all-reduces of a sharded encoder (2 per layer, of
  ``[batch, 512, hidden]``) cost little next to the denoising steps.
* **VAE**: replicated, decoding on every rank. Its weights are 84M parameters (160 MiB in bf16, 0.4% of a dev rank's
  transformer shard at tp 4); decoding on one rank and broadcasting the image would spare the other ranks the
  decode's activations, but the decode runs after the denoising loop, when the transformer's activations are
  freed, so the per-rank peak is the transformer's or the encoder's either way (``tpfuse plan`` shows the three
  phases), and every rank returns the same image with no collective.

:func:`load_pipeline` loads a pipeline folder or Hub repo so: each rank reads only its slices of the transformer's
and the text encoder's safetensors, after the mesh has been checked against the model's heads and, on GPUs, the
per-rank memory against the device's (nothing is loaded when either does not hold). :func:`memory_report` gives a
rank's bytes per component (weights measured, activations estimated as ``tpfuse plan`` does).
"""

from __future__ import annotations

import contextlib
import dataclasses
from pathlib import Path

import torch
from torch import nn

from .comm import get_world_size, resolve_group
from .mesh import ParallelMesh, resolve_mesh

__all__ = ["PipelineSharding", "parallelize_pipeline", "load_pipeline", "encoder_ranks", "TEXT_ENCODER_MODES"]

TEXT_ENCODER_MODES = ("shard", "replicate")


@dataclasses.dataclass
class PipelineSharding:
    """Where :func:`parallelize_pipeline` put each component (``pipe.tp_pipeline``)."""

    mesh: str  # the transformer's mesh ("tp2", "sp2xtp2", ...)
    world_size: int
    text_encoder: str | None  # "sharded over N ranks", "replicated", or None (the pipeline has none)
    encoder_ranks: int  # ranks the text encoder is split over (1: whole on every rank)
    vae: str = "replicated"

    def __str__(self) -> str:
        return (f"transformer: {self.mesh}; text encoder: {self.text_encoder or 'none'}; VAE: {self.vae} "
                f"({self.world_size} ranks)")


def _text_config(config):
    get_text = getattr(config, "get_text_config", None)
    return get_text() if callable(get_text) else config


def encoder_ranks(text_config, world: int, tp: int, mode: str = "shard") -> int:
    """How many ranks the text encoder is split over: ``world`` (the whole mesh) when it divides the encoder's
    query and key/value heads, else ``tp`` when that does, else 1 (replicated); 1 for ``mode="replicate"``. The
    same rule ``tpfuse plan`` applies."""
    if mode == "replicate":
        return 1
    text = _text_config(text_config)
    heads = getattr(text, "num_attention_heads")
    kv = getattr(text, "num_key_value_heads", None) or heads
    for n in (world, tp):
        if heads % n == 0 and kv % n == 0:
            return n
    return 1


def _check_mode(text_encoder: str) -> None:
    if text_encoder not in TEXT_ENCODER_MODES:
        raise ValueError(f"text_encoder must be one of {TEXT_ENCODER_MODES}, got {text_encoder!r}")


def _groups(mesh, group) -> tuple[ParallelMesh | None, object, int, object, int]:
    """(ParallelMesh or None, the whole mesh's group, its size, the tp group, its size)."""
    pm = resolve_mesh(mesh, group)
    if pm is None:
        g = resolve_group(group)
        n = get_world_size(g)
        return None, g, n, g, n
    return pm, pm.world_group, get_world_size(pm.world_group), pm.tp_group, pm.tp


def _encoder_group(text_config, pm, world_group, world, tp_group, tp, mode: str, what: str):
    """The text encoder's group and size, refusing a sharded encoder no group holds (naming the heads)."""
    n = encoder_ranks(text_config, world, tp, mode)
    if mode == "shard" and n == 1 and world > 1:
        from .encoders import check_encoder_shardable

        check_encoder_shardable(text_config, tp if pm is not None else world, what)  # raises, naming the heads
    return (world_group if n == world else tp_group), n


def parallelize_pipeline(pipe, mesh=None, *, group=None, text_encoder: str = "shard", check_weights: bool = True):
    """Shard a diffusers pipeline in place across ranks and return it: the transformer by
    :func:`~tpfuse.tp_layers.parallelize` (``mesh``: a named ``DeviceMesh``, or ``group``: plain tensor
    parallelism; default: the world), the text encoder by transformers' tensor-parallel plan over as many ranks as
    its heads allow (``text_encoder="replicate"``: keep it whole), the VAE replicated (see the module doc).

    Every rank must hold the same dense pipeline (same seed or same checkpoint: ``check_weights`` compares
    checksums). Everything is checked before anything changes: the transformer's heads against the mesh, the
    encoder's plan and heads (an architecture without a plan: an :class:`~.encoders.UnsupportedEncoderError`
    naming it and ``text_encoder="replicate"``). ``pipe.tp_pipeline`` says where each component went (a
    :class:`PipelineSharding`). To load a pipeline that does not fit one device, use :func:`load_pipeline`."""
    from .encoders import check_text_encoder, shard_text_encoder
    from .model import parallelize

    _check_mode(text_encoder)
    transformer = getattr(pipe, "transformer", None)
    if not isinstance(transformer, nn.Module):
        raise TypeError(f"parallelize_pipeline: {type(pipe).__name__} has no transformer module to shard")
    if getattr(pipe, "tp_pipeline", None) is not None:
        raise ValueError(f"parallelize_pipeline: the pipeline is already parallelized ({pipe.tp_pipeline})")
    pm, world_group, world, tp_group, tp = _groups(mesh, group)
    encoder = getattr(pipe, "text_encoder", None)
    enc_group, enc_n = None, 1
    if encoder is not None and text_encoder == "shard":
        enc_group, enc_n = _encoder_group(encoder.config, pm, world_group, world, tp_group, tp, text_encoder,
                                          type(encoder).__name__)
        check_text_encoder(encoder, enc_n)  # before the transformer changes: nothing is half-done on refusal
    if getattr(transformer, "tp_world_size", None) is None:
        parallelize(transformer, group, mesh=mesh, check_weights=check_weights)
    if encoder is not None and text_encoder == "shard":
        shard_text_encoder(encoder, enc_group, check_weights=check_weights)
    vae = getattr(pipe, "vae", None)
    if vae is not None and check_weights and world > 1:
        from .consistency import check_weights_agree

        check_weights_agree(vae, world_group, type(vae).__name__)  # every rank decodes: the same VAE everywhere
    mesh_name = pm.name() if pm is not None else f"tp{world}"
    pipe.tp_pipeline = PipelineSharding(
        mesh_name, world, None if encoder is None else
        (f"sharded over {enc_n} ranks" if enc_n > 1 else "replicated"), enc_n)
    return pipe


@contextlib.contextmanager
def _meta_parameters():
    """Build a module with its parameters on the ``meta`` device and its buffers real: a text encoder's
    non-persistent buffers (the rotary ``inv_freq``) are computed in ``__init__`` and are in no checkpoint, so a
    model built entirely on ``meta`` could not be loaded. (accelerate's ``init_empty_weights`` does the same.)"""
    original = nn.Module.register_parameter

    def register(module, name, param):
        if param is not None and param.device.type != "meta":
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        original(module, name, param)

    nn.Module.register_parameter = register
    try:
        yield
    finally:
        nn.Module.register_parameter = original


class _Renamed:
    """A checkpoint key format by prefix renames (for :func:`~tpfuse.tp_layers.checkpoint.load_sharded`)."""

    def __init__(self, name: str, renames: list[tuple[str, str]]):
        self.name, self.renames = name, renames

    def to_diffusers(self, key: str, shape):
        from .checkpoint import Source

        for old, new in self.renames:
            if key.startswith(old):
                return [(new + key[len(old):], Source(key, 0, None))]
        return [(key, Source(key, 0, None))]


# transformers writes Mistral3 (a llava-style model) in llava's original layout, "language_model.model.*" (5.25 too:
# it renames the keys to the module names on load, conversion_mapping's "llava" entry, and back on save); tpfuse
# reads that layout and the module names alike.
_LEGACY_LLAVA = _Renamed("transformers-legacy-llava", [("language_model.lm_head.", "lm_head."),
                                                       ("language_model.model.", "model.language_model."),
                                                       ("vision_tower.", "model.vision_tower."),
                                                       ("multi_modal_projector.", "model.multi_modal_projector.")])


def _key_format(folder: Path):
    from .checkpoint import _select, open_safetensors

    sel = _select(folder)
    keys = set(sel.key_map or ())
    if not keys:
        for f in sel.files:
            with open_safetensors(f) as h:
                keys.update(h.keys())
    return _LEGACY_LLAVA if any(k.startswith("language_model.model.") for k in keys) else None


def load_text_encoder(folder, group=None, *, dtype: torch.dtype | None = None, device=None, progress: bool = True):
    """A transformers text encoder from ``folder`` (``config.json`` + safetensors, as diffusers saves a pipeline's
    ``text_encoder/``), sharded over ``group`` by its plan: built with its parameters on ``meta``, then each rank
    reads only its slices (its vocabulary rows, its heads, its MLP columns). ``model.tp_load_report`` is the rank's
    :class:`~tpfuse.tp_layers.checkpoint.LoadReport`."""
    import transformers

    from .checkpoint import load_sharded
    from .encoders import shard_text_encoder

    folder = Path(folder)
    config = transformers.AutoConfig.from_pretrained(folder)
    names = getattr(config, "architectures", None) or []
    cls = getattr(transformers, names[0], None) if names else None
    if cls is None:
        raise ValueError(f"{folder}/config.json names no transformers architecture tpfuse can build "
                         f"(architectures={names!r})")
    with _meta_parameters():
        model = cls._from_config(config)
    if dtype is not None:
        for p in model.parameters():
            p.data = p.data.to(dtype)
    shard_text_encoder(model, group, check_weights=False)
    model.tp_load_report = load_sharded(model, folder, group, device=device, progress=progress,
                                        key_format=_key_format(folder))
    if device is not None:
        model.to(device)  # the buffers (rotary tables) follow the parameters
    return model.eval()


def load_pipeline(source, mesh=None, *, group=None, dtype: torch.dtype = torch.bfloat16, device=None,
                  text_encoder: str = "shard", revision: str | None = None, token=None,
                  local_files_only: bool = False, progress: bool = True):
    """A diffusers FLUX.2 pipeline (a folder with ``model_index.json``, or a Hub repo id) loaded across ranks: the
    transformer by :func:`~tpfuse.tp_layers.from_pretrained` over ``mesh``/``group``, the text encoder by
    :func:`load_text_encoder` over the group :func:`parallelize_pipeline` would choose, each rank reading only its
    slices; the VAE, tokenizer and scheduler whole. The mesh is checked against the transformer's and the encoder's
    heads before anything is loaded. Returns the pipeline, with ``pipe.tp_pipeline`` set."""
    import diffusers

    from .checkpoint import read_json, resolve_source
    from .model import from_pretrained, load_config

    _check_mode(text_encoder)
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(f"dtype must be a floating-point torch.dtype, got {dtype!r}")
    path = resolve_source(source, None, revision, token, local_files_only=local_files_only)
    index_file = Path(path) / "model_index.json"
    if not index_file.exists():
        raise ValueError(f"{path}: no model_index.json (load_pipeline reads a diffusers pipeline folder)")
    index = read_json(index_file, "pipeline index")
    pipe_cls = getattr(diffusers, str(index.get("_class_name")), None)
    if pipe_cls is None:
        raise ValueError(f"{index_file}: _class_name={index.get('_class_name')!r} is not a diffusers pipeline")
    pm, world_group, world, tp_group, tp = _groups(mesh, group)
    # Checks first, from the configs alone.
    from .families import family_for_class
    from .mesh import check_mesh_sizes

    config, _ = load_config(path, "transformer", local_files_only=True)
    family = family_for_class(config.get("_class_name", "Flux2Transformer2DModel"))
    with torch.device("meta"):
        shapes = family.model_class().from_config(config)  # shapes only: the sizes the mesh must divide
    check_mesh_sizes(pm.sizes if pm is not None else {"tp": world}, f"{path}/transformer", family.sizes(shapes))
    del shapes
    enc_folder = Path(path) / "text_encoder"
    enc_group, enc_n, enc_config = None, 1, None
    if (enc_folder / "config.json").exists():
        import transformers

        enc_config = transformers.AutoConfig.from_pretrained(enc_folder)
        enc_group, enc_n = _encoder_group(enc_config, pm, world_group, world, tp_group, tp, text_encoder,
                                          str(enc_folder))
    transformer = from_pretrained(path, group, dtype=dtype, subfolder="transformer", device=device,
                                  progress=progress, mesh=mesh)
    components = {"transformer": transformer}
    if enc_config is not None:
        if text_encoder == "shard":
            components["text_encoder"] = load_text_encoder(enc_folder, enc_group, dtype=dtype, device=device,
                                                           progress=progress)
    pipe = pipe_cls.from_pretrained(path, torch_dtype=dtype, **components)
    if device is not None:
        for name in ("vae", "text_encoder"):
            module = getattr(pipe, name, None)
            if isinstance(module, nn.Module) and text_encoder != "shard" or name == "vae":
                if module is not None:
                    module.to(device)
    mesh_name = pm.name() if pm is not None else f"tp{world}"
    pipe.tp_pipeline = PipelineSharding(mesh_name, world, None if enc_config is None else
                                        (f"sharded over {enc_n} ranks" if enc_n > 1 else "replicated"), enc_n)
    return pipe
