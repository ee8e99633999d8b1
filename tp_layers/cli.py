"""The ``tpfuse`` command line."""

from __future__ import annotations

import argparse
import os
import sys

__all__ = ["main"]


# Exit codes of `tpfuse verify`: 0 every check passed, 1 a numerical check failed, 2 a usage or input error (bad
# option, unreadable or incomplete checkpoint, a backend this machine lacks), 3 an internal error (traceback).
EXIT_OK, EXIT_FAIL, EXIT_USAGE, EXIT_INTERNAL = 0, 1, 2, 3
# Exceptions a rank raises for bad input (checkpoint, options) rather than a bug: reported in one line, exit 2.
_INPUT_ERRORS = {"ValueError", "FileNotFoundError", "KeyError", "SafetensorError", "IsADirectoryError",
                 "NotADirectoryError", "PermissionError", "JSONDecodeError", "HeaderTooLarge", "HeaderTooSmall",
                 "CheckpointNotFoundError", "AttentionMaskError"}


def _error(msg: str) -> int:
    print(f"tpfuse verify: error: {msg}", file=sys.stderr)
    return EXIT_USAGE


def _rank_error(exc) -> int:
    """A rank's failure as `tpfuse verify`'s exit status: bad input in one line (exit 2), anything else with the
    traceback (exit 3)."""
    import traceback

    from .launch import _last_line

    if exc.exc_type in _INPUT_ERRORS:  # the rank's own message: its last traceback line
        return _error(f"rank {exc.rank}: {_last_line(exc)}")
    traceback.print_exc()
    print(f"tpfuse verify: internal error (exit {EXIT_INTERNAL}): rank {exc.rank} raised {exc.exc_type}",
          file=sys.stderr)
    return EXIT_INTERNAL


def _verify_family(args: argparse.Namespace) -> int:
    """``tpfuse verify --family qwenimage|flux3`` (or any family with ``--mesh``): a parallelized diffusers model
    against the dense one."""
    from .families import family_named
    from .verify_family import check_family, format_family_result

    fam = family_named(args.family)
    preset = args.preset if args.preset is not None else "tiny"
    if preset not in fam.presets:
        what = "model preset for --mesh (a whole model on every rank)" if args.mesh else f"{args.family} preset"
        return _error(f"--preset {preset!r} is not a {what}; choose from {sorted(fam.presets)}")
    if args.model is not None:
        what = "--mesh" if args.mesh else f"--family {args.family}"
        return _error(f"--model is not supported with {what} (check a checkpoint's blocks with --family flux2 "
                      "without --mesh, or load it with from_pretrained)")
    world_size = args.world_size
    if args.mesh is not None and not args.world_size_given:
        world_size = None  # the mesh's size
    return _run_check(lambda: check_family(args.family, preset, world_size, args.dtype, args.seed, args.batch,
                                           args.txt_tokens, args.img_tokens, args.backend, mesh=args.mesh),
                      format_family_result)


def _run_check(check, fmt) -> int:
    """Run a whole-model check: its report and exit 0/1, or 2 for bad input, or a rank's error."""
    from .launch import RankError

    try:
        res = check()
    except ValueError as exc:
        return _error(str(exc))
    except RankError as exc:
        return _rank_error(exc)
    print(fmt(res), flush=True)
    return EXIT_OK if res.ok else EXIT_FAIL


def _verify_pipeline(args: argparse.Namespace) -> int:
    """``tpfuse verify --pipeline dev|klein``: a whole tiny pipeline across ranks against the dense one."""
    from .verify_pipeline import check_pipeline, format_pipeline_result

    if args.model is not None or args.family != "flux2" or args.preset is not None:
        return _error("--pipeline checks a tiny FLUX.2 pipeline: it takes no --model, --family or --preset")
    world_size = args.world_size if args.world_size_given or args.mesh is None else None
    return _run_check(lambda: check_pipeline(args.pipeline, world_size, args.mesh, args.dtype, args.seed,
                                             args.text_encoder, args.backend), format_pipeline_result)


def _verify(args: argparse.Namespace) -> int:
    args.world_size_given = args.world_size is not None
    if args.pipeline is not None:
        if args.world_size is None:
            args.world_size = 2
        return _verify_pipeline(args)
    if args.world_size is None:
        args.world_size = 2
    if args.batch is None:
        args.batch = 1
        if args.mesh is not None:
            from .mesh import parse_mesh_spec

            try:
                spec = parse_mesh_spec(args.mesh)
            except ValueError as exc:
                return _error(str(exc))
            args.batch = spec.get("dp", 1) * spec.get("cfg", 1)
    if args.family != "flux2" or args.mesh is not None:
        return _verify_family(args)
    if args.preset is None:
        args.preset = "klein-4b"
    from .flux2.config import PRESETS

    if args.preset not in PRESETS:
        return _error(f"--preset {args.preset!r} is not a flux2 preset; choose from {sorted(PRESETS)}")

    import torch

    from .flux2.config import Flux2Config
    from .launch import RankError
    from .flux2.presets_table import check_world_size
    from .verify import default_backend, format_header, format_summary, verify

    if args.model is None:  # a checkpoint's sizes are known once its config is read: verify() checks them then
        try:
            check_world_size(Flux2Config.preset(args.preset), args.world_size, f"preset {args.preset!r}",
                             "--world-size")
        except ValueError as exc:
            return _error(str(exc))
    if args.backend == "nccl" and torch.cuda.device_count() < args.world_size:
        return _error(f"--backend nccl needs one CUDA device per rank: --world-size {args.world_size}, this machine "
                      f"has {torch.cuda.device_count()} (use --backend gloo)")
    blocks = [b.strip() for b in args.blocks.split(",") if b.strip()]
    what = args.model if args.model else args.preset
    print(format_header(what, args.world_size, args.dtype, args.backend or default_backend(args.world_size),
                        (args.txt_tokens, args.img_tokens)), flush=True)
    try:
        res = verify(preset=args.preset, world_size=args.world_size, blocks=blocks, img_tokens=args.img_tokens,
                     txt_tokens=args.txt_tokens, dtype=args.dtype, seed=args.seed, batch=args.batch,
                     backend=args.backend, model=args.model, subfolder=args.subfolder, block_index=args.block_index,
                     timing_runs=args.timing_runs, on_block=_print_block, on_progress=_print_progress)
    except (ValueError, FileNotFoundError, PermissionError) as exc:
        return _error(str(exc))
    except RankError as exc:
        return _rank_error(exc)
    print(format_summary(res), flush=True)
    return EXIT_OK if res.ok else EXIT_FAIL


def _print_block(block) -> None:
    """Each block's report as soon as it is checked (called in rank 0's process, which shares our stdout),
    set off by blank lines from the progress lines around it."""
    from .verify import format_block

    print(f"\n{format_block(block)}\n", flush=True)


def _print_progress(step: str) -> None:
    """A step of the check as it starts (called here and in rank 0's process; one line, flushed at once)."""
    print(f"... {step}", flush=True)


def _presets(args: argparse.Namespace) -> int:
    from .flux2.presets_table import format_preset_table

    print(format_preset_table(args.dtype))
    return EXIT_OK


def _plan(args: argparse.Namespace) -> int:
    """``tpfuse plan``: exit 0 when a mesh fits (the plan and its torchrun line), 1 when none does (why, and what
    would), 2 on bad input (one line naming the value)."""
    import json

    from .plan import format_plan, plan_dict, plan_pipeline

    try:
        plan = plan_pipeline(args.model, args.gpus, args.gpu_memory, args.resolution, nodes=args.nodes,
                             batch=args.batch, dtype=args.dtype, gpu=args.gpu, text_encoder=args.text_encoder,
                             height=args.height, width=args.width, mesh=args.mesh)
    except ValueError as exc:
        print(f"tpfuse plan: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    print(json.dumps(plan_dict(plan), indent=2) if args.json else format_plan(plan), flush=True)
    return EXIT_OK if plan.fits else EXIT_FAIL


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("tpfuse")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown (not installed)"


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default once: not for flags, ``None`` defaults or help that already says it."""

    def _get_help_string(self, action):
        text = action.help or ""
        if (action.default is None or action.default is False or action.default == argparse.SUPPRESS
                or "default" in text or not action.option_strings):
            return text
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    from .families import families
    from .verify import DTYPES

    from .flux2.config import PRESETS

    fams = families()
    presets = sorted({p for f in fams for p in f.presets} | set(PRESETS))
    parser = argparse.ArgumentParser(prog="tpfuse", description="Tensor-parallel layers and fused kernels for "
                                     "diffusion transformers (FLUX.2, Qwen-Image, FLUX.3).")
    parser.add_argument("--version", action="version", version=f"tpfuse {_version()}",
                        help="print the installed version and exit")
    sub = parser.add_subparsers(dest="command", required=True)
    v = sub.add_parser("verify", help="shard FLUX.2 blocks (or a Qwen-Image / FLUX.3 model: --family) over N ranks "
                       "and check forward/backward against dense",
                       formatter_class=_HelpFormatter,
                       epilog="exit status: 0 every check passed, 1 a numerical check failed, 2 a usage or input "
                              "error (options, checkpoint, backend), 3 an internal error")
    v.add_argument("--family", default="flux2", choices=[f.name for f in fams],
                   help="model family: flux2 checks blocks (below); qwenimage and flux3 check a whole parallelized "
                        "diffusers model (forward, input and weight gradients) against the dense one")
    v.add_argument("--preset", default=None, choices=presets,
                   help="the model whose shapes are checked, with random weights (flux2 default: klein-4b; "
                        "qwenimage: tiny or qwen-image-block; flux3: tiny or flux3-block)")
    v.add_argument("--world-size", type=int, default=None, help="number of ranks (processes, default 2); it must "
                   "divide the attention heads and the MLP width (tpfuse presets lists the valid sizes)")
    v.add_argument("--mesh", default=None, help="a hybrid mesh, e.g. sp2xtp2, cfg2xtp2, dp2xsp2xtp2 (dims dp, cfg, "
                   "sp, tp): check a whole parallelized model of --family (preset tiny by default) on that many "
                   "ranks against the dense one; image/text token counts need not divide by sp")
    v.add_argument("--pipeline", default=None, choices=["dev", "klein"],
                   help="check a whole tiny pipeline instead (dev: Flux2Pipeline with a Mistral3 text encoder, "
                        "klein: Flux2KleinPipeline with Qwen3): prompt -> text encoder -> transformer -> VAE on "
                        "--world-size ranks or --mesh, against the dense pipeline, with each rank's memory")
    v.add_argument("--text-encoder", default="shard", choices=["shard", "replicate"],
                   help="with --pipeline: shard the text encoder by transformers' plan, or keep it whole")
    v.add_argument("--blocks", default="double,single", help="comma-separated: single, double")
    v.add_argument("--img-tokens", type=int, default=64, help="image tokens per sample")
    v.add_argument("--txt-tokens", type=int, default=16, help="text tokens per sample")
    v.add_argument("--batch", type=int, default=None, help="samples per batch (default 1; with --mesh, dp x cfg)")
    v.add_argument("--dtype", default="float32", choices=sorted(DTYPES),
                   help="weights and inputs; the tolerance follows it")
    v.add_argument("--seed", type=int, default=0, help="seed of the random weights, inputs and output gradients")
    v.add_argument("--timing-runs", type=int, default=3,
                   help="timed fwd+bwd calls after one warm-up call (the median is shown); 0: no timing")
    v.add_argument("--backend", default=None, choices=["gloo", "nccl"],
                   help="default: nccl with one CUDA device per rank, else gloo")
    v.add_argument("--model", default=None, help="check the blocks of a real checkpoint: a diffusers directory, "
                   "a safetensors file (diffusers or BFL keys) or a Hub repo id; replaces --preset")
    v.add_argument("--subfolder", default=None, help="with --model: e.g. transformer")
    v.add_argument("--block-index", type=int, default=0, help="with --model: which double/single block")
    v.set_defaults(func=_verify)

    p = sub.add_parser("presets", help="print a Markdown table of the presets: heads, valid world sizes and "
                       "parameter bytes per rank at each", formatter_class=_HelpFormatter)
    p.add_argument("--dtype", default=None, choices=sorted(DTYPES),
                   help="bytes per parameter (default: bfloat16, float32 for tiny)")
    p.set_defaults(func=_presets)

    from .scaling_model import GPUS

    pl = sub.add_parser("plan", help="plan a whole FLUX.2 pipeline (transformer, text encoder, VAE) on N GPUs: "
                        "memory per rank of every mesh, whether it fits, the predicted step time and the torchrun "
                        "line (offline: configs shipped with tpfuse, no weights)", formatter_class=_HelpFormatter,
                        epilog="exit status: 0 a mesh fits (the recommended one is printed with its torchrun line), "
                               "1 nothing fits (why, and what would), 2 bad input")
    pl.add_argument("--model", required=True, help="the pipeline: dev, klein-4b or klein-9b")
    pl.add_argument("--gpus", type=int, required=True, help="GPUs in all (ranks)")
    pl.add_argument("--gpu-memory", type=float, required=True, metavar="GB",
                    help="memory of one GPU as the card is sold, read as GiB (e.g. 80 for an H100 80GB, 24 for an "
                         "RTX 4090): cards are built in binary sizes")
    pl.add_argument("--resolution", type=int, default=1024, help="square image side in pixels (a multiple of 16)")
    pl.add_argument("--height", type=int, default=None, help="image height (default: --resolution)")
    pl.add_argument("--width", type=int, default=None, help="image width (default: --resolution)")
    pl.add_argument("--nodes", type=int, default=1, help="nodes the GPUs are spread over, the same count on each")
    pl.add_argument("--batch", type=int, default=1, help="images per pipeline call (a dp mesh dimension must "
                    "divide it)")
    pl.add_argument("--gpu", default="H100 SXM", choices=[g.name for g in GPUS],
                    help="the GPU the step time is modelled for")
    pl.add_argument("--text-encoder", default="shard", choices=["shard", "replicate"],
                    help="shard the text encoder over the mesh (or its tp group) or keep a whole copy per rank")
    pl.add_argument("--mesh", default=None, help="plan only this mesh, e.g. sp2xtp2 (dims dp, sp, tp); exit 1 if "
                    "it does not fit")
    pl.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"],
                    help="the dtype of weights and activations")
    pl.add_argument("--json", action="store_true", help="print the plan as JSON (sizes in bytes)")
    pl.set_defaults(func=_plan)

    from tpfuse.kernels import compile_report

    c = sub.add_parser("compile-report", help="compile every Triton kernel ahead of time for a GPU arch (no GPU "
                       "needed) and report registers, shared memory, spills, wgmma",
                       formatter_class=_HelpFormatter)
    compile_report.add_arguments(c)
    c.set_defaults(func=compile_report.run)

    b = sub.add_parser("build-csrc", help="build the CUDA C++ backend (csrc/*.cu) with nvcc ahead of time",
                       formatter_class=_HelpFormatter)
    b.add_argument("--arch", type=int, default=None, help="compute capability (default: this GPU, else 90)")
    b.add_argument("--force", action="store_true", help="rebuild even if the cached library exists")
    b.set_defaults(func=_build_csrc)
    return parser


def _build_csrc(args: argparse.Namespace) -> int:
    from tpfuse.kernels.cuda_backend import CsrcError, build

    try:
        print(build(args.arch, force=args.force))
    except CsrcError as exc:
        print(f"tpfuse build-csrc: error: {exc}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    # Triton 3.9 warns on every process that leaves this knob unset; tpfuse's kernels are written for FP fusion
    # (FMA) on, the default so far, so its commands say so explicitly (inherited by the rank processes).
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
