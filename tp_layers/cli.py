"""The ``tpfuse`` command line."""

from __future__ import annotations

import argparse
import sys

__all__ = ["main"]


def _verify(args: argparse.Namespace) -> int:
    from .verify import format_report, verify

    blocks = [b.strip() for b in args.blocks.split(",") if b.strip()]
    try:
        res = verify(preset=args.preset, world_size=args.world_size, blocks=blocks, img_tokens=args.img_tokens,
                     txt_tokens=args.txt_tokens, dtype=args.dtype, seed=args.seed, batch=args.batch,
                     backend=args.backend, model=args.model, subfolder=args.subfolder, block_index=args.block_index)
    except (ValueError, FileNotFoundError) as exc:
        print(f"tpfuse verify: error: {exc}", file=sys.stderr)
        return 2
    print(format_report(res))
    return 0 if res.ok else 1


def build_parser() -> argparse.ArgumentParser:
    from .config import PRESETS
    from .verify import DTYPES

    parser = argparse.ArgumentParser(prog="tpfuse", description="Tensor-parallel FLUX.2 layers and fused kernels.")
    sub = parser.add_subparsers(dest="command", required=True)
    v = sub.add_parser("verify", help="shard FLUX.2 blocks over N ranks and check forward/backward against dense",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    v.add_argument("--preset", default="klein-4b", choices=sorted(PRESETS))
    v.add_argument("--world-size", type=int, default=2, help="number of ranks (processes)")
    v.add_argument("--blocks", default="double,single", help="comma-separated: single, double")
    v.add_argument("--img-tokens", type=int, default=64)
    v.add_argument("--txt-tokens", type=int, default=16)
    v.add_argument("--batch", type=int, default=1)
    v.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    v.add_argument("--seed", type=int, default=0)
    v.add_argument("--backend", default=None, choices=["gloo", "nccl"],
                   help="default: nccl with one CUDA device per rank, else gloo")
    v.add_argument("--model", default=None, help="check the blocks of a real checkpoint: a diffusers directory, "
                   "a safetensors file (diffusers or BFL keys) or a Hub repo id; replaces --preset")
    v.add_argument("--subfolder", default=None, help="with --model: e.g. transformer")
    v.add_argument("--block-index", type=int, default=0, help="with --model: which double/single block")
    v.set_defaults(func=_verify)

    from tpfuse.kernels import compile_report

    c = sub.add_parser("compile-report", help="compile every Triton kernel ahead of time for a GPU arch (no GPU "
                       "needed) and report registers, shared memory, spills, wgmma",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    compile_report.add_arguments(c)
    c.set_defaults(func=compile_report.run)

    b = sub.add_parser("build-csrc", help="build the CUDA C++ backend (csrc/*.cu) with nvcc ahead of time",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
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
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
