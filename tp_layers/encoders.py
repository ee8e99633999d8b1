"""Tensor-parallel text encoders: transformers' own tensor-parallel plans, run by tpfuse's layers.

Every transformers causal LM that supports tensor parallelism ships its plan as data: ``model._tp_plan`` (the base
model's ``config.base_model_tp_plan`` with its prefix, plus the head's), e.g. Qwen3's::

    {"model.embed_tokens": "embedding_rowwise", "model.layers.*.self_attn.q_proj": "colwise", ...,
     "model.layers.*.self_attn.o_proj": "rowwise", "model.layers.*.self_attn.q_norm":
     "replicated_with_grad_allreduce", ..., "lm_head": "colwise_gather_output"}

:func:`shard_text_encoder` reads that plan and executes it on a process group with tpfuse's layers (an existing
plan, not one of ours: Mistral3, Qwen3 and the other architectures whose plan uses the styles below on plain
``nn.Linear``/``nn.Embedding`` modules are covered by the plan their authors keep; a module with its own forward,
such as Gemma3's scaled embedding, or another style is refused by name). Why not transformers' own engine (``from_pretrained(tp_plan="auto")``): it builds its device
mesh over the whole world (it ignores a mesh passed in; tpfuse shards the encoder over a mesh's sub-group when
the world does not divide the heads), it shards only while loading (a pipeline already in memory cannot be
sharded), and its API moves quickly (transformers 5.21-5.28 deprecate and move its classes); tpfuse's layers are
plain ``nn.Linear``/``nn.Embedding`` subclasses whose collectives run on gloo and NCCL alike and whose sharded
loader reads only this rank's slices.

Styles (transformers' names) and what runs them:

=================================  ==============================================================================
``colwise``                        :class:`~tpfuse.tp_layers.ColumnParallelLinear` (output: this rank's heads/cols)
``rowwise``                        :class:`~tpfuse.tp_layers.RowParallelLinear` (input parallel, output all-reduced)
``colwise_gather_output``          :class:`~.embedding.VocabParallelLMHead` (vocabulary rows split, logits gathered)
``embedding_rowwise``              :class:`~.embedding.VocabParallelEmbedding` (vocabulary rows split, summed)
``replicated_with_grad_allreduce`` kept whole on every rank; its gradient summed over the group (per-head norms see
                                   only this rank's heads)
=================================  ==============================================================================

Everything outside the plan (RMSNorms, rotary tables, Mistral3's Pixtral vision tower and projector, which the
text-only prompts of FLUX.2 never run) stays replicated. The attention modules need no change: they reshape with
``-1`` heads and keep the query/key-value group ratio, which a contiguous split of whole heads preserves.
"""

from __future__ import annotations

import dataclasses
import logging
import re

import torch
from torch import nn

from .comm import all_reduce, get_rank, get_world_size, resolve_group
from .consistency import sync_or_check
from .embedding import VocabParallelEmbedding, VocabParallelLMHead
from .linear import ColumnParallelLinear, RowParallelLinear
from .tp_attention import tied_parameters

__all__ = ["EncoderSharding", "UnsupportedEncoderError", "encoder_tp_plan", "shard_text_encoder",
           "check_encoder_shardable", "check_text_encoder", "linear_weight_bytes", "STYLES"]

# transformers' style name -> what tpfuse does with a module of that style
STYLES = {
    "colwise": "column",
    "rowwise": "row",
    "colwise_gather_output": "vocab_head",
    "embedding_rowwise": "vocab_embedding",
    "replicated_with_grad_allreduce": "replicated_grad_sum",
}

logger = logging.getLogger("tpfuse.tp_layers")

_REPLICATE_HINT = "keep the text encoder replicated instead: parallelize_pipeline(pipe, text_encoder=\"replicate\")"


class UnsupportedEncoderError(ValueError):
    """A text encoder tpfuse cannot shard (no tensor-parallel plan, or a style it does not run)."""


@dataclasses.dataclass
class EncoderSharding:
    """What :func:`shard_text_encoder` did: the group, its size and this rank, and the plan it executed."""

    group: object
    world_size: int
    rank: int
    plan: dict[str, str]
    modules: dict[str, str]  # module name -> style applied


def encoder_tp_plan(model: nn.Module) -> dict[str, str]:
    """The model's tensor-parallel plan (module-name pattern -> style), as transformers declares it: the top
    model's ``_tp_plan`` (transformers collects the base model's plan into it, prefixed), else the config's
    ``base_model_tp_plan`` under the model's ``base_model_prefix``. :class:`UnsupportedEncoderError` naming the
    class when there is none."""
    plan = dict(getattr(model, "_tp_plan", None) or {})
    if not plan:
        config = getattr(model, "config", None)
        get_text = getattr(config, "get_text_config", None)
        base = getattr(get_text() if callable(get_text) else config, "base_model_tp_plan", None) or {}
        prefix = getattr(model, "base_model_prefix", "")
        plan = {(f"{prefix}.{k}" if prefix and hasattr(model, prefix) else k): v for k, v in base.items()}
    if not plan:
        raise UnsupportedEncoderError(
            f"the text encoder {type(model).__name__} has no tensor-parallel plan (transformers declares one per "
            f"architecture as `_tp_plan` / `config.base_model_tp_plan`; this one has none), so tpfuse cannot shard "
            f"it; {_REPLICATE_HINT}")
    return plan


def _pattern(key: str) -> re.Pattern:
    # transformers' wildcard: "*" stands for a layer index
    return re.compile(re.escape(key).replace(r"\*", r"\d+"))


def _matches(model: nn.Module, plan: dict[str, str]) -> dict[str, tuple[nn.Module, str]]:
    """module name -> (module, style) for every module a plan entry names; unknown styles and entries that name a
    parameter rather than a module are refused."""
    unknown = sorted({s for s in plan.values() if s not in STYLES})
    if unknown:
        raise UnsupportedEncoderError(
            f"the text encoder {type(model).__name__}'s tensor-parallel plan uses style(s) {unknown} that tpfuse does "
            f"not run (it runs {sorted(STYLES)}); {_REPLICATE_HINT}")
    patterns = [(_pattern(k), k, s) for k, s in plan.items()]
    params = {n for n, _ in model.named_parameters()}
    out = {}
    for name, module in model.named_modules():
        hits = [(k, s) for p, k, s in patterns if p.fullmatch(name)]
        if len(hits) > 1:
            raise UnsupportedEncoderError(f"{type(model).__name__}: module {name!r} matches several plan entries "
                                          f"{[k for k, _ in hits]}")
        if hits:
            out[name] = (module, hits[0][1])
    on_params = [k for p, k, _ in patterns if any(p.fullmatch(n) for n in params)]
    if on_params:
        raise UnsupportedEncoderError(f"{type(model).__name__}: plan entries {on_params} name parameters, not "
                                      f"modules; tpfuse shards whole modules; {_REPLICATE_HINT}")
    return out


def check_encoder_shardable(model_or_config, world_size: int, what: str | None = None) -> None:
    """Refuse, before anything is built or loaded, an encoder whose heads do not split into whole heads on
    ``world_size`` ranks (``model_or_config``: a transformers model or config)."""
    config = getattr(model_or_config, "config", model_or_config)
    get_text = getattr(config, "get_text_config", None)
    text = get_text() if callable(get_text) else config
    heads = getattr(text, "num_attention_heads", None)
    kv = getattr(text, "num_key_value_heads", None) or heads
    bad = [f"{n}={v}" for n, v in (("num_attention_heads", heads), ("num_key_value_heads", kv))
           if v is not None and v % world_size]
    if bad:
        name = what or type(model_or_config).__name__
        raise ValueError(f"{name}: cannot shard the text encoder over {world_size} ranks: {', '.join(bad)} not "
                         f"divisible by {world_size} (each rank takes whole attention heads); shard it over a "
                         f"group whose size divides them, or {_REPLICATE_HINT}")


def _check_module(name: str, module: nn.Module, style: str, world_size: int) -> str | None:
    kind = STYLES[style]
    base = {"column": nn.Linear, "row": nn.Linear, "vocab_head": nn.Linear, "vocab_embedding": nn.Embedding}.get(kind)
    if base is not None and not isinstance(module, base):
        return f"{name}: style {style!r} shards an {base.__name__}, found {type(module).__name__}"
    if base is not None and type(module).forward is not base.forward:
        # e.g. Gemma3's scaled word embedding (x embed_scale): the sharded layer would drop what its forward adds
        return (f"{name}: {type(module).__name__} has its own forward (not {base.__name__}'s), which the sharded "
                f"layer would not run")
    if kind == "column" and module.out_features % world_size:
        return f"{name}: out_features={module.out_features} not divisible by {world_size}"
    if kind == "row" and module.in_features % world_size:
        return f"{name}: in_features={module.in_features} not divisible by {world_size}"
    if kind == "vocab_head" and module.bias is not None:
        return f"{name}: a vocabulary-split head takes no bias"
    return None


def _grad_sum_hooks(module: nn.Module, group) -> None:
    """Sum ``module``'s parameter gradients over ``group`` (a per-head norm sees only this rank's heads). The tensor
    hooks are put on by a forward pre-hook, on whatever Parameters the module holds at its first grad-enabled
    forward: a hook on the Parameters of now would be lost when the sharded loader replaces them (a model built on
    ``meta``, then loaded). Each Parameter is marked, so it is hooked once."""

    def hook_params(mod, _args):
        if not torch.is_grad_enabled():
            return
        for p in mod.parameters(recurse=False):
            if p.requires_grad and not getattr(p, "_tpfuse_grad_sum", False):
                p.register_hook(lambda g: all_reduce(g, group, phase="backward"))
                p._tpfuse_grad_sum = True

    module.register_forward_pre_hook(hook_params)


def check_text_encoder(model: nn.Module, world_size: int, plan: dict[str, str] | None = None):
    """Everything :func:`shard_text_encoder` checks before it changes anything: the plan (transformers', or
    ``plan``), that it is not sharded yet, whole heads per rank, each planned layer's split dimension, the ties.
    Raises :class:`UnsupportedEncoderError` / ``ValueError`` naming the problem; returns ``(plan, matched modules,
    parameter name -> kind)``."""
    if getattr(model, "tp_encoder", None) is not None:
        raise ValueError(f"shard_text_encoder: {type(model).__name__} is already sharded (over "
                         f"{model.tp_encoder.world_size} ranks)")
    plan = dict(plan) if plan is not None else encoder_tp_plan(model)
    matched = _matches(model, plan)
    if not matched:
        raise UnsupportedEncoderError(f"{type(model).__name__}: no module matches its tensor-parallel plan "
                                      f"{sorted(plan)}; {_REPLICATE_HINT}")
    if world_size > 1:
        check_encoder_shardable(model, world_size)
    problems = [p for name, (m, s) in matched.items() if (p := _check_module(name, m, s, world_size))]
    # A tie is kept only between vocabulary-split modules of one vocabulary (their rows coincide); any other tie
    # would be split into separate shards.
    owners = {}
    for name, (m, s) in matched.items():
        for pname, _ in m.named_parameters(recurse=False):
            owners[f"{name}.{pname}" if name else pname] = STYLES[s]
    for tie in tied_parameters(model):
        kinds = {owners.get(n) for n in tie}
        if kinds <= {None} or kinds <= {"vocab_embedding", "vocab_head"}:
            continue
        problems.append(f"tied weights {tie} are sharded differently ({sorted(map(str, kinds))})")
    if problems:
        raise UnsupportedEncoderError(f"cannot shard the text encoder {type(model).__name__} over {world_size} "
                                      "ranks:\n  " + "\n  ".join(problems))
    return plan, matched, owners


def shard_text_encoder(model: nn.Module, group=None, *, plan: dict[str, str] | None = None,
                       check_weights: bool = True, broadcast_from: int | None = None) -> nn.Module:
    """Shard a transformers text encoder in place over ``group`` (a ``ProcessGroup`` or 1-D ``DeviceMesh``; default:
    the world) by its tensor-parallel plan (``plan``: override transformers' :func:`encoder_tp_plan`), and return it.

    Works on a model with real weights (every rank must hold the same ones: ``check_weights`` compares checksums,
    ``broadcast_from`` copies a rank's instead) and on one built on the ``meta`` device, which
    :func:`~tpfuse.tp_layers.checkpoint.load_sharded` then fills with this rank's slices. Nothing is changed when a
    check fails: the plan, the heads (whole heads per rank), every planned layer's split dimension and the ties
    (only a vocabulary table shared by the embedding and the head, split alike, may be tied) are checked first.
    ``model.tp_encoder`` records what was done (an :class:`EncoderSharding`).
    """
    group = resolve_group(group)
    world_size, rank = get_world_size(group), get_rank(group)
    plan, matched, owners = check_text_encoder(model, world_size, plan)
    if world_size > 1 and not any(STYLES[st] in ("column", "row") for _, st in matched.values()):
        # e.g. Qwen3-VL in transformers 5.25: its plan names only the vocabulary table and the head
        logger.warning("shard_text_encoder: %s's tensor-parallel plan splits no decoder layer (only %s); its layers "
                       "stay whole on every rank. Pass plan= with their entries (e.g. Qwen3's "
                       "'model.layers.*.self_attn.q_proj': 'colwise', ...) to split them", type(model).__name__,
                       sorted(matched))
    sync_or_check(model, group, check_weights, broadcast_from, type(model).__name__)
    ties = [t for t in tied_parameters(model) if {owners.get(n) for n in t} - {None}]
    applied = {}
    for name, (module, style) in matched.items():
        kind = STYLES[style]
        if kind == "replicated_grad_sum":
            if world_size > 1:
                _grad_sum_hooks(module, group)
            applied[name] = style
            continue
        if kind == "column":
            new = ColumnParallelLinear.from_dense(module, group, check_weights=False)
        elif kind == "row":
            new = RowParallelLinear.from_dense(module, group, check_weights=False, input_is_parallel=True)
        elif kind == "vocab_head":
            new = VocabParallelLMHead.from_dense(module, group, check_weights=False)
        else:
            new = VocabParallelEmbedding.from_dense(module, group, check_weights=False)
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, attr, new)
        applied[name] = style
    for tie in ties:  # the embedding's rows and the head's are the same rows: one Parameter again
        first = model.get_parameter(tie[0])
        for other in tie[1:]:
            mod, _, attr = other.rpartition(".")
            setattr(model.get_submodule(mod), attr, first)
    model.tp_encoder = EncoderSharding(group, world_size, rank, plan, applied)
    return model


def linear_weight_bytes(model: nn.Module) -> int:
    """Bytes of every ``nn.Linear`` and ``nn.Embedding`` weight (and bias) this rank holds in ``model`` — the
    sharded layers are subclasses, holding their shard — counting a tied table once. On a dense model: the dense
    total, so ``linear_weight_bytes(sharded) / linear_weight_bytes(dense)`` is the fraction a rank keeps."""
    seen, total = set(), 0
    for m in model.modules():
        if not isinstance(m, (nn.Linear, nn.Embedding)):
            continue
        for p in m.parameters(recurse=False):
            if id(p) not in seen:
                seen.add(id(p))
                total += p.numel() * p.element_size()
    return total
