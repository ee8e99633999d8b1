"""What each FLUX.2 preset needs per rank: the world sizes its blocks can be sharded over and the parameter bytes a
rank holds at each (``tpfuse presets``, the README's table). Computed from the model's structure, without building
it; a test checks the numbers against parallelized diffusers models.

A rank of :func:`~tpfuse.tp_layers.model.parallelize` holds 1/N of every block matrix (the column- and
row-parallel projections, see :mod:`~tpfuse.tp_layers.flux2.tp_blocks`) and a full copy of everything else: the
timestep/guidance embedders, the three modulation linears, ``x_embedder``, ``context_embedder``, the QK-norm
weights and the final layer (``norm_out``, ``proj_out``).
"""

from __future__ import annotations

import math

from .config import PRESETS, Flux2Config

__all__ = ["TABLE_WORLD_SIZES", "DTYPE_BYTES", "valid_world_sizes", "check_world_size", "param_counts",
           "param_bytes_per_rank", "preset_table", "format_preset_table"]

# The world sizes the table shows (one node of up to 8 GPUs, and two nodes of 8).
TABLE_WORLD_SIZES = (1, 2, 3, 4, 5, 6, 7, 8, 16)
DTYPE_BYTES = {"float32": 4, "float64": 8, "bfloat16": 2, "float16": 2}
# The dtype the checkpoints ship in; tiny is a test shape, run in fp32.
_DEFAULT_DTYPE = {"tiny": "float32"}


def valid_world_sizes(cfg: Flux2Config) -> list[int]:
    """Every world size the tensor-parallel blocks accept: the common divisors of the attention heads and the MLP
    width (each rank takes whole heads and an equal slice of the MLP)."""
    g = math.gcd(cfg.heads, cfg.mlp_hidden)
    return [n for n in range(1, g + 1) if g % n == 0]


def check_world_size(cfg: Flux2Config, world_size: int, what: str | None = None, arg: str = "world_size") -> None:
    """``ValueError`` naming ``arg`` (``--world-size`` from the command line) and listing the valid sizes unless
    ``world_size`` is one of them."""
    if isinstance(world_size, bool) or not isinstance(world_size, int):
        raise ValueError(f"{arg} must be an integer, got {world_size!r}")
    valid = valid_world_sizes(cfg)
    if world_size not in valid:
        name = what or cfg.name
        sep = " " if arg.startswith("--") else "="
        raise ValueError(f"{arg}{sep}{world_size} is not valid for {name}: the world size must divide its "
                         f"{cfg.heads} attention heads and its MLP width {cfg.mlp_hidden}; valid: "
                         f"{', '.join(map(str, valid))}")


def param_counts(cfg: Flux2Config) -> tuple[int, int]:
    """``(replicated, sharded)`` parameter counts of diffusers' ``Flux2Transformer2DModel`` for ``cfg`` (no biases:
    FLUX.2 builds every linear with ``bias=False``)."""
    d, m, hd = cfg.hidden_size, cfg.mlp_hidden, cfg.head_dim
    embedders = (cfg.timestep_guidance_channels * d + d * d) * (2 if cfg.guidance_embeds else 1)
    modulation = 2 * (6 * d * d) + 3 * d * d  # double img, double txt, single
    inputs = cfg.in_channels * d + cfg.joint_attention_dim * d  # x_embedder, context_embedder
    out_channels = cfg.out_channels or cfg.in_channels
    final = 2 * d * d + d * cfg.patch_size ** 2 * out_channels  # norm_out.linear, proj_out
    qk_norms = 4 * hd * cfg.num_layers + 2 * hd * cfg.num_single_layers
    replicated = embedders + modulation + inputs + final + qk_norms
    # double: to_q/k/v, add_q/k/v_proj, to_out.0, to_add_out (d x d each), ff and ff_context (linear_in 2m x d,
    # linear_out d x m); single: to_qkv_mlp_proj (3d + 2m) x d, to_out d x (d + m)
    double = 8 * d * d + 2 * 3 * m * d
    single = (3 * d + 2 * m) * d + d * (d + m)
    return replicated, double * cfg.num_layers + single * cfg.num_single_layers


def param_bytes_per_rank(cfg: Flux2Config, world_size: int, dtype="bfloat16") -> int:
    """Parameter bytes one rank holds after ``parallelize`` over ``world_size`` ranks (exact: every sharded matrix
    splits evenly at a valid world size). ``dtype``: a name of :data:`DTYPE_BYTES` or a ``torch.dtype``."""
    check_world_size(cfg, world_size)
    itemsize = DTYPE_BYTES.get(dtype) if isinstance(dtype, str) else getattr(dtype, "itemsize", None)
    if itemsize is None:
        raise ValueError(f"dtype must be one of {sorted(DTYPE_BYTES)} or a torch.dtype, got {dtype!r}")
    replicated, sharded = param_counts(cfg)
    return (replicated + sharded // world_size) * itemsize


def preset_table(dtype: str | None = None) -> list[dict]:
    """One row per preset, smallest first: ``name``, ``heads``, ``mlp_width``, ``dtype`` (``dtype``; default bf16,
    fp32 for tiny), ``world_sizes`` (the valid ones among :data:`TABLE_WORLD_SIZES`), ``all_world_sizes`` and
    ``bytes_per_rank`` (``{world size: bytes}`` for each valid table size)."""
    rows = []
    for name, cfg in sorted(PRESETS.items(), key=lambda item: sum(param_counts(item[1]))):
        dt = dtype or _DEFAULT_DTYPE.get(name, "bfloat16")
        valid = valid_world_sizes(cfg)
        sizes = [n for n in TABLE_WORLD_SIZES if n in valid]
        rows.append({"name": name, "heads": cfg.heads, "mlp_width": cfg.mlp_hidden, "dtype": dt,
                     "world_sizes": sizes, "all_world_sizes": valid,
                     "bytes_per_rank": {n: param_bytes_per_rank(cfg, n, dt) for n in sizes}})
    return rows


def _human(n: int) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"


def format_preset_table(dtype: str | None = None) -> str:
    """:func:`preset_table` as a Markdown table: every valid world size, and the bytes per rank in a column per
    world size of :data:`TABLE_WORLD_SIZES` that some preset accepts ("—": refused)."""
    rows = preset_table(dtype)
    columns = [n for n in TABLE_WORLD_SIZES if any(n in r["world_sizes"] for r in rows)]
    head = ["preset", "heads", "MLP width", "valid world sizes", "dtype", *(f"N={n}" for n in columns)]
    lines = ["| " + " | ".join(head) + " |",
             "|---|---:|---:|---|---|" + "---:|" * len(columns)]
    for r in rows:
        cells = [_human(r["bytes_per_rank"][n]) if n in r["bytes_per_rank"] else "—" for n in columns]
        lines.append(f"| {r['name']} | {r['heads']} | {r['mlp_width']} | {', '.join(map(str, r['all_world_sizes']))} | "
                     f"{r['dtype']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
