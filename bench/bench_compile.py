"""tpfuse's TP blocks eager vs ``torch.compile`` vs ``torch.compile(mode="reduce-overhead")`` (CUDA graphs).

One GPU: a klein-4B-shaped stack of tpfuse's TP blocks at TP 1 (random weights, bf16; 5 double-stream then 20
single-stream blocks, 512 text + 4096 image tokens, shared modulation as FLUX.2 has it). The model is built from
tpfuse's own dense blocks, not diffusers' ``Flux2Transformer2DModel``: the GPU image has no diffusers, and the
blocks are what tpfuse changes (the embedders around them are diffusers' dense code, which compiles on its own).
Compilation is regional (each block compiled with ``fullgraph=True``, as diffusers' ``compile_repeated_blocks``
does): blocks of one kind share their compiled code. Every row reports the median forward time, the speed-up
over eager and the relative error against eager (bf16: expected within ``tolerance(bfloat16)``); the first call of
each compiled mode (compile + warm-up, CUDA-graph capture) is reported as ``first_call_s``. The eager forward also
runs under ``torch.cuda.set_sync_debug_mode("error")``: a host sync anywhere in it fails the benchmark.

``--dry-run``: tiny shapes on CPU, ``backend="aot_eager"`` and no CUDA graphs; its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import device_info, flux2_block_inputs, format_table, median_ms, write_results  # noqa: E402

from tpfuse.tp_layers import Flux2Config  # noqa: E402
from tpfuse.tp_layers.flux2 import DoubleStreamBlock, SingleStreamBlock  # noqa: E402
from tpfuse.tp_layers.numerics import rel_error, tolerance  # noqa: E402
from tpfuse.tp_layers.flux2.tp_blocks import TPDoubleStreamBlock, TPSingleStreamBlock  # noqa: E402


class BlockStack(nn.Module):
    """The transformer's block stack: double-stream blocks on (text, image), then single-stream blocks on their
    concatenation; returns the image tokens."""

    def __init__(self, double: list[nn.Module], single: list[nn.Module]):
        super().__init__()
        self.double_blocks, self.single_blocks = nn.ModuleList(double), nn.ModuleList(single)

    def forward(self, img, txt, mod_img, mod_txt, mod_single, rope):
        for block in self.double_blocks:
            txt, img = block(img, txt, mod_img, mod_txt, image_rotary_emb=rope)
        x = torch.cat([txt, img], dim=1)
        for block in self.single_blocks:
            x = block(x, None, mod_single, image_rotary_emb=rope)
        return x[:, txt.shape[1]:]


def build(cfg: Flux2Config, n_double: int, n_single: int, device, dtype, seed: int = 0) -> BlockStack:
    """Random dense blocks (``nn.Linear``'s init, one seed) sharded at TP 1: the fused TP blocks."""
    torch.manual_seed(seed)
    factory = {"device": device, "dtype": dtype}  # initialised where they run (klein-4B: ~8 GB of bf16)
    double = [TPDoubleStreamBlock.from_dense(DoubleStreamBlock(cfg, **factory)) for _ in range(n_double)]
    single = [TPSingleStreamBlock.from_dense(SingleStreamBlock(cfg, **factory)) for _ in range(n_single)]
    return BlockStack(double, single).eval()


def _compile_regions(model: BlockStack, **compile_kwargs) -> None:
    for block in (*model.double_blocks, *model.single_blocks):
        block.compile(fullgraph=True, **compile_kwargs)


def _no_host_sync(model, x, device) -> bool:
    """The eager forward under ``set_sync_debug_mode("error")`` (CUDA only): raises on a host sync."""
    if device != "cuda":
        return True
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with torch.no_grad():
            model(*x)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return True


def run(args, cfg, n_double, n_single, device, dtype, emit) -> list[dict]:
    txt, img = args.txt_tokens, args.img_tokens
    model = build(cfg, n_double, n_single, device, dtype)
    x = flux2_block_inputs(cfg, txt, img, device, dtype)
    shape = f"{cfg.name} {n_double}+{n_single} blocks, {txt}+{img} tokens"
    with torch.no_grad():
        ref = model(*x)
    rows = [{"mode": "eager", "shape": shape, "host_sync_free": _no_host_sync(model, x, device),
             "ms": median_ms(lambda: model(*x), device, rep_ms=args.rep_ms)}]
    emit(rows)
    modes = [("torch.compile", {})]
    if device == "cuda":
        modes.append(("torch.compile reduce-overhead", {"mode": "reduce-overhead"}))
    else:
        modes = [("torch.compile aot_eager", {"backend": "aot_eager"})]
    tol = tolerance(dtype)
    for name, kwargs in modes:
        torch._dynamo.reset()
        model = build(cfg, n_double, n_single, device, dtype)  # same seed: same weights, uncompiled
        _compile_regions(model, **kwargs)
        start = time.perf_counter()
        with torch.no_grad():
            for _ in range(3):  # compile, then CUDA-graph warm-up and capture
                out = model(*x)
        if device == "cuda":
            torch.cuda.synchronize()
        first = time.perf_counter() - start
        with torch.no_grad():
            ms = median_ms(lambda: model(*x), device, rep_ms=args.rep_ms)
        err = rel_error(out.float(), ref.float())
        rows.append({"mode": name, "shape": shape, "first_call_s": first, "ms": ms, "rel_err": err,
                     "within_tolerance": err <= tol})
        emit(rows)
        model = None  # free this mode's weights (and CUDA graphs) before the next one builds its own
    for r in rows:
        r["speedup_vs_eager"] = rows[0]["ms"] / r["ms"]
    emit(rows)
    bad = [r["mode"] for r in rows[1:] if not r["within_tolerance"]]
    if bad:
        raise SystemExit(f"bench_compile: {bad} differ from eager by more than {tol}")
    return rows


COLUMNS = [("mode", "mode", ""), ("shape", "shape", ""), ("ms", "forward ms", ".2f"),
           ("speedup_vs_eager", "x eager", ".2f"), ("first_call_s", "first calls s", ".1f"),
           ("rel_err", "rel err vs eager", ".2e")]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="tiny shapes on CPU (aot_eager, no CUDA graphs)")
    parser.add_argument("--preset", default="klein-4b", help="model shapes (default: %(default)s)")
    parser.add_argument("--blocks", default=None,
                        help="DOUBLE,SINGLE block counts (default: the preset's, e.g. 5,20 for klein-4b)")
    parser.add_argument("--txt-tokens", type=int, default=512, help="text tokens (default: %(default)s)")
    parser.add_argument("--img-tokens", type=int, default=4096, help="image tokens (default: %(default)s)")
    parser.add_argument("--rep-ms", type=int, default=200, help="timing budget per mode (default: %(default)s)")
    parser.add_argument("--out", default=None, help="result JSON (default: bench/results/compile-<device>-<date>)")
    args = parser.parse_args(argv)
    device = "cpu" if args.dry_run else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA device: run on a GPU, or pass --dry-run")
    if args.dry_run:
        cfg, dtype = Flux2Config.preset("tiny"), torch.float32
        args.txt_tokens, args.img_tokens = 5, 11
    else:
        cfg, dtype = Flux2Config.preset(args.preset), torch.bfloat16
    n_double, n_single = (cfg.num_layers, cfg.num_single_layers) if args.blocks is None else (
        int(n) for n in args.blocks.split(","))
    info = device_info(device)

    def emit(rows):  # rewritten after every mode: a timeout keeps the modes that finished
        payload = {"info": info, "dry_run": args.dry_run, "rows": rows}
        return write_results("compile", payload, format_table(rows, COLUMNS), args.out)

    rows = run(args, cfg, n_double, n_single, device, dtype, emit)
    print(format_table(rows, COLUMNS))
    print(f"wrote {emit(rows)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
