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
import math
import os
from pathlib import Path

import torch
from torch import nn

from .comm import get_world_size, resolve_group
from .mesh import ParallelMesh, resolve_mesh

__all__ = ["MemoryReport", "PipelineSharding", "parallelize_pipeline", "load_pipeline", "load_text_encoder",
           "memory_report", "encoder_ranks", "TEXT_ENCODER_MODES"]

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
    """How many ranks the text encoder (``text_config``: its transformers config) is split over: ``world`` (the
    whole mesh) when it divides the encoder's query and key/value heads, else ``tp`` when that does, else 1
    (replicated); 1 for ``mode="replicate"`` — :func:`tpfuse.tp_layers.plan.encoder_ranks`, the rule ``tpfuse
    plan`` applies, on the config's heads."""
    import types

    from .plan import encoder_ranks as plan_encoder_ranks

    text = _text_config(text_config)
    heads = getattr(text, "num_attention_heads", None) or getattr(text, "num_heads")
    heads_of = types.SimpleNamespace(num_attention_heads=heads,
                                     num_key_value_heads=getattr(text, "num_key_value_heads", None) or heads)
    return plan_encoder_ranks(heads_of, world, tp, mode)


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
    vae = getattr(pipe, "vae", None)
    if check_weights and world > 1:  # the same on every rank (every rank encodes and decodes), checked up front
        from .consistency import check_weights_agree

        for module in (encoder, vae):
            if module is not None:
                check_weights_agree(module, world_group, type(module).__name__)
    if getattr(transformer, "tp_world_size", None) is None:
        parallelize(transformer, group, mesh=mesh, check_weights=check_weights)
    if encoder is not None and text_encoder == "shard":
        shard_text_encoder(encoder, enc_group, check_weights=False)
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


def _meta_text_encoder(folder: Path, config=None):
    """The transformers model ``folder``'s ``config.json`` names, built with its parameters on ``meta`` (shapes
    only; its buffers real)."""
    import transformers

    config = config if config is not None else transformers.AutoConfig.from_pretrained(folder)
    names = getattr(config, "architectures", None) or []
    cls = getattr(transformers, names[0], None) if names else None
    if cls is None:
        raise ValueError(f"{folder}/config.json names no transformers architecture tpfuse can build "
                         f"(architectures={names!r})")
    with _meta_parameters():
        return cls._from_config(config)


def load_text_encoder(folder, group=None, *, dtype: torch.dtype | None = None, device=None, progress: bool = True,
                      shard: bool = True, model: nn.Module | None = None):
    """A transformers text encoder from ``folder`` (``config.json`` + safetensors, as diffusers saves a pipeline's
    ``text_encoder/``), sharded over ``group`` by its plan: built with its parameters on ``meta``, then each rank
    reads only its slices (its vocabulary rows, its heads, its MLP columns) straight to ``device``.
    ``shard=False``: whole, read the same way (no full copy in host memory first). ``model``: the ``meta`` model
    to fill, when the caller has built (and checked) it. ``model.tp_load_report`` is the rank's
    :class:`~tpfuse.tp_layers.checkpoint.LoadReport`."""
    from .checkpoint import load_sharded
    from .encoders import shard_text_encoder

    folder = Path(folder)
    model = model if model is not None else _meta_text_encoder(folder)
    if dtype is not None:
        for p in model.parameters():
            p.data = p.data.to(dtype)
    if shard:
        shard_text_encoder(model, group, check_weights=False)
    model.tp_load_report = load_sharded(model, folder, group, device=device, progress=progress,
                                        key_format=_key_format(folder))
    target = device if device is not None else next(model.parameters()).device
    model.to(target)  # the buffers (rotary tables) follow the parameters
    return model.eval()


def _check_fits(path: Path, transformer_config: dict, enc_config, pm, world: int, world_group, enc_n: int,
                dtype: torch.dtype, gpu_memory: float | None, device, height: int, width: int, batch: int) -> None:
    """Refuse, before anything is loaded, a mesh on which a rank's weights + the largest phase's activations +
    the workspace (``tpfuse plan``'s estimate, from the configs) exceed the device's memory (``gpu_memory`` GiB, or
    a CUDA device's total; nothing is checked on CPU without ``gpu_memory``)."""
    from .checkpoint import read_json
    from .flux2.config import Flux2Config
    from .flux2.pipeline_configs import DecoderConfig, PixtralConfig, VAEConfig
    from .plan import GiB, WORKSPACE_BYTES, rank_bytes

    if gpu_memory is not None:
        if not isinstance(gpu_memory, (int, float)) or isinstance(gpu_memory, bool) or not gpu_memory > 0:
            raise ValueError(f"gpu_memory must be a positive number of GiB, got {gpu_memory!r}")
        memory = int(gpu_memory * GiB)
    elif device is not None and torch.device(device).type == "cuda":
        # The card's size as `tpfuse plan --gpu-memory` reads it: whole GiB (an H100 80GB shows 79.2-79.6 GiB to
        # CUDA, the driver's share, which the plan's workspace covers), so the plan and the load agree.
        visible = torch.cuda.get_device_properties(torch.device(device)).total_memory
        memory = math.ceil(visible / GiB) * GiB
        if torch.distributed.is_initialized() and world > 1:  # the smallest card decides, alike on every rank
            t = torch.tensor([memory], dtype=torch.int64, device=device)
            torch.distributed.all_reduce(t, torch.distributed.ReduceOp.MIN, group=world_group)
            memory = int(t.item())
    else:
        return
    try:
        tcfg = Flux2Config.from_dict(transformer_config)
    except (ValueError, TypeError):
        return  # another family: its heads were checked; the plan's formulas describe FLUX.2's
    try:  # an encoder the plan's formulas do not describe (not a Qwen3/Mistral decoder) is left out
        ecfg = DecoderConfig.from_transformers(enc_config) if enc_config is not None else None
    except ValueError:
        ecfg = None
    try:
        vision = PixtralConfig.from_transformers(enc_config) if enc_config is not None else None
    except ValueError:
        vision = None
    vae_json = path / "vae" / "config.json"
    vcfg = VAEConfig.from_diffusers(read_json(vae_json, "config")) if vae_json.exists() else None
    tp, sp = (pm.tp, pm.sp) if pm is not None else (world, 1)
    weights, acts = rank_bytes(tcfg, ecfg, vcfg, tp=tp, sp=sp, dp=pm.batch if pm is not None else 1,
                               encoder_ranks=enc_n, vision=vision, height=height, width=width, batch=batch,
                               dtype_bytes=dtype.itemsize)
    peak = sum(weights.values()) + max(acts.values()) + WORKSPACE_BYTES
    if peak > memory:
        names = {"transformer": "transformer", "text_encoder": "text encoder", "vae": "VAE"}
        parts = ", ".join(f"{names[k]} {v / GiB:.1f}" for k, v in weights.items() if v)
        phase = max(acts, key=acts.get)
        mesh = pm.name() if pm is not None else f"tp{world}"
        raise ValueError(
            f"{path}: the pipeline does not fit the mesh {mesh} on {memory / GiB:.1f} GiB per rank: a rank needs "
            f"{peak / GiB:.1f} GiB (weights: {parts} GiB; {names[phase]} activations at {height}x{width}, batch "
            f"{batch}: {acts[phase] / GiB:.1f} GiB; workspace {WORKSPACE_BYTES / GiB:.1f} GiB). Nothing was loaded; "
            f"`tpfuse plan --model ... --gpus N --gpu-memory GB` lists the meshes that fit")


# What a pipeline component's folder holds: configs, weights, tokenizer files (vocabularies, merges, chat templates)
_COMPONENT_FILES = ("*.json", "*.safetensors", "*.txt", "*.model", "*.jinja", "*.tiktoken")


def load_pipeline(source, mesh=None, *, group=None, dtype: torch.dtype = torch.bfloat16, device=None,
                  text_encoder: str = "shard", gpu_memory: float | None = None, height: int = 1024,
                  width: int = 1024, batch: int = 1, revision: str | None = None, token=None,
                  local_files_only: bool = False, progress: bool = True):
    """A diffusers FLUX.2 pipeline (a folder with ``model_index.json``, or a Hub repo id) loaded across ranks: the
    transformer by :func:`~tpfuse.tp_layers.from_pretrained` over ``mesh``/``group``, the text encoder by
    :func:`load_text_encoder` over the group :func:`parallelize_pipeline` would choose, each rank reading only its
    slices; the VAE, tokenizer and scheduler whole. Returns the pipeline, with ``pipe.tp_pipeline`` set.

    Before anything is loaded, the mesh is checked against the transformer's and the encoder's heads, and a rank's
    memory (``tpfuse plan``'s estimate for images of ``height`` x ``width``, ``batch`` at a time) against
    ``gpu_memory`` GiB or, on CUDA, the device's: a ``ValueError`` says what does not fit."""
    import diffusers

    from .checkpoint import read_json, resolve_source
    from .model import from_pretrained, load_config

    _check_mode(text_encoder)
    if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(f"dtype must be a floating-point torch.dtype (e.g. torch.bfloat16), got {dtype!r}")
    if device is None and torch.distributed.is_initialized() and torch.distributed.get_backend() == "nccl":
        device = torch.device("cuda", torch.cuda.current_device())  # every component on this rank's GPU
    path = resolve_source(source, None, revision, token, allow_patterns=("model_index.json",),
                          local_files_only=local_files_only)
    index_file = Path(path) / "model_index.json"
    if not index_file.exists():
        raise ValueError(f"{path}: no model_index.json (load_pipeline reads a diffusers pipeline folder)")
    index = read_json(index_file, "pipeline index")
    if not Path(os.fspath(source)).exists():  # a Hub repo: fetch each component's folder (not a root-level
        # single-file checkpoint beside them: FLUX.2-dev's flux2-dev.safetensors alone is 64 GB)
        for name, value in index.items():
            if not name.startswith("_") and isinstance(value, list) and value and value[0] is not None:
                resolve_source(source, name, revision, token, allow_patterns=_COMPONENT_FILES,
                               local_files_only=local_files_only)
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
    enc_group, enc_n, enc_config, encoder = None, 1, None, None
    if (enc_folder / "config.json").exists():
        import transformers

        from .encoders import check_text_encoder

        enc_config = transformers.AutoConfig.from_pretrained(enc_folder)
        enc_group, enc_n = _encoder_group(enc_config, pm, world_group, world, tp_group, tp, text_encoder,
                                          str(enc_folder))
        encoder = _meta_text_encoder(enc_folder, enc_config)  # shapes only
        if text_encoder == "shard":
            check_text_encoder(encoder, enc_n)  # its plan and heads, before anything is read
    _check_fits(Path(path), config, enc_config, pm, world, world_group, enc_n, dtype, gpu_memory, device, height,
                width, batch)
    transformer = from_pretrained(path, group, dtype=dtype, subfolder="transformer", device=device,
                                  progress=progress, mesh=mesh)
    components = {"transformer": transformer}
    if encoder is not None:  # sharded or whole, read straight to the device (no host copy of 24B parameters)
        components["text_encoder"] = load_text_encoder(enc_folder, enc_group, dtype=dtype, device=device,
                                                       progress=progress, shard=text_encoder == "shard",
                                                       model=encoder)
    pipe = pipe_cls.from_pretrained(path, torch_dtype=dtype, **components)
    vae = getattr(pipe, "vae", None)
    if device is not None and isinstance(vae, nn.Module):  # diffusers loaded it whole (84M parameters)
        vae.to(device)
    mesh_name = pm.name() if pm is not None else f"tp{world}"
    pipe.tp_pipeline = PipelineSharding(mesh_name, world, None if enc_config is None else
                                        (f"sharded over {enc_n} ranks" if enc_n > 1 else "replicated"), enc_n)
    return pipe


# --------------------------------------------------------------------------------------------------------------
# What a rank holds
# --------------------------------------------------------------------------------------------------------------

COMPONENTS = ("transformer", "text_encoder", "vae")


def _param_bytes(module: nn.Module | None) -> int:
    """Bytes of ``module``'s parameters on this rank (a tied tensor once)."""
    if module is None:
        return 0
    seen, total = set(), 0
    for p in module.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel() * p.element_size()
    return total


@dataclasses.dataclass
class MemoryReport:
    """One rank's bytes per component of a pipeline: ``weights`` measured on the rank's tensors, ``predicted`` the
    weights ``tpfuse plan``'s formulas give for the same configs and mesh (the widest rank's: a ragged vocabulary
    gives the first ranks one row more), ``activations`` estimated per phase at ``height`` x ``width`` and
    ``batch`` (:func:`~tpfuse.tp_layers.plan.estimate_activations`), ``workspace`` the plan's fixed allowance.
    ``peak``: all weights + the largest phase's activations + workspace (the phases run one after another)."""

    rank: int
    mesh: str
    height: int
    width: int
    batch: int
    weights: dict[str, int]
    predicted: dict[str, int | None]
    activations: dict[str, int | None]
    workspace: int

    @property
    def peak(self) -> int:
        return sum(self.weights.values()) + max((a or 0) for a in self.activations.values()) + self.workspace

    def format(self) -> str:
        """A Markdown table, in GiB (MiB when every component's weights are under 1 GiB: the tiny test pipelines)."""
        unit, size = ("GiB", 2**30) if max(self.weights.values()) >= 2**30 else ("MiB", 2**20)

        def gib(n):
            return "—" if n is None else f"{n / size:.3f}"

        names = {"transformer": "transformer", "text_encoder": "text encoder", "vae": "VAE"}
        lines = [f"rank {self.rank} ({self.mesh}), {self.height}x{self.width}, batch {self.batch}: {unit} per rank",
                 "| component | weights (measured) | weights (plan) | activations (estimated) |",
                 "|---|---:|---:|---:|"]
        for c in COMPONENTS:
            lines.append(f"| {names[c]} | {gib(self.weights[c])} | {gib(self.predicted[c])} | "
                         f"{gib(self.activations[c])} |")
        lines.append(f"| workspace | | | {gib(self.workspace)} |")
        lines.append(f"| **peak** | | | **{gib(self.peak)}** |")
        return "\n".join(lines)


def _configs(pipe):
    """(Flux2Config or None, DecoderConfig or None, PixtralConfig or None, VAEConfig or None) of a live pipeline;
    None for a component the plan's formulas do not describe (another transformer family, an encoder without a
    decoder config, another VAE)."""
    from .flux2.config import Flux2Config
    from .flux2.pipeline_configs import DecoderConfig, PixtralConfig, VAEConfig

    transformer, encoder, vae = (getattr(pipe, n, None) for n in COMPONENTS)
    out = []
    for build, module in ((lambda m: Flux2Config.from_dict(dict(m.config)), transformer),
                          (lambda m: DecoderConfig.from_transformers(m.config), encoder),
                          (lambda m: PixtralConfig.from_transformers(m.config), encoder),
                          (lambda m: VAEConfig.from_diffusers(m.config), vae)):
        try:
            out.append(build(module) if module is not None else None)
        except (ValueError, TypeError, AttributeError, KeyError):
            out.append(None)
    return tuple(out)


def memory_report(pipe, height: int = 1024, width: int = 1024, batch: int = 1) -> MemoryReport:
    """This rank's bytes per component of ``pipe`` (parallelized or not; see :class:`MemoryReport`)."""
    import torch.distributed as dist

    from .plan import WORKSPACE_BYTES, rank_bytes

    transformer = getattr(pipe, "transformer", None)
    pm = getattr(transformer, "tp_mesh", None)
    sharding = getattr(pipe, "tp_pipeline", None)
    dtype = next(transformer.parameters()).dtype if transformer is not None else torch.bfloat16
    tcfg, ecfg, vision, vcfg = _configs(pipe)
    predicted, acts = rank_bytes(tcfg, ecfg, vcfg, tp=getattr(transformer, "tp_world_size", None) or 1,
                                 sp=pm.sp if pm is not None else 1, dp=pm.batch if pm is not None else 1,
                                 encoder_ranks=sharding.encoder_ranks if sharding is not None else 1, vision=vision,
                                 height=height, width=width, batch=batch, dtype_bytes=dtype.itemsize)
    present = {c: getattr(pipe, c, None) is not None for c in COMPONENTS}
    known = {"transformer": tcfg, "text_encoder": ecfg, "vae": vcfg}
    return MemoryReport(
        rank=dist.get_rank() if dist.is_initialized() else 0,
        mesh=sharding.mesh if sharding is not None else "not parallelized", height=height, width=width, batch=batch,
        weights={c: _param_bytes(getattr(pipe, c, None)) for c in COMPONENTS},
        predicted={c: predicted[c] if present[c] and known[c] is not None else None for c in COMPONENTS},
        activations={c: acts[c] if present[c] and known[c] is not None else None for c in COMPONENTS},
        workspace=WORKSPACE_BYTES)
