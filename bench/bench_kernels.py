"""Benchmark the fused kernels against eager torch, ``torch.compile`` and the hardware roofline.

For every FLUX.2 preset (klein-4B, klein-9B, dev), TP degree (local widths at 1, 2, 4, 8) and token count
(512 text + 1024 or 4096 image), bf16:

* ``fused_qkv_mlp_proj``: ours vs the eager reference vs ``torch.compile(reference)`` vs a bare ``x @ W^T`` of
  the same shape (the floor: the epilogue should cost almost nothing) vs "GEMM + epilogue" (cuBLAS ``x @ W^T``
  then one Triton kernel for norm/RoPE/transpose/SwiGLU, ``epilogue_baseline.py``: what a user would write
  without fusing). TFLOP/s and % of the measured GEMM peak. Targets on an H100: <= 1.08x the bare GEMM, >= 1.3x
  faster than eager, faster than ``torch.compile`` and than GEMM + epilogue.
* ``joint_qkv_proj`` (both streams' Q/K/V with the norm + RoPE epilogue) and ``fused_linear_act`` (``linear_in``
  + SwiGLU): ours vs eager vs compiled vs the bare GEMMs of the same shapes; targets <= 1.08x bare.
* ``row_parallel_matmul`` (single-stream ``to_out`` over ``[attn | mlp]`` with gate and residual): ours vs the
  eager reference (cat, GEMM, gate, residual) vs compiled vs the bare GEMM on a materialized cat.
* ``qk_norm_rope`` (and ``qk_norm_rope_joint``, the double-stream launch that also places V) and
  ``layernorm_modulate``: ours (Triton) vs the CUDA C++ backend (csrc) vs eager vs compiled;
  GB/s and % of the measured device-to-device copy bandwidth. Targets: Triton >= 85%, csrc >= 90% of copy
  bandwidth.

Every row records each target it has as pass/fail (``targets`` in the JSON, a ``targets`` column in the table);
a target whose baseline was not timed is ``null`` and left out of the verdict. The result files are rewritten
after every shape (``"complete": false`` until the sweep ends), so a run cut short keeps what it measured.

    python bench/bench_kernels.py                      # GPU: all shapes, JSON + table into bench/results/
    python bench/bench_kernels.py --dry-run --out X    # CPU, tiny shapes: exercises the code (CI); the GEMM +
                                                       # epilogue baseline only under TRITON_INTERPRET=1
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import Peaks, device_info, format_table, median_ms, model_shapes, write_results  # noqa: E402
from epilogue_baseline import gemm_epilogue  # noqa: E402

from tpfuse.kernels import (  # noqa: E402
    fused_linear_act,
    fused_linear_act_reference,
    fused_qkv_mlp_proj,
    fused_qkv_mlp_proj_reference,
    joint_qkv_proj,
    joint_qkv_proj_reference,
    layernorm_modulate,
    layernorm_modulate_reference,
    qk_norm_rope,
    qk_norm_rope_joint,
    qk_norm_rope_joint_reference,
    qk_norm_rope_reference,
)
from tpfuse.kernels._dispatch import interpreting  # noqa: E402
from tpfuse.kernels.row_parallel_matmul import row_parallel_matmul, row_parallel_matmul_reference  # noqa: E402
from tpfuse.tp_layers import rope_cos_sin  # noqa: E402
from tpfuse.tp_layers.verify import position_ids  # noqa: E402


def _compiled(fn, enabled: bool):
    if not enabled:
        return None
    return torch.compile(fn, dynamic=False)


def _time_variants(variants: dict, device: str) -> dict:
    out = {}
    for name, fn in variants.items():
        if fn is not None:
            out[name] = median_ms(fn, device)
    return out


def bench_shape(label, cfg, tp, tokens, device, dtype, peaks: Peaks, use_compile: bool, csrc: bool) -> list[dict]:
    g = torch.Generator(device=device).manual_seed(0)
    heads, d, hidden, mlp = cfg.heads // tp, cfg.head_dim, cfg.hidden_size, cfg.mlp_hidden // tp
    cos, sin = rope_cos_sin(position_ids(tokens // 4, tokens - tokens // 4), cfg.axes_dims_rope, cfg.rope_theta)
    cos, sin = cos.to(device), sin.to(device)
    rows = []

    def rand(*shape, scale=1.0):
        return torch.randn(*shape, generator=g, device=device, dtype=torch.float32).mul_(scale).to(dtype)

    # Fused projection ------------------------------------------------------------------------------------------
    x = rand(1, tokens, hidden)
    n = 3 * heads * d + 2 * mlp
    w = rand(n, hidden, scale=hidden ** -0.5)
    nw = 1 + 0.1 * rand(d)
    args = (x, w, nw, nw, cos, sin, heads, d, mlp, cfg.eps)
    ref = lambda: fused_qkv_mlp_proj_reference(*args)  # noqa: E731
    times = _time_variants({
        "ours": lambda: fused_qkv_mlp_proj(*args),
        "eager": ref,
        "compiled": _compiled(lambda: fused_qkv_mlp_proj_reference(*args), use_compile),
        "bare_gemm": lambda: x @ w.T,
        # A Triton kernel on CPU tensors runs only in the interpreter (the CI dry-run sets TRITON_INTERPRET=1).
        "gemm_epilogue": (lambda: gemm_epilogue(*args)) if device == "cuda" or interpreting() else None,
    }, device)
    flops = 2 * tokens * n * hidden
    rows.append(_row("fused_qkv_mlp_proj", label, times, tflops=flops / (times["ours"] * 1e-3) / 1e12,
                     pct_peak=100 * flops / (times["ours"] * 1e-3) / 1e12 / peaks.matmul_tflops))

    # Row-parallel out-projection: gate * ([attn | mlp] @ W^T) + residual (rank 0's local product) ----------------
    attn_in, mlp_in = rand(1, tokens, heads * d), rand(1, tokens, mlp)
    w_out = rand(hidden, heads * d + mlp, scale=(heads * d + mlp) ** -0.5)
    gate, residual = rand(1, hidden), rand(1, tokens, hidden)
    rpm_args = ([attn_in, mlp_in], w_out, gate, residual, True)
    cat_in = torch.cat([attn_in, mlp_in], dim=-1)
    times = _time_variants({
        "ours": lambda: row_parallel_matmul(*rpm_args),
        "eager": lambda: row_parallel_matmul_reference(*rpm_args),
        "compiled": _compiled(lambda: row_parallel_matmul_reference(*rpm_args), use_compile),
        "bare_gemm": lambda: cat_in @ w_out.T,
    }, device)
    flops = 2 * tokens * hidden * (heads * d + mlp)
    rows.append(_row("row_parallel_matmul", label, times, tflops=flops / (times["ours"] * 1e-3) / 1e12,
                     pct_peak=100 * flops / (times["ours"] * 1e-3) / 1e12 / peaks.matmul_tflops))

    # Two-stream projections: each stream's Q/K/V with the norm + RoPE epilogue into the joint buffers, against the
    # eager per-stream linears + norm + RoPE + cat, and the bare GEMMs of the same shapes (the floor) ------------
    txt = min(512, tokens // 4)
    xs = [rand(1, txt, hidden), rand(1, tokens - txt, hidden)]
    ws = [[rand(heads * d, hidden, scale=hidden ** -0.5) for _ in range(3)] for _ in xs]
    jq_args = (xs, ws, [nw, nw], [nw, nw], cos, sin, heads, d, cfg.eps)
    flat_w = [t for s in ws for t in s]

    def jq_eager():
        return joint_qkv_proj_reference(xs, flat_w, [], [nw, nw, nw, nw], cos, sin, heads, d, [cfg.eps] * 2)

    times = _time_variants({
        "ours": lambda: joint_qkv_proj(*jq_args),
        "eager": jq_eager,
        "compiled": _compiled(jq_eager, use_compile),
        "bare_gemm": lambda: [x @ w.T for x, s in zip(xs, ws) for w in s],
    }, device)
    flops = 2 * tokens * 3 * heads * d * hidden
    rows.append(_row("joint_qkv_proj", label, times, tflops=flops / (times["ours"] * 1e-3) / 1e12,
                     pct_peak=100 * flops / (times["ours"] * 1e-3) / 1e12 / peaks.matmul_tflops))
    w_in = rand(2 * mlp, hidden, scale=hidden ** -0.5)
    times = _time_variants({
        "ours": lambda: fused_linear_act(x, w_in),
        "eager": lambda: fused_linear_act_reference(x, w_in),
        "compiled": _compiled(lambda: fused_linear_act_reference(x, w_in), use_compile),
        "bare_gemm": lambda: x @ w_in.T,
    }, device)
    flops = 2 * tokens * 2 * mlp * hidden
    rows.append(_row("fused_linear_act", label, times, tflops=flops / (times["ours"] * 1e-3) / 1e12,
                     pct_peak=100 * flops / (times["ours"] * 1e-3) / 1e12 / peaks.matmul_tflops))

    # QK norm + RoPE (double-stream layout [B, S, H, D]) -------------------------------------------------------
    q, k = rand(1, tokens, heads, d), rand(1, tokens, heads, d)
    qk_args = (q, k, nw, nw, cos, sin, cfg.eps)
    times = _time_variants({
        "ours": lambda: qk_norm_rope(*qk_args),
        "cuda": (lambda: qk_norm_rope(*qk_args, backend="cuda")) if csrc else None,
        "eager": lambda: qk_norm_rope_reference(*qk_args),
        "compiled": _compiled(lambda: qk_norm_rope_reference(*qk_args), use_compile),
    }, device)
    angles = cos.numel() * cos.element_size()  # the fewest angle bytes: one fp32 cos and sin per pair
    moved = 4 * q.numel() * q.element_size() + angles
    rows.append(_row("qk_norm_rope", label, times, moved=moved, peaks=peaks))

    # The double-stream joint launch: text and image Q/K normalized and rotated, V copied, into joint buffers ----
    txt = min(512, tokens // 4)
    segs = [[rand(1, n, heads, d) for n in (txt, tokens - txt)] for _ in range(3)]
    joint_args = (*segs, (nw, nw), (nw, nw), cos, sin, cfg.eps)
    times = _time_variants({
        "ours": lambda: qk_norm_rope_joint(*joint_args),
        "eager": lambda: qk_norm_rope_joint_reference(*joint_args[:-1], (cfg.eps, cfg.eps)),
        "compiled": _compiled(lambda: qk_norm_rope_joint_reference(*joint_args[:-1], (cfg.eps, cfg.eps)),
                              use_compile),
    }, device)
    rows.append(_row("qk_norm_rope_joint", label, times, moved=6 * q.numel() * q.element_size() + angles,
                     peaks=peaks))

    # LayerNorm + modulation (replicated: full hidden width at any TP) ------------------------------------------
    shift, scale = rand(1, hidden), rand(1, hidden, scale=0.1)
    ln_args = (x, shift, scale, cfg.eps)
    times = _time_variants({
        "ours": lambda: layernorm_modulate(*ln_args),
        "cuda": (lambda: layernorm_modulate(*ln_args, backend="cuda")) if csrc else None,
        "eager": lambda: layernorm_modulate_reference(*ln_args),
        "compiled": _compiled(lambda: layernorm_modulate_reference(*ln_args), use_compile),
    }, device)
    moved = 2 * x.numel() * x.element_size() + 2 * shift.numel() * shift.element_size()
    rows.append(_row("layernorm_modulate", label, times, moved=moved, peaks=peaks))
    return rows


def _csrc_loads() -> bool:
    """Build (or find cached) and load the csrc library once; without nvcc, or when it fails, the csrc columns are
    left out with the reason printed, and the Triton, eager and compiled ones are still timed."""
    from tpfuse.kernels.cuda_backend import CsrcError, load

    try:
        load()
    except CsrcError as exc:
        print(f"csrc columns skipped: {str(exc).splitlines()[0]}")
        return False
    return True


def _row(op, label, times, moved=None, peaks=None, **metrics):
    """One table row; ``moved`` (bytes): a memory-bound op, reported as GB/s and % of the measured copy
    bandwidth, for the Triton kernel and (where timed) the CUDA C++ one."""
    if moved is not None:
        metrics["gbps"] = moved / (times["ours"] * 1e-3) / 1e9
        metrics["pct_peak"] = 100 * metrics["gbps"] / peaks.copy_gbps
        if "cuda" in times:
            metrics["cuda_pct_peak"] = 100 * moved / (times["cuda"] * 1e-3) / 1e9 / peaks.copy_gbps
    row = {"op": op, "shape": label, **{f"{k}_ms": v for k, v in times.items()}, **metrics}
    row["speedup_vs_eager"] = times["eager"] / times["ours"]
    if "compiled" in times:
        row["speedup_vs_compiled"] = times["compiled"] / times["ours"]
    if "bare_gemm" in times:
        row["ratio_to_bare_gemm"] = times["ours"] / times["bare_gemm"]
    if "gemm_epilogue" in times:
        row["speedup_vs_gemm_epilogue"] = times["gemm_epilogue"] / times["ours"]
    row["targets"] = {name: None if row.get(key) is None else bool(met(row[key]))
                      for name, key, met in TARGETS.get(op, [])}
    failed = [name for name, ok in row["targets"].items() if ok is False]
    judged = [ok for ok in row["targets"].values() if ok is not None]
    row["verdict"] = ("FAIL " + ",".join(failed)) if failed else ("pass" if judged else None)
    return row


# Per op: (name, row key, test) for each goal in the module doc.
TARGETS = {
    "fused_qkv_mlp_proj": [
        ("<=1.08x bare", "ratio_to_bare_gemm", lambda v: v <= 1.08),
        (">=1.3x eager", "speedup_vs_eager", lambda v: v >= 1.3),
        (">compiled", "speedup_vs_compiled", lambda v: v > 1),
        (">gemm+epi", "speedup_vs_gemm_epilogue", lambda v: v > 1),
    ],
    # The two-stream block's GEMMs: within 8% of the bare GEMMs of the same shapes (the epilogue nearly free).
    "joint_qkv_proj": [("<=1.08x bare", "ratio_to_bare_gemm", lambda v: v <= 1.08),
                       (">=1.3x eager", "speedup_vs_eager", lambda v: v >= 1.3)],
    "fused_linear_act": [("<=1.08x bare", "ratio_to_bare_gemm", lambda v: v <= 1.08),
                         (">compiled", "speedup_vs_compiled", lambda v: v > 1)],
    "qk_norm_rope": [(">=85% copy", "pct_peak", lambda v: v >= 85), ("csrc>=90%", "cuda_pct_peak", lambda v: v >= 90)],
    "qk_norm_rope_joint": [(">=85% copy", "pct_peak", lambda v: v >= 85)],
    "layernorm_modulate": [(">=85% copy", "pct_peak", lambda v: v >= 85),
                           ("csrc>=90%", "cuda_pct_peak", lambda v: v >= 90)],
}

COLUMNS = [("op", "op", ""), ("shape", "shape", ""), ("ours_ms", "ours ms", ".3f"), ("eager_ms", "eager ms", ".3f"),
           ("compiled_ms", "compiled ms", ".3f"), ("speedup_vs_eager", "x eager", ".2f"),
           ("speedup_vs_compiled", "x compiled", ".2f"), ("ratio_to_bare_gemm", "/ bare GEMM", ".3f"),
           ("gemm_epilogue_ms", "gemm+epi ms", ".3f"), ("speedup_vs_gemm_epilogue", "x gemm+epi", ".2f"),
           ("tflops", "TFLOP/s", ".1f"), ("gbps", "GB/s", ".0f"), ("pct_peak", "% roofline", ".1f"),
           ("cuda_ms", "csrc ms", ".3f"), ("cuda_pct_peak", "csrc % copy", ".1f"), ("verdict", "targets", "")]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="tiny CPU shapes, torch backend: exercise the code")
    parser.add_argument("--presets", default="klein-4b,klein-9b,dev")
    parser.add_argument("--tp", default="1,2,4,8")
    parser.add_argument("--tokens", default="512+1024,512+4096", help="text+image token counts")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline")
    parser.add_argument("--no-csrc", action="store_true", help="skip the CUDA C++ (csrc) columns")
    parser.add_argument("--out", default=None, help="JSON path (default: bench/results/kernels-<device>-<date>)")
    args = parser.parse_args(argv)

    device = "cpu" if args.dry_run else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA device: run on a GPU, or pass --dry-run")
    dtype = torch.float32 if args.dry_run else torch.bfloat16
    token_pairs = [tuple(int(t) for t in p.split("+")) for p in args.tokens.split(",")]
    shapes = model_shapes(args.presets.split(","), [int(t) for t in args.tp.split(",")], token_pairs, args.dry_run)
    if not shapes:
        parser.error(f"no preset in {args.presets!r} shards at TP {args.tp!r}: nothing to time")
    peaks = Peaks.measure(device, args.dry_run)
    use_compile = not (args.no_compile or args.dry_run)  # compiling on CPU needs a C++ toolchain per shape
    csrc = device == "cuda" and not args.no_csrc and _csrc_loads()
    info = device_info(device)
    print(f"{info['device']}  torch {info['torch']}  triton {info['triton']}  {info['date']}")
    print(f"measured peaks: {peaks.matmul_tflops:.1f} TFLOP/s bf16 GEMM, {peaks.copy_gbps:.0f} GB/s copy",
          flush=True)
    rows = []
    for i, (label, cfg, tp, tokens) in enumerate(shapes):
        rows += bench_shape(label, cfg, tp, tokens, device, dtype, peaks, use_compile, csrc)
        # Rewritten after every shape: a run cut short (a session's time limit) keeps what it measured.
        path = write_results("kernels", {"info": info, "dry_run": args.dry_run, "complete": i == len(shapes) - 1,
                                         "peaks": peaks.__dict__, "rows": rows},
                             format_table(rows, COLUMNS), args.out)
        print(f"[{i + 1}/{len(shapes)}] {label}", flush=True)
    print(format_table(rows, COLUMNS))
    for op in TARGETS:
        verdicts = [r["verdict"] for r in rows if r["op"] == op and r["verdict"] is not None]
        print(f"{op}: {sum(v == 'pass' for v in verdicts)}/{len(verdicts)} shapes meet every timed target")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
