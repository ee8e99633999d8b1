"""The model-level half of hybrid parallelism (:mod:`.mesh`): split a forward's inputs over the batch (dp x cfg)
and sequence (sp) groups, run the dense forward on the local part, gather the output.

What is split is data in each family (:class:`~tpfuse.tp_layers.families.Family`): ``token_inputs`` (argument ->
(token stream, token dim); a list or tuple argument is split element by element), ``batch_inputs`` (arguments with
a batch dim: tensors split on dim 0 when it is the forward's batch, lists sliced), ``output_stream`` (the stream of
the output's tokens, dim 1) and ``attention_streams`` (the stream sequences attention runs over, which tell the
all-to-all every rank's token count without communication).

Autograd: a split input's gradient is all-gathered (every rank returns the dense input gradient), a replicated
floating-point input that requires grad gets its gradient all-reduced over the groups that split the others (its
every use sees only the local tokens / samples), and the output's gather gives each rank back its slice. With the
parameter-gradient sum over the replica group (:func:`~tpfuse.tp_layers.mesh.install_gradient_sync`), a loss on
the (identical) gathered output gives every rank the dense gradients.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn

from .comm import copy_to_tp_region
from .mesh import ParallelMesh, install_gradient_sync
from .sequence import SequenceParallel, SequenceParallelError, gather_tokens, split_sizes, split_tokens

__all__ = ["attach_sequence_parallel", "check_processors", "forward_signature", "hybrid_forward"]


def _attention_modules(model: nn.Module):
    return [(n, m) for n, m in model.named_modules() if hasattr(m, "processor") and hasattr(m, "set_processor")]


def attach_sequence_parallel(model: nn.Module, pm: ParallelMesh) -> SequenceParallel | None:
    """sp > 1: every attention processor carries the model's :class:`SequenceParallel` as its ``_parallel_config``
    (tpfuse's attention and the model module's wrapped ``dispatch_attention_fn`` run Ulysses when they see it)."""
    if pm.sp == 1:
        return None
    import sys

    from .sequence import wrap_dispatch

    sp = SequenceParallel(pm.sp_group)
    # (kept: check_processors runs on every eager forward; walking FLUX.2 dev's modules costs 1.2 ms, this list 7 us)
    model._tpfuse_attention_modules = _attention_modules(model)
    for _, module in model._tpfuse_attention_modules:
        module.processor._parallel_config = sp
    for cls in type(model).__mro__:  # the dense class's module: where diffusers' processors of this model live
        if cls.__module__.startswith("diffusers."):
            wrap_dispatch(sys.modules[cls.__module__])
            break
    return sp


def check_processors(model: nn.Module, sp: SequenceParallel) -> None:
    """Refuse a forward in which an attention processor does not carry the model's sp group (a processor set
    after ``parallelize``: it would attend over this rank's tokens only)."""
    for name, module in model._tpfuse_attention_modules:
        proc = module.processor
        if getattr(proc, "_parallel_config", None) is not sp:
            raise SequenceParallelError(
                f"{name}.processor ({type(proc).__name__}) was set after parallelize and does not run sequence-"
                f"parallel attention (sp={sp.size}): it would attend over this rank's tokens only. Give it the "
                f"model's sequence-parallel config: `{name}.processor._parallel_config = model.tp_sequence`")


def _tensors(value):
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [v for v in value if isinstance(v, torch.Tensor)]
    return []


def _map(value, fn):
    if isinstance(value, torch.Tensor):
        return fn(value)
    if isinstance(value, (list, tuple)):
        return type(value)(fn(v) if isinstance(v, torch.Tensor) else v for v in value)
    return value


def _batch_of(family, args: dict) -> int | None:
    sizes = [t.shape[0] for n in family.batch_inputs for t in _tensors(args.get(n)) if t.dim() > 0]
    return max(sizes) if sizes else None


def forward_signature(forward) -> tuple[inspect.Signature, str]:
    """The dense forward's signature (:func:`hybrid_forward` binds every call's arguments by it; computed once per
    model class, outside traced code) and the name of its ``**kwargs`` (``""``: none)."""
    sig = inspect.signature(forward)
    return sig, next((n for n, p in sig.parameters.items() if p.kind is p.VAR_KEYWORD), "")


def hybrid_forward(model: nn.Module, family, dense_forward, signature: tuple[inspect.Signature, str], args: tuple,
                   kwargs: dict):
    """``dense_forward(model, ...)`` on this rank's share of the batch and tokens; the output gathered."""
    pm: ParallelMesh = model.tp_mesh
    sp: SequenceParallel | None = model.tp_sequence
    sig, var_keyword = signature
    a: dict[str, Any] = dict(sig.bind(model, *args, **kwargs).arguments)
    del a[next(iter(a))]  # self
    a.update(a.pop(var_keyword, {}))
    if family.check_mesh_inputs is not None:
        family.check_mesh_inputs(model, a, pm)
    # ids of the tensors already split over the batch / token groups (their gradients are gathered, not reduced);
    # `alive` holds every tensor whose id is recorded until the call returns, so that no id is reused meanwhile
    batch_split: set[int] = set()
    token_split: set[int] = set()
    alive: list[torch.Tensor] = []

    batch = _batch_of(family, a)
    if pm.batch > 1 and batch is not None:
        if batch % pm.batch:
            raise ValueError(f"{type(model).__name__}: the batch of {batch} does not split over dp*cfg={pm.batch} "
                             f"(mesh {pm.name()}): pass a batch divisible by {pm.batch} (for cfg: the "
                             "unconditional and conditional halves in one batch; diffusers' pipelines call the "
                             "transformer once per branch, for them use a mesh without cfg/dp)")
        sizes = [batch // pm.batch] * pm.batch
        for name in family.batch_inputs:
            if name not in a:
                continue
            value = a[name]
            if isinstance(value, list) and len(value) == batch and not _tensors(value):  # e.g. Qwen's img_shapes
                r = torch.distributed.get_rank(pm.batch_group)
                a[name] = value[r * sizes[0]:(r + 1) * sizes[0]]
                continue

            def cut(t, sizes=sizes):
                if t.dim() == 0 or t.shape[0] != batch:
                    return t  # broadcast over the batch (a batch of 1, a scalar): replicated
                out = split_tokens(t, 0, sizes, pm.batch_group)
                batch_split.add(id(out))
                alive.append(out)
                return out

            a[name] = _map(value, cut)

    streams: dict[str, int] = {}
    if sp is not None:
        for name, (stream, dim) in family.token_inputs.items():
            for t in _tensors(a.get(name)):
                n = t.shape[dim]
                if streams.setdefault(stream, n) != n:
                    raise ValueError(f"{type(model).__name__}: {name} has {n} {stream} tokens (dim {dim}), another "
                                     f"input {streams[stream]}: the inputs of one token stream must agree")
        short = {s: n for s, n in streams.items() if 0 < n < sp.size}
        if short:
            # Every rank needs a token of each stream: diffusers' code reduces over a rank's tokens (Qwen-Image's
            # text-mask length) and an empty launch is not a kernel shape. Every rank sees the whole input, so all
            # refuse alike.
            which = ", ".join(f"{s} stream has {n} token(s)" for s, n in short.items())
            raise ValueError(f"{type(model).__name__}: the {which}, fewer than sp={sp.size} (mesh {pm.name()}): "
                             "every rank of the sp group needs at least one token of each stream; use a smaller sp")
        for name, (stream, dim) in family.token_inputs.items():
            if name not in a:
                continue
            sizes = split_sizes(streams.get(stream, 0), sp.size)  # (an absent stream has no tensor to cut)

            def cut(t, dim=dim, sizes=sizes):
                out = split_tokens(t, dim, sizes, pm.sp_group)
                token_split.add(id(out))
                if id(t) in batch_split:
                    batch_split.add(id(out))
                alive.append(out)
                return out

            a[name] = _map(a[name], cut)

    # Replicated inputs that need a gradient: each rank's use covers its tokens / samples only -> all-reduce.
    def replicate(t):
        if not (t.is_floating_point() and t.requires_grad):
            return t
        tid = id(t)
        if sp is not None and tid not in token_split:
            t = copy_to_tp_region(t, pm.sp_group)
        if pm.batch > 1 and tid not in batch_split:
            t = copy_to_tp_region(t, pm.batch_group)
        return t

    a = {k: _map(v, replicate) for k, v in a.items()}

    if not torch.compiler.is_compiling():  # (eager only: a compiled forward would guard on every parameter)
        install_gradient_sync(model, pm)  # parameters added since the last forward (a LoRA adapter)
    if sp is not None:
        if not torch.compiler.is_compiling():
            check_processors(model, sp)
        with sp.layout(streams, family.attention_streams):
            out = dense_forward(model, **a)
        gather = family.output_stream if family.output_stream in streams else None
    else:
        out = dense_forward(model, **a)
        gather = None

    def full(t):
        if not isinstance(t, torch.Tensor):
            return t
        if gather is not None:
            t = gather_tokens(t, 1, split_sizes(streams[gather], sp.size), pm.sp_group)
        if pm.batch > 1 and batch is not None and t.dim() > 0:
            t = gather_tokens(t, 0, [t.shape[0]] * pm.batch, pm.batch_group)
        return t

    if isinstance(out, tuple):
        return (full(out[0]), *out[1:])
    if hasattr(out, "sample"):
        out.sample = full(out.sample)
        return out
    return full(out)

