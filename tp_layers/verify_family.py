"""``tpfuse verify --family qwenimage|flux3``: a parallelized diffusers model against the dense one, any family.

Every rank builds the same seeded dense model of a family preset (:attr:`Family.presets`: ``tiny``, or one block
per block list at the real width), parallelizes a copy with :func:`~tpfuse.tp_layers.parallelize`, and runs
forward and backward on both with the same seeded inputs and output gradient. Checked, relative to the dense
model's Frobenius norm (tolerances from :mod:`.numerics`): the output, the gradient of every floating-point input,
and every weight gradient (a sharded weight's gradient against the same shard of the dense one); the outputs are
compared bitwise across ranks; each rank's share of the block weights is reported (~1/N).
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time

import torch
from torch import nn

from .comm import get_rank
from .families import family_named
from .launch import run_ranks
from .numerics import rel_error, tolerance
from .sharding import shard_tensor

__all__ = ["FamilyCheck", "FamilyResult", "check_family", "format_family_result"]

_DTYPES = {"float32": torch.float32, "float64": torch.float64}


@dataclasses.dataclass
class FamilyCheck:
    name: str
    error: float
    tol: float

    @property
    def ok(self) -> bool:
        return self.error <= self.tol


@dataclasses.dataclass
class FamilyResult:
    family: str
    preset: str
    world_size: int
    dtype: str
    checks: list[FamilyCheck]
    identical_on_ranks: bool
    weight_share: list[float]  # each rank's block-weight bytes over the dense model's
    sharded_share: list[float]  # each rank's share of the plan's sharded matrices (1/N)
    seconds: float
    mesh: str | None = None  # a hybrid mesh ("sp2xtp2"), or None for tensor parallelism over world_size ranks

    @property
    def ok(self) -> bool:
        return self.identical_on_ranks and all(c.ok for c in self.checks)


def _block_bytes(model: nn.Module, prefixes: tuple[str, ...]) -> int:
    return sum(p.numel() * p.element_size() for n, p in model.named_parameters() if n.startswith(prefixes))


def _run(model: nn.Module, inputs: dict, seed: int):
    """Output, input gradients, weight gradients of one seeded forward + backward."""
    inputs = {k: (v.detach().clone().requires_grad_() if isinstance(v, torch.Tensor) and v.is_floating_point()
                  else v) for k, v in inputs.items()}
    out = model(**inputs, return_dict=False)[0]
    g = torch.Generator().manual_seed(seed)
    out.backward(torch.randn(out.shape, generator=g).to(out))
    in_grads = {k: v.grad for k, v in inputs.items() if isinstance(v, torch.Tensor) and v.grad is not None}
    return out.detach(), in_grads, {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


def _shard_of(tp: nn.Module, name: str, dense: torch.Tensor) -> torch.Tensor:
    """What a parallelized model's parameter ``name`` holds of the dense tensor (its gradient, its value): the
    owner's shard rule (:meth:`split_dim`; a LoRA matrix follows its layer's rule), else all of it."""
    from .lora import _sharded_dim

    path, _, attr = name.rpartition(".")
    owner = tp.get_submodule(path)
    if ".lora_" in name:
        base, dim = _sharded_dim(tp, name, None)
    else:
        base, dim = owner, (owner.split_dim(attr) if hasattr(owner, "split_dim") else None)
    if dim is None:
        return dense
    return shard_tensor(dense, dim, get_rank(base.group), base.world_size, base.blocks)


def build_mesh(spec: dict[str, int]):
    """A ``DeviceMesh`` over the world with ``spec``'s dims (``{"sp": 2, "tp": 2}``) in canonical order."""
    from torch.distributed.device_mesh import init_device_mesh

    from .mesh import MESH_DIMS

    names = tuple(d for d in MESH_DIMS if d in spec)
    device = "cuda" if torch.distributed.get_backend() == "nccl" else "cpu"
    return init_device_mesh(device, tuple(spec[d] for d in names), mesh_dim_names=names)


def _rank_check(family_name: str, preset: str, dtype_name: str, seed: int, batch: int, txt: int, img: int,
                mesh: dict[str, int] | None = None):
    from .model import parallelize

    fam = family_named(family_name)
    dtype = _DTYPES[dtype_name]
    dense = fam.random_model(preset, seed)
    if dtype != torch.float32:
        dense = dense.to(dtype)
    tp = parallelize(copy.deepcopy(dense), mesh=None if mesh is None else build_mesh(mesh))
    inputs = fam.random_inputs(dense, batch, txt, img, seed + 1)
    ref_out, ref_in, ref_w = _run(dense, inputs, seed + 2)
    start = time.perf_counter()
    out, in_grads, w_grads = _run(tp, inputs, seed + 2)
    seconds = time.perf_counter() - start
    checks = [("output", rel_error(out, ref_out))]
    checks += [(f"grad {k}", rel_error(in_grads[k], ref_in[k])) for k in sorted(ref_in)]
    worst, worst_name = 0.0, "-"
    for name, grad in w_grads.items():
        err = rel_error(grad, _shard_of(tp, name, ref_w[name]))
        if err >= worst:
            worst, worst_name = err, name
    if set(w_grads) != set(ref_w):
        worst, worst_name = float("inf"), f"parameters with gradients differ: {sorted(set(w_grads) ^ set(ref_w))[:3]}"
    checks.append((f"weight grads (worst: {worst_name})", worst))
    prefixes = fam.block_prefixes()
    share = _block_bytes(tp, prefixes) / max(1, _block_bytes(dense, prefixes))
    # The plan's sharded matrices alone (exactly 1/N; the rest of a block is its replicated norms and row biases).
    dense_params = dict(dense.named_parameters())
    sharded = [(p, dense_params[n]) for n, p in tp.named_parameters()
               if hasattr(tp.get_submodule(n.rpartition(".")[0]), "split_dim")
               and tp.get_submodule(n.rpartition(".")[0]).split_dim(n.rpartition(".")[2]) is not None]
    sharded_share = sum(p.numel() for p, _ in sharded) / max(1, sum(d.numel() for _, d in sharded))
    return out, checks, (share, sharded_share), seconds


def mesh_and_world(mesh: str | None, world_size: int | None) -> tuple[dict[str, int] | None, int]:
    """``(--mesh parsed, or None; the number of ranks)``: the mesh's size when ``world_size`` is None, a
    ``ValueError`` when both are given and disagree or the world size is not a positive int."""
    spec = None
    if mesh is not None:
        from .mesh import parse_mesh_spec

        spec = parse_mesh_spec(mesh)
        size = math.prod(spec.values())
        if world_size not in (None, size):
            raise ValueError(f"--world-size {world_size} and --mesh {mesh} ({size} ranks) disagree")
        world_size = size
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"--world-size must be a positive int, got {world_size!r}")
    return spec, world_size


def check_family(family: str, preset: str = "tiny", world_size: int = 2, dtype: str = "float32", seed: int = 0,
                 batch: int = 2, txt_tokens: int = 7, img_tokens: int = 15, backend: str | None = None,
                 mesh: str | None = None) -> FamilyResult:
    """Run the check on ``world_size`` ranks (gloo by default) and gather the results (see the module doc).
    ``mesh`` (e.g. ``"sp2xtp2"``): a hybrid mesh of that many ranks instead (``world_size`` must be its size or
    ``None``): the whole model's output, input and weight gradients against the dense model's."""
    fam = family_named(family)
    if fam.random_model is None or not fam.presets:
        raise ValueError(f"the {family} family has no presets for `tpfuse verify --family`")
    if preset not in fam.presets:
        raise ValueError(f"unknown {family} preset {preset!r}; known: {sorted(fam.presets)}")
    if dtype not in _DTYPES:
        raise ValueError(f"--dtype must be one of {sorted(_DTYPES)} for a family check, got {dtype!r}")
    for name, value in (("batch", batch), ("txt-tokens", txt_tokens), ("img-tokens", img_tokens)):
        if value < 1:
            raise ValueError(f"--{name} must be >= 1, got {value}")
    spec, world_size = mesh_and_world(mesh, world_size)
    from .model import check_parallelizable

    # Refused before any rank starts: a world size the heads (or the MLP) do not divide, listing the valid ones.
    meta = fam.random_model(preset, seed, meta=True)
    check_parallelizable(meta, world_size if spec is None else spec.get("tp", 1))
    if spec is not None:
        from .mesh import check_mesh_sizes

        check_mesh_sizes(spec, f"--mesh {mesh} ({family} preset {preset})", fam.sizes(meta))
        if batch % (spec.get("dp", 1) * spec.get("cfg", 1)):
            raise ValueError(f"--batch {batch} does not split over dp*cfg={spec.get('dp', 1) * spec.get('cfg', 1)}")
    per_rank = run_ranks(_rank_check, world_size, family, preset, dtype, seed, batch, txt_tokens, img_tokens, spec,
                         backend=backend)
    tol = tolerance(_DTYPES[dtype])
    worst = {}
    for _, checks, _, _ in per_rank:
        for name, err in checks:
            key = name.split(" (worst")[0]
            if key not in worst or err >= worst[key][1]:
                worst[key] = (name, err)
    identical = all(torch.equal(r[0], per_rank[0][0]) for r in per_rank)
    return FamilyResult(family, preset, world_size, dtype, [FamilyCheck(n, e, tol) for n, e in worst.values()],
                        identical, [r[2][0] for r in per_rank], [r[2][1] for r in per_rank],
                        max(r[3] for r in per_rank), mesh)


def format_family_result(res: FamilyResult) -> str:
    where = f"mesh {res.mesh} ({res.world_size} ranks)" if res.mesh else f"{res.world_size} rank(s)"
    lines = [f"tpfuse verify --family {res.family}: preset {res.preset}, {where}, {res.dtype}"]
    for c in res.checks:
        lines.append(f"  {'PASS' if c.ok else 'FAIL'}  {c.name}: relative error {c.error:.2e} (tolerance {c.tol:.0e})")
    lines.append(f"  {'PASS' if res.identical_on_ranks else 'FAIL'}  output identical on every rank")
    shares = ", ".join(f"{s:.3f}" for s in res.weight_share)
    sharded = ", ".join(f"{s:.3f}" for s in res.sharded_share)
    n = res.world_size
    if res.mesh:
        from .mesh import parse_mesh_spec

        n = parse_mesh_spec(res.mesh).get("tp", 1)
    lines.append(f"  per rank / dense: sharded matrices {sharded} (1/tp = {1 / n:.3f}), all block "
                 f"weights {shares}; TP forward+backward {res.seconds:.2f} s")
    lines.append("OK" if res.ok else "FAILED")
    return "\n".join(lines)
