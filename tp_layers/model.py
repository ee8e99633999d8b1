"""Drop-in tensor parallelism for diffusers' transformers of every registered family (FLUX.2's
``Flux2Transformer2DModel``, Qwen-Image's ``QwenImageTransformer2DModel``, FLUX.3's
``Flux3Transformer2DModel``).

``parallelize(model)`` finds the model's family (:mod:`.families`) and swaps every block of its block lists for the
tensor-parallel version in place (same ``forward`` signature and parameter names, ~1/N of the block weights per
rank); embedders, the model-level modulation and the final layer stay replicated. It works on a model with real
weights (they are sharded) and on one built on the ``meta`` device (only shapes), which
:func:`~tpfuse.tp_layers.checkpoint.load_sharded` then fills with this rank's slices. ``from_pretrained`` does config -> meta model -> parallelize -> load_sharded in one call.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch
from torch import nn

from .checkpoint import LoadReport, load_sharded, resolve_source
from .comm import get_world_size, resolve_group
from .consistency import check_inputs_agree, inputs_check_due, sync_or_check
from . import lora
from ._flavour import flavour, resolve
from .hybrid import attach_sequence_parallel, forward_signature, hybrid_forward
from .mesh import ParallelMesh, install_gradient_sync, resolve_mesh
from .families import Family, UnsupportedModelError, family_for_class, family_of, supported_classes
from .lora import is_lora_layer
from .tp_attention import check_divisible, describe_ties, tied_parameters

__all__ = ["check_parallelizable", "from_pretrained", "load_config", "parallelize"]


def _block_lists(model: nn.Module, family: Family) -> list[tuple[str, nn.ModuleList, object]]:
    """(path, the model's ModuleList at that path, shard function) for each of the family's block lists."""
    out = []
    for path, shard in family.block_lists:
        blocks = model.get_submodule(path)
        if not isinstance(blocks, nn.ModuleList):
            raise TypeError(f"parallelize: {type(model).__name__}.{path} is a {type(blocks).__name__}, not the "
                            f"nn.ModuleList of blocks the {family.name} family shards")
        out.append((path, blocks, shard))
    return out


def check_parallelizable(model: nn.Module, world_size: int) -> Family:
    """Refuse, with the reason, what :func:`parallelize` cannot shard correctly; the model's family otherwise."""
    family = family_of(model)  # UnsupportedModelError naming the class and the supported ones
    lists = _block_lists(model, family)
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
    already = [n for n, m in model.named_modules() if isinstance(m, family.tp_block_classes())]
    if already:
        raise ValueError(f"parallelize: the model is already parallelized ({already[:2]} ...)")
    # Ties among the replicated modules survive (those modules are kept as they are); a tie that involves a block
    # weight would be split into separate shards, so it is refused (also across blocks, which from_dense cannot see).
    prefixes = family.block_prefixes()
    ties = [t for t in tied_parameters(model) if any(n.startswith(prefixes) for n in t)]
    if ties:
        raise ValueError(f"parallelize: {describe_ties(ties)}")
    try:
        check_divisible(world_size, **family.sizes(model))
    except ValueError as exc:
        raise ValueError(f"parallelize ({type(model).__name__}): {exc}") from None
    if family.check_block is not None:  # every block before any is sharded: a refusal leaves the model as it was
        for path, blocks, _ in lists:
            for i, block in enumerate(blocks):
                try:
                    family.check_block(block, world_size)
                except (TypeError, ValueError) as exc:
                    raise type(exc)(f"parallelize: {path}.{i}: {exc}") from None
    return family


class TPModelMixin:
    """What a parallelized diffusers model adds to its class (``parallelize`` swaps the instance's class for, e.g.,
    ``class Flux2Transformer2DModel(TPModelMixin, Flux2Transformer2DModel)``; ``__name__`` and the config are
    unchanged): adapters are sharded on load and gathered on save, and regional compilation finds the TP blocks."""

    def save_pretrained(self, save_directory, is_main_process: bool = True, save_function=None,
                        safe_serialization: bool = True, variant: str | None = None,
                        max_shard_size: int | str = "10GB", push_to_hub: bool = False, use_flashpack: bool = False,
                        **kwargs):
        """diffusers' ``save_pretrained``, writing the dense checkpoint. One rank: diffusers' own save (the state
        dict is the dense one). 2+ ranks: a collective — every rank of the group calls it (``pipe.save_pretrained``
        does, through this method) — and :func:`tpfuse.tp_layers.save_pretrained` writes the dense diffusers
        checkpoint from rank 0 (one writer per distinct folder), honouring ``variant``, ``max_shard_size``,
        ``safe_serialization`` and ``is_main_process``. ``push_to_hub`` and ``use_flashpack`` are refused at 2+
        ranks; ``save_function`` is ignored, as diffusers ignores it. On a hybrid mesh (``parallelize(mesh=...)``)
        every rank calls it; the replica that holds the first batch/sequence share writes (its tensor-parallel
        group gathers the shards), and a failure on any rank is raised on every rank."""
        mesh = getattr(self, "tp_mesh", None)
        hybrid = mesh is not None and mesh.hybrid
        if hybrid or self.tp_world_size > 1:
            where = f"the mesh {mesh.name()}" if hybrid else \
                f"a model tensor-parallel over {self.tp_world_size} ranks"
            for flag, value, instead in (("push_to_hub", push_to_hub, "save, then upload the folder from one rank "
                                          "(huggingface_hub.upload_folder)"),
                                         ("use_flashpack", use_flashpack, "save safetensors")):
                if value:
                    raise NotImplementedError(f"{type(self).__name__}.save_pretrained({flag}=True) is not supported "
                                              f"on {where}: {instead}")
        elif use_flashpack:  # passed only when set: diffusers before 0.42 has no such parameter
            kwargs["use_flashpack"] = use_flashpack
        if not hybrid:
            return self._save(save_directory, is_main_process, save_function, safe_serialization, variant,
                              max_shard_size, push_to_hub, kwargs)
        import torch.distributed as dist

        from .save import _share

        primary = dist.get_rank(mesh.replica_group) == 0  # the other replicas hold the same weights
        error = None
        try:
            self._save(save_directory, is_main_process and primary, save_function, safe_serialization, variant,
                       max_shard_size, push_to_hub, kwargs, writes=primary)
        except Exception as exc:  # any failure reaches every rank (they wait in _share below)
            error = f"{type(exc).__name__}: {exc}"
        # Every rank returns once the checkpoint is complete, or raises the first rank's error.
        _share(error, None, dist.get_world_size(), f"saving {save_directory}", outcome=None)

    def _save(self, save_directory, is_main_process, save_function, safe_serialization, variant, max_shard_size,
              push_to_hub, kwargs, writes: bool = True):
        """One rank: diffusers' own save (``writes``: whether this rank calls it at all: diffusers writes the weight
        files whatever ``is_main_process`` says). 2+ ranks: tpfuse's collective save over the group."""
        if self.tp_world_size == 1:
            if not writes:
                return None
            return super().save_pretrained(save_directory, is_main_process=is_main_process,
                                           save_function=save_function, safe_serialization=safe_serialization,
                                           variant=variant, max_shard_size=max_shard_size, push_to_hub=push_to_hub,
                                           **kwargs)
        from .save import save_pretrained

        save_pretrained(self, save_directory, max_shard_size, self.tp_group, variant=variant,
                        safe_serialization=safe_serialization, is_main_process=is_main_process)

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
                          safe_serialization: bool = True, weight_name: str | None = None,
                          is_main_process: bool = True) -> None:
        """diffusers' ``save_lora_adapter``; see :func:`tpfuse.tp_layers.lora.save_lora_adapter`."""
        mesh = getattr(self, "tp_mesh", None)
        if mesh is not None and mesh.hybrid:  # one replica writes (the others hold the same adapter)
            import torch.distributed as dist

            is_main_process = is_main_process and dist.get_rank(mesh.replica_group) == 0
        lora.save_lora_adapter(self, save_directory, adapter_name, upcast_before_saving, safe_serialization,
                               weight_name, is_main_process)


def _model_flavour(model_cls: type) -> type:
    family = family_of(model_cls)
    repeated = list(getattr(model_cls, "_repeated_blocks", None) or [])
    # Regional compilation (compile_repeated_blocks) finds blocks by class name.
    repeated += [c.__name__ for c in family.tp_block_classes() if c.__name__ not in repeated]
    dense_forward = model_cls.forward
    check_model_inputs = family.check_model_inputs
    signature = forward_signature(dense_forward)

    @functools.wraps(dense_forward)  # the dense signature: diffusers' hooks bind arguments by it
    def forward(self, *args, **kwargs):
        mesh = getattr(self, "tp_mesh", None)
        if not torch.compiler.is_compiling():
            # The first call (every call in debug mode) checks that every rank got the same input shapes (every
            # rank of a hybrid mesh gets the whole input); the batch check comes second, so that ranks given
            # different inputs all get the agreement error.
            if inputs_check_due(self, {"args": args, **kwargs}):
                check_inputs_agree(self, self.tp_group if mesh is None else mesh.world_group,
                                   {"args": args, **kwargs})
            if check_model_inputs is not None:
                check_model_inputs(self, args, kwargs)
        if mesh is not None and mesh.hybrid:
            return hybrid_forward(self, family, dense_forward, signature, args, kwargs)
        return dense_forward(self, *args, **kwargs)

    return flavour(TPModelMixin, model_cls, __name__, namespace={"_repeated_blocks": repeated, "forward": forward},
                   name=model_cls.__name__)


def __getattr__(name: str):  # pickle finds the model flavours by their __qualname__
    return resolve(name, {TPModelMixin.__name__: TPModelMixin}, lambda _mixin, cls: _model_flavour(cls))


def parallelize(model: nn.Module, group=None, *, mesh=None, check_weights: bool = True,
                broadcast_from: int | None = None) -> nn.Module:
    """Shard a diffusers transformer of a registered family (``Flux2Transformer2DModel``,
    ``QwenImageTransformer2DModel``, ``Flux3Transformer2DModel``; see :mod:`.families`) over ``group`` (a
    ProcessGroup or 1-D DeviceMesh; default: the world) in place and return it. Any other class is refused
    (:class:`~tpfuse.tp_layers.families.UnsupportedModelError`, naming the supported ones), as is a world size that
    does not divide the heads (the error lists the valid sizes).

    ``check_weights`` (default on): before sharding, verify that every rank holds the same weights — one
    all-gather of a checksum per tensor (:func:`~tpfuse.tp_layers.consistency.check_weights_agree`; ``meta``
    tensors are skipped) — and raise :class:`~tpfuse.tp_layers.consistency.WeightMismatchError` naming the first
    tensor that differs. ``broadcast_from=r``: copy rank ``r``'s weights to every rank instead (the remedy when the
    ranks built the model without a shared seed).

    ``mesh``: a ``DeviceMesh`` whose dimension names are a subset of ``("dp", "cfg", "sp", "tp")`` (see
    :mod:`.mesh`): tensor parallelism over ``mesh["tp"]``, Ulysses sequence parallelism over ``"sp"``, the batch
    split over ``"dp"`` x ``"cfg"``; every rank returns the full output. Refused: unknown names, a mesh that does
    not cover the world, heads not divisible by tp x sp (the error lists the valid meshes). ``model.tp_mesh`` is
    the :class:`~tpfuse.tp_layers.mesh.ParallelMesh` (``None`` for plain tensor parallelism). The weight check and
    ``broadcast_from`` (a rank of the world) cover every rank of the mesh."""
    pm: ParallelMesh | None = resolve_mesh(mesh, group)
    group = resolve_group(group) if pm is None else pm.tp_group
    world_size = get_world_size(group)
    family = check_parallelizable(model, world_size)
    if pm is not None:
        pm.check_sizes(type(model).__name__, family.sizes(model))
        if pm.sp > 1 and not family.token_inputs:
            raise ValueError(f"parallelize: the {family.name} family declares no token inputs: it cannot be "
                             f"sequence-parallel (mesh {pm.name()})")
    sync_or_check(model, group if pm is None else pm.world_group, check_weights, broadcast_from,
                  type(model).__name__)
    for _path, blocks, shard in _block_lists(model, family):
        for i in range(len(blocks)):
            training = blocks[i].training
            blocks[i] = shard(blocks[i], group)  # the dense block is dropped here
            blocks[i].train(training)  # the modules it created follow the block's mode
    if family.after_parallelize is not None:
        family.after_parallelize(model)
    if family.after_meta_build is not None:  # a model built on meta (from_pretrained, or by hand) -> load_sharded
        family.after_meta_build(model)
    model.tp_world_size = world_size
    model.tp_group = group
    model.tp_mesh = pm
    model.tp_sequence = None
    if pm is not None:
        model.tp_sequence = attach_sequence_parallel(model, pm)
        if model.tp_sequence is not None and family.attach_sequence is not None:
            family.attach_sequence(model, model.tp_sequence)
        install_gradient_sync(model, pm)
    dense_module = type(model).__module__
    model.__class__ = _model_flavour(type(model))  # adapters sharded on load, gathered on save; _repeated_blocks
    # diffusers records a pipeline component as (module.__module__'s library, class name) in model_index.json: the
    # dense class's module ("diffusers..."), so a saved pipeline loads back. An instance attribute: pickle reads the
    # class's, which names this module (see __getattr__).
    model.__module__ = dense_module
    return model


def config_family(config: dict, where: str) -> Family:
    """The family a config's ``_class_name`` names (FLUX.2's when it names none, as in a bare FLUX.2 config), with
    the config checked by that family (one ``ValueError`` naming ``where`` and every bad field)."""
    # (a config that is not a JSON object is FLUX.2's validator's to refuse, naming the file)
    name = config.get("_class_name", "Flux2Transformer2DModel") if isinstance(config, dict) else \
        "Flux2Transformer2DModel"
    try:
        family = family_for_class(name if isinstance(name, str) else repr(name))
    except UnsupportedModelError:
        raise ValueError(f"{where}: _class_name={name!r}: the config of another model (tpfuse loads "
                         f"{supported_classes()})") from None
    if family.validate_config is not None:
        family.validate_config(config, where)
    return family


def _load_config(path: Path, subfolder: str | None) -> tuple[dict, Path] | None:
    """(the parsed ``config.json``, its path) at ``path`` or, without ``subfolder``, at ``path/transformer``;
    ``None`` if neither exists. A ``ValueError`` names the file for invalid JSON (not UTF-8, a field given twice,
    ...) and for a config its family's diffusers class cannot be built from (FLUX.2:
    :meth:`~tpfuse.tp_layers.flux2.config.Flux2Config.validate_dict`)."""
    from .checkpoint import read_json

    candidates = [path / "config.json"] if path.is_dir() else []
    if path.is_dir() and subfolder is None:
        candidates.append(path / "transformer" / "config.json")
    for c in candidates:
        if c.exists():
            config = read_json(c, "config")
            config_family(config, str(c))
            return config, c
    return None


def load_config(source, subfolder: str | None = None, revision: str | None = None, token=None,
                local_files_only: bool = False, variant: str | None = None) -> tuple[dict, Path]:
    """(diffusers config dict, the directory or file holding the weights) for a checkpoint source.

    The config is checked field by field by its family (FLUX.2: :meth:`Flux2Config.validate_dict`): one
    ``ValueError`` names ``config.json``'s path and every field whose type or range is wrong. A single file's
    config is inferred from its shapes (FLUX.2 only, diffusers or BFL keys). ``variant`` (e.g. ``"fp16"``): a Hub
    download fetches only that variant's weights; a single file's config is inferred only if it is that variant's.
    """
    from .checkpoint import _allow_patterns, check_variant

    check_variant(variant)
    path = resolve_source(source, subfolder, revision, token, allow_patterns=_allow_patterns(variant),
                          local_files_only=local_files_only)
    found = _load_config(path, subfolder)
    if found is None and not path.is_dir():
        return family_for_class("Flux2Transformer2DModel").infer_config(path, variant), path
    if found is None:
        raise ValueError(f"no config.json at {path} (pass subfolder=..., or a single checkpoint file)")
    config, file = found
    return config, file.parent


def from_pretrained(source, group=None, dtype: torch.dtype | None = None, subfolder: str | None = None,
                    revision: str | None = None, token=None, device=None, progress: bool = True,
                    local_files_only: bool = False, variant: str | None = None, mesh=None) -> nn.Module:
    """Config -> ``meta`` model -> :func:`parallelize` -> :func:`load_sharded`, in one call (``mesh``: a hybrid
    ``DeviceMesh``, as for :func:`parallelize`; each rank reads its tensor-parallel slices).

    ``source``: a diffusers model directory (``config.json`` + safetensors, of any registered family, chosen by the
    config's ``_class_name``; a pipeline directory's ``transformer/`` is found without ``subfolder``), a single
    FLUX.2 safetensors file (diffusers or BFL keys; the config
    is inferred from the shapes, RoPE axes split evenly), or a Hub repo id (e.g.
    ``black-forest-labs/FLUX.2-klein-4B`` with ``subfolder="transformer"``; ``local_files_only=True`` reads only
    the Hub cache, as in diffusers). ``variant`` (e.g. ``"fp16"``) reads that variant's weight files, as diffusers'
    ``from_pretrained`` does (see :func:`load_sharded`). The model comes back in ``eval()``
    mode; ``model.tp_load_report`` is the rank's :class:`LoadReport`.
    """
    from .checkpoint import check_block_counts

    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(f"dtype must be a floating-point torch.dtype (e.g. torch.bfloat16) or None, not {dtype!r}")
    # A validated dict: from_config would take anything else for a Hub repo id (a "couldn't connect" error).
    config, path = load_config(source, subfolder, revision, token, local_files_only, variant)
    family = config_family(config, str(path))
    if path.is_dir():  # (a single file's config was inferred from its blocks)
        check_block_counts(config, path, variant, family)
    with torch.device("meta"):
        model = family.model_class().from_config(config)
    if dtype is not None:
        model = model.to(dtype)
        # As diffusers' from_pretrained(torch_dtype=...): modules named in _keep_in_fp32_modules stay fp32 (FLUX.3's
        # Q/K norms, whose fp32 scales the fused projection then reads as they are).
        keep = getattr(model, "_keep_in_fp32_modules", None) or []
        for name, module in model.named_modules():
            if keep and any(k in name.split(".") for k in keep):
                module.to(torch.float32)
    parallelize(model, group, mesh=mesh)
    report: LoadReport = load_sharded(model, path, model.tp_group, device=device, progress=progress,
                                      variant=variant)
    model.tp_load_report = report
    return model.eval()
