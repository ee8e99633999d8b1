"""Full FLUX.2 transformer forward: tpfuse against diffusers' eager and compiled model (and DTensor TP); and one TP
two-stream block with its joint reductions against the per-stream reductions and the unfused path before them.

One GPU: klein-4B shapes (random weights, bf16), 512 text + 4096 image tokens; diffusers eager, diffusers
``torch.compile``, then the same model parallelized by tpfuse at TP 1 (the fused kernels: LayerNorm-modulation,
the single block's fused QKV+MLP projection, the double block's fused per-stream Q/K/V projection with the QK-norm
+ RoPE epilogue (``joint_qkv_proj``) and SwiGLU projection (``fused_linear_act``), row matmul with gate/residual
epilogue, both streams' row-parallel outputs reduced together).

Several GPUs: ``torchrun --nproc-per-node N bench/bench_model.py --distributed`` times tpfuse at TP N against
diffusers' ``enable_parallelism(config=TensorParallelConfig(tp_degree=N))`` on the same weights. Each tpfuse row
counts the all-reduces of one forward (``all_reduces``: 2 per double block, 1 per single block).

``--what blocks`` (or ``model,blocks``): one TP double block and one single block built from tpfuse's own blocks (no
diffusers needed; TP 1 on one GPU, TP N under torchrun), the double block three ways:

* ``double: fused, joint reductions`` (tpfuse's path): ``joint_qkv_proj`` and ``fused_linear_act`` per stream, the
  image and text out-projections in one chunked all-reduce and the two feed-forward outputs in another: 2 per block;
* ``double: fused, per-stream reductions``: the same kernels, each stream's row-parallel layer reduced on its own: 4;
* ``double: unfused (before issue 23)``: plain Q/K/V GEMMs + ``qk_norm_rope_joint``, ``linear_in`` + eager SwiGLU,
  4 per-stream reductions (the path LoRA-adapted or hooked projections still take).

Each row has the forward time, the all-reduces one forward issues (``comm_stats``), the tpfuse ops it ran and its
relative error against the first variant. Under torchrun every rank times with the same fixed repetition count
(``common.median_ms_fixed``: collectives must pair up).

``--dry-run``: tiny preset on CPU (torch backends), to keep the code exercised in CI.

Without diffusers (the model under test and both baselines come from it) the model section prints why it skipped;
the result file has ``"skipped"`` set to the reason (and no rows unless ``--what`` includes blocks), and the script
exits 0: the GPU image has no diffusers.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import types
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    close_distributed,
    device_info,
    flux2_block_inputs,
    format_table,
    init_distributed,
    median_ms,
    median_ms_fixed,
    run_main,
    write_results,
)

from tpfuse.kernels import record_backends  # noqa: E402
from tpfuse.tp_layers import Flux2Config, comm_stats, parallelize  # noqa: E402
from tpfuse.tp_layers.verify import position_ids  # noqa: E402


def build(cfg: Flux2Config, device, dtype, seed=0):
    from diffusers import Flux2Transformer2DModel

    torch.manual_seed(seed)
    with torch.device(device):
        model = Flux2Transformer2DModel(**cfg.to_diffusers_kwargs())
    return model.to(dtype).eval()


def inputs(cfg: Flux2Config, txt: int, img: int, device, dtype):
    g = torch.Generator().manual_seed(0)
    ids = position_ids(txt, img)
    return dict(hidden_states=torch.randn(1, img, cfg.in_channels, generator=g).to(device, dtype),
                encoder_hidden_states=torch.randn(1, txt, cfg.joint_attention_dim, generator=g).to(device, dtype),
                timestep=torch.tensor([0.5], device=device, dtype=dtype), img_ids=ids[txt:].to(device),
                txt_ids=ids[:txt].to(device),
                guidance=torch.tensor([4.0], device=device, dtype=dtype) if cfg.guidance_embeds else None)


def _fixed_ms(fn, device) -> float:
    """``median_ms_fixed`` (every rank the same number of calls: the collectives pair up); 1 + 3 calls on CPU."""
    return median_ms_fixed(fn, device, *((1, 3) if device == "cpu" else (5, 20)))


def _timed(model, x, device, distributed: bool = False):
    with torch.no_grad():
        if distributed:
            return _fixed_ms(lambda: model(**x), device)
        return median_ms(lambda: model(**x), device, rep_ms=500)


def _census(fn) -> dict:
    """The all-reduces one forward issues (tpfuse's collectives, counted by ``comm_stats``) and the tpfuse ops it
    runs."""
    with torch.no_grad(), comm_stats() as stats, record_backends() as ran:
        fn()
    return {"all_reduces": stats.count("all_reduce", "forward"), "ops": ", ".join(sorted({op for op, _ in ran}))}


def single(args, cfg, device, dtype) -> list[dict]:
    txt, img = args.txt_tokens, args.img_tokens
    model = build(cfg, device, dtype)
    x = inputs(cfg, txt, img, device, dtype)
    rows = [{"impl": "diffusers eager", "tp": 1, "ms": _timed(model, x, device)}]
    if not args.dry_run and not args.no_compile:
        compiled = torch.compile(model)
        rows.append({"impl": "diffusers torch.compile", "tp": 1, "ms": _timed(compiled, x, device)})
        del compiled
        torch._dynamo.reset()
    with torch.no_grad():
        ref = model(**x).sample
    parallelize(model)  # world size 1: same weights, fused kernels
    with torch.no_grad():
        out = model(**x).sample
    err = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
    rows.append({"impl": "tpfuse (fused kernels)", "tp": 1, "ms": _timed(model, x, device), "rel_err": err,
                 **_census(lambda: model(**x))})
    base = rows[0]["ms"]
    for r in rows:
        r["speedup_vs_eager"] = base / r["ms"]
        r["shape"] = f"{cfg.name} {txt}+{img}"
    return rows


def distributed(args, cfg, device, dtype) -> list[dict]:
    """tpfuse at TP N and diffusers' DTensor TP on the same weights (all ranks run it; rank 0 gets the rows)."""
    import torch.distributed as dist

    rank, world = dist.get_rank(), dist.get_world_size()
    x = inputs(cfg, args.txt_tokens, args.img_tokens, device, dtype)
    rows = []
    model = parallelize(build(cfg, device, dtype))
    rows.append({"impl": "tpfuse", "tp": world, "ms": _timed(model, x, device, True),
                 **_census(lambda: model(**x))})
    del model
    if not args.dry_run:  # diffusers' DTensor TP needs CUDA
        from diffusers import TensorParallelConfig

        model = build(cfg, device, dtype)
        model.enable_parallelism(config=TensorParallelConfig(tp_degree=world))
        rows.append({"impl": "diffusers TensorParallelConfig", "tp": world, "ms": _timed(model, x, device, True)})
    for r in rows:
        r["shape"] = f"{cfg.name} {args.txt_tokens}+{args.img_tokens}"
        r["speedup_vs_first"] = rows[0]["ms"] / r["ms"]
    return rows if rank == 0 else []


# --------------------------------------------------------------------------------------------------------------
# One TP double block (three ways) and one single block, from tpfuse's own blocks: no diffusers needed
# --------------------------------------------------------------------------------------------------------------

DOUBLE_VARIANTS = {
    "joint": "double: fused, joint reductions",
    "per-stream": "double: fused, per-stream reductions",
    "unfused": "double: unfused (before issue 23)",
}


@contextlib.contextmanager
def double_variant(block, variant: str):
    """Run a :class:`~tpfuse.tp_layers.flux2.tp_blocks.TPDoubleStreamBlock` as ``variant`` (``DOUBLE_VARIANTS``)
    inside the block: instance attributes shadow the fused methods (the fallbacks the block itself takes for LoRA or
    hooks), removed on exit."""
    from tpfuse.tp_layers.flux2.blocks import DoubleStreamBlock, FeedForward

    if variant not in DOUBLE_VARIANTS:
        raise ValueError(f"variant must be one of {list(DOUBLE_VARIANTS)}, got {variant!r}")
    patched = []

    def patch(obj, name, value):
        setattr(obj, name, value)
        patched.append((obj, name))

    try:
        if variant in ("per-stream", "unfused"):  # each (residual, gate, out) reduced on its own: 4 all-reduces
            patch(block, "_gated_residuals", types.MethodType(DoubleStreamBlock._gated_residuals, block))
        if variant == "unfused":  # plain Q/K/V GEMMs + qk_norm_rope_joint; linear_in + eager SwiGLU
            patch(block.attn, "_joint_projection_fits", lambda x, linears: False)
            for ff in (block.ff, block.ff_context):
                patch(ff, "hidden", types.MethodType(FeedForward.hidden, ff))
        yield block
    finally:
        for obj, name in reversed(patched):
            delattr(obj, name)


def blocks(args, cfg, device, dtype, distributed: bool) -> list[dict]:
    """Rows for one TP double block under each of ``DOUBLE_VARIANTS`` and one TP single block (all ranks run
    it; rank 0's times are reported)."""
    from tpfuse.tp_layers.flux2 import DoubleStreamBlock, SingleStreamBlock
    from tpfuse.tp_layers.flux2.tp_blocks import TPDoubleStreamBlock, TPSingleStreamBlock
    from tpfuse.tp_layers.numerics import rel_error

    txt, img = args.txt_tokens, args.img_tokens
    world = torch.distributed.get_world_size() if distributed else 1
    torch.manual_seed(0)  # the same dense weights on every rank
    factory = {"device": device, "dtype": dtype}
    double = TPDoubleStreamBlock.from_dense(DoubleStreamBlock(cfg, **factory)).eval()
    single = TPSingleStreamBlock.from_dense(SingleStreamBlock(cfg, **factory)).eval()
    x_img, x_txt, mod_img, mod_txt, mod_single, rope = flux2_block_inputs(cfg, txt, img, device, dtype)
    timer = (lambda fn: _fixed_ms(fn, device)) if distributed else (lambda fn: median_ms(fn, device))
    shape = f"{cfg.name} {txt}+{img}"
    rows, ref = [], None

    def run_double():
        return torch.cat(double(x_img, x_txt, mod_img, mod_txt, image_rotary_emb=rope), dim=1)

    def run_single():
        return single(torch.cat([x_txt, x_img], dim=1), None, mod_single, image_rotary_emb=rope)

    cases = [(label, run_double, variant) for variant, label in DOUBLE_VARIANTS.items()]
    cases.append(("single: fused", run_single, None))
    for label, fn, variant in cases:
        with double_variant(double, variant) if variant else contextlib.nullcontext(), torch.no_grad():
            out = fn()
            census = _census(fn)
            ms = timer(fn)
        row = {"impl": label, "shape": shape, "tp": world, "ms": ms, **census}
        if variant:
            ref = out if ref is None else ref
            row["rel_err"] = rel_error(out.float(), ref.float())
        rows.append(row)
    unfused = next(r["ms"] for r in rows if r["impl"] == DOUBLE_VARIANTS["unfused"])
    for r in rows:
        if r["impl"].startswith("double"):
            r["speedup_vs_unfused"] = unfused / r["ms"]
    return rows


COLUMNS = [("impl", "implementation", ""), ("shape", "shape", ""), ("tp", "TP", "d"), ("ms", "forward ms", ".2f"),
           ("speedup_vs_eager", "x eager", ".2f"), ("speedup_vs_first", "x tpfuse", ".2f"),
           ("speedup_vs_unfused", "x unfused", ".2f"), ("all_reduces", "all-reduces", "d"),
           ("rel_err", "rel err", ".2e"), ("ops", "tpfuse ops", "")]
WHAT = ("model", "blocks")


def _result_name(args) -> str:
    name = "model" if "model" in args.what else "blocks"
    return f"{name}-distributed" if args.distributed else name


def _write(args, device, rows, skipped):
    """The result file (rank 0 only under torchrun); returns its path or None."""
    if int(os.environ.get("RANK", "0")) != 0:
        return None
    info = device_info(device)
    payload = {"info": info, "dry_run": args.dry_run, "what": list(args.what), "rows": rows}
    if skipped:
        payload["skipped"] = skipped
    table = format_table(rows, COLUMNS) if rows else f"skipped: {skipped}"
    if rows:
        print(f"{info['device']}  torch {info['torch']}  triton {info['triton']}  {info['date']}")
        print(table)
    path = write_results(_result_name(args), payload, table, args.out)
    print(f"wrote {path}")
    return path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true")
    parser.add_argument("--distributed", action="store_true")
    parser.add_argument("--what", default="model",
                        help="comma list of: model (diffusers' transformer; needs diffusers), blocks (one TP double "
                             "block three ways and one single block; tpfuse's blocks) (default: %(default)s)")
    parser.add_argument("--preset", default="klein-4b")
    parser.add_argument("--txt-tokens", type=int, default=512)
    parser.add_argument("--img-tokens", type=int, default=4096)
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    args.what = tuple(w for w in WHAT if w in {w.strip() for w in args.what.split(",")})
    if not args.what:
        parser.error(f"--what: one or more of {', '.join(WHAT)}")
    device = "cpu" if args.dry_run else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA device: run on a GPU, or pass --dry-run")
    if args.dry_run:
        cfg, dtype = Flux2Config.preset("tiny"), torch.float32
        args.txt_tokens, args.img_tokens = 7, 29
        torch.set_num_threads(1)  # tiny GEMMs: an OpenMP team only adds barriers (20 ms each on a busy CPU)
    else:
        cfg, dtype = Flux2Config.preset(args.preset), torch.bfloat16
    skipped = None
    if "model" in args.what:
        try:
            import diffusers  # noqa: F401
        except ImportError as exc:
            skipped = f"diffusers missing ({exc})"
            if int(os.environ.get("RANK", "0")) == 0:
                print(f"bench_model: skipped: {skipped}" + (" (the model; the blocks run)" if "blocks" in args.what
                                                             else ""))
    if skipped and "blocks" not in args.what:
        _write(args, device, [], skipped)
        return 0
    rows = []
    if args.distributed:
        import torch.distributed as dist

        _, _, rank_device = init_distributed(args.dry_run)
        if "model" in args.what and not skipped:
            rows += distributed(args, cfg, rank_device, dtype)
        if "blocks" in args.what:
            block_rows = blocks(args, cfg, rank_device, dtype, distributed=True)
            rows += block_rows if dist.get_rank() == 0 else []
        close_distributed()
        if int(os.environ.get("RANK", "0")) != 0:
            return 0
    else:
        if "model" in args.what and not skipped:
            rows += single(args, cfg, device, dtype)
        if "blocks" in args.what:
            rows += blocks(args, cfg, device, dtype, distributed=False)
    _write(args, device, rows, skipped)
    return 0


if __name__ == "__main__":
    run_main(main)
