"""Hybrid parallelism on a ``DeviceMesh``: tensor (``tp``) x Ulysses sequence (``sp``) x CFG (``cfg``) x data
(``dp``) parallelism.

``parallelize(model, mesh=mesh)`` takes a mesh whose dimension names are a subset of ``("dp", "cfg", "sp", "tp")``
(in any order: the names, not the positions, say what a dimension does):

* ``tp``: tensor parallelism inside every block (what ``group=`` gives; ~1/tp of the block weights per rank);
* ``sp``: Ulysses sequence parallelism (:mod:`.sequence`): every rank of an sp group holds a contiguous ~1/sp of
  every token stream after the model's inputs are split; attention all-to-alls Q/K/V to all tokens and 1/sp of the
  rank's heads, and back; the output is gathered once, after the final layer;
* ``cfg`` / ``dp``: the batch is split in contiguous chunks over the ``dp x cfg`` ranks (a CFG pipeline's
  unconditional and conditional halves, or independent requests) and the output gathered.

Every rank returns the full output, as with tensor parallelism alone. Backward: a split input's gradient is
all-gathered, a replicated input's all-reduced, and every parameter's gradient is summed over the ranks that hold
the same shard (``dp x cfg x sp``), so training (LoRA included) gets the dense gradients.

:class:`ParallelMesh` turns the user's mesh into the groups tpfuse needs: it rebuilds it as a 4-D mesh in the
canonical order with size-1 dimensions for the missing names (the same ranks in every group as the user's mesh),
flattens ``dp x cfg`` (the batch group) and ``dp x cfg x sp`` (the replica group).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

import torch
import torch.distributed as dist

__all__ = ["MESH_DIMS", "ParallelMesh", "parse_mesh_spec", "valid_meshes"]

MESH_DIMS = ("dp", "cfg", "sp", "tp")  # outer to inner: tp innermost keeps a tensor-parallel group inside a node


def parse_mesh_spec(spec: str) -> dict[str, int]:
    """``"sp2xtp2"`` (or ``"dp2,sp2,tp2"``) -> ``{"sp": 2, "tp": 2}``; a ``ValueError`` naming what is wrong."""
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"mesh spec must be a string like 'sp2xtp2', got {spec!r}")
    out: dict[str, int] = {}
    for part in re.split(r"[x,*]", spec.strip().lower()):
        m = re.fullmatch(r"\s*([a-z]+)\s*(\d+)\s*", part)
        if m is None:
            raise ValueError(f"mesh spec {spec!r}: {part!r} is not <dim><size> (dims: {', '.join(MESH_DIMS)})")
        name, size = m.group(1), int(m.group(2))
        if name not in MESH_DIMS:
            raise ValueError(f"mesh spec {spec!r}: unknown dimension {name!r} (dims: {', '.join(MESH_DIMS)})")
        if name in out:
            raise ValueError(f"mesh spec {spec!r}: dimension {name!r} given twice")
        if size < 1:
            raise ValueError(f"mesh spec {spec!r}: {name} size must be >= 1, got {size}")
        out[name] = size
    return out


def mesh_name(sizes: dict[str, int]) -> str:
    """``{"sp": 2, "tp": 2}`` -> ``"sp2xtp2"`` (canonical order, size-1 dims dropped; ``"tp1"`` for one rank)."""
    parts = [f"{d}{sizes[d]}" for d in MESH_DIMS if sizes.get(d, 1) > 1]
    return "x".join(parts) or "tp1"


def valid_meshes(world: int, heads: int, *divide_by_tp: int) -> list[str]:
    """The (sp, tp) factorizations of ``world`` (the rest dp) whose tp x sp divides the heads (and tp the other
    sizes), as mesh names."""
    out = []
    for tp in range(1, world + 1):
        for sp in range(1, world // tp + 1):
            if world % (tp * sp) or heads % (tp * sp) or any(s % tp for s in divide_by_tp):
                continue
            out.append(mesh_name({"dp": world // (tp * sp), "sp": sp, "tp": tp}))
    return out


def check_mesh_sizes(dims: dict[str, int], what: str, sizes: dict[str, int]) -> None:
    """Refuse a mesh (``dims``: size by dimension name) whose tp x sp does not divide a family's
    ``num_attention_heads`` (or tp its other ``sizes``, e.g. the MLP width), listing the valid meshes."""
    tp, sp = dims.get("tp", 1), dims.get("sp", 1)
    others = {k: v for k, v in sizes.items() if k != "num_attention_heads"}
    heads = sizes["num_attention_heads"]
    bad = [f"num_attention_heads={heads} not divisible by tp*sp={tp * sp}"] if heads % (tp * sp) else []
    bad += [f"{k}={v} not divisible by tp={tp}" for k, v in others.items() if v % tp]
    if bad:
        world = math.prod(dims.values())
        raise ValueError(f"{what}: cannot use the mesh {mesh_name(dims)}: {'; '.join(bad)} (valid meshes of "
                         f"{world} ranks: {valid_meshes(world, heads, *others.values())}; cfg may replace a dp "
                         "factor)")


class ParallelMesh:
    """The groups of a hybrid mesh: ``tp_group``, ``sp_group``, ``batch_group`` (dp x cfg), ``replica_group``
    (dp x cfg x sp: the ranks holding the same shard) and ``world_group`` (the whole mesh); ``sizes`` by name."""

    def __init__(self, mesh):
        from torch.distributed.device_mesh import DeviceMesh

        if not isinstance(mesh, DeviceMesh):
            raise TypeError(f"mesh must be a torch.distributed.device_mesh.DeviceMesh, got {type(mesh).__name__}")
        names = tuple(mesh.mesh_dim_names or ())
        if len(names) != mesh.ndim:
            raise ValueError(f"the mesh's dimensions must be named (a subset of {MESH_DIMS}), got mesh_dim_names="
                             f"{mesh.mesh_dim_names!r}: build it with init_device_mesh(..., mesh_dim_names=...)")
        unknown = [n for n in names if n not in MESH_DIMS]
        if unknown:
            raise ValueError(f"mesh dimension names {unknown} are unknown: tpfuse's are {list(MESH_DIMS)} (tp: tensor, "
                             "sp: Ulysses sequence, cfg: classifier-free-guidance batch halves, dp: data parallel)")
        world = dist.get_world_size() if dist.is_initialized() else 1
        if mesh.size() != world:
            raise ValueError(f"the mesh {dict(zip(names, mesh.shape))} covers {mesh.size()} ranks but the world has "
                             f"{world}: the mesh must cover every rank (tpfuse gathers outputs over all of them)")
        self.sizes = {d: 1 for d in MESH_DIMS}
        self.sizes.update(dict(zip(names, (int(s) for s in mesh.shape))))
        self.user_mesh = mesh
        # The same ranks, as a 4-D mesh in canonical order (size-1 dims for the absent names).
        ranks = mesh.mesh.permute([names.index(d) for d in MESH_DIMS if d in names])
        ranks = ranks.reshape([self.sizes[d] for d in MESH_DIMS])
        self.mesh = DeviceMesh(mesh.device_type, ranks, mesh_dim_names=MESH_DIMS)
        self.tp_group = self.mesh.get_group("tp")
        self.sp_group = self.mesh.get_group("sp")
        self.batch_group = self._flat(("dp", "cfg"), "tpfuse_batch")
        self.replica_group = self._flat(("dp", "cfg", "sp"), "tpfuse_replica")
        self.world_group = None  # the default group: the mesh covers the world

    def _flat(self, dims: Sequence[str], name: str):
        big = [d for d in dims if self.sizes[d] > 1]
        if len(big) <= 1:
            return self.mesh.get_group(big[0] if big else dims[-1])
        return self.mesh[tuple(dims)]._flatten(name).get_group()

    @property
    def tp(self) -> int:
        return self.sizes["tp"]

    @property
    def sp(self) -> int:
        return self.sizes["sp"]

    @property
    def batch(self) -> int:
        return self.sizes["dp"] * self.sizes["cfg"]

    @property
    def replicas(self) -> int:
        return self.batch * self.sp

    @property
    def hybrid(self) -> bool:
        """More than tensor parallelism (inputs are split and outputs gathered)."""
        return self.replicas > 1

    def name(self) -> str:
        return mesh_name(self.sizes)

    def __repr__(self) -> str:
        return f"ParallelMesh({self.name()})"

    def __deepcopy__(self, memo):
        return self

    def check_sizes(self, model_name: str, sizes: dict[str, int]) -> None:
        """:func:`check_mesh_sizes` for this mesh."""
        check_mesh_sizes(self.sizes, model_name, sizes)

def resolve_mesh(mesh, group) -> ParallelMesh | None:
    """``mesh`` as a :class:`ParallelMesh`, or ``None`` for plain tensor parallelism over ``group``."""
    if mesh is None:
        return None
    if group is not None:
        raise ValueError("pass either group= (tensor parallelism over one group) or mesh= (a named DeviceMesh), "
                         "not both")
    return mesh if isinstance(mesh, ParallelMesh) else ParallelMesh(mesh)


def install_gradient_sync(model: torch.nn.Module, pm: ParallelMesh) -> int:
    """Sum every trainable parameter's gradient over the replica group (``dp x cfg x sp``) as backward produces it
    (a tensor hook: each backward's contribution is reduced before it is accumulated, so gradient accumulation
    stays exact). Parameters added later (a LoRA adapter) are hooked by the next eager forward. Returns how many
    parameters were newly hooked."""
    if pm.replicas == 1:
        return 0
    from .comm import all_reduce

    new = 0
    for p in model.parameters():
        if not p.requires_grad or getattr(p, "_tpfuse_grad_sync", None) is pm:
            continue
        # (marked on the Parameter itself: a parameter replaced by loading or by an adapter is a new object)
        p.register_hook(lambda g, group=pm.replica_group: all_reduce(g, group, phase="backward"))
        p._tpfuse_grad_sync = pm
        new += 1
    return new
