"""Ahead-of-time compile every Triton kernel for a GPU architecture, with no GPU, and check the result.

The launchers are run on ``meta`` tensors with each kernel swapped for a recorder, so the report compiles exactly
the arguments, constexprs and launch options the launcher would use for FLUX.2 shapes (klein-4B, klein-9B, dev;
TP 1, 2, 4, 8; 1024+512 and 4096+512 tokens), including Triton's divisibility-by-16 specialization of integer
arguments. For every distinct compilation it reports registers, shared memory, stack frame, local memory and
spill bytes (``cuobjdump -res-usage`` on the cubin, ``ptxas -v`` on the PTX; both ship in the triton wheel) and
whether the SASS uses ``HGMMA`` (wgmma, Hopper's warpgroup tensor-core MMA).

Checks (``CompileReport.failures``): everything compiles; every GEMM kernel uses wgmma; shared memory within the
sm_90 per-block limit; no spills, no stack frame, no local memory.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import json
import re
import subprocess
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

from ._triton import HAS_TRITON, triton

__all__ = ["compile_report", "CompileReport", "KernelResult", "format_compile_report", "SHARED_LIMIT"]

# Maximum dynamic shared memory per block on sm_90 (H100/H200): 227 KB.
SHARED_LIMIT = {90: 227 * 1024}
DEFAULT_PRESETS = ("klein-4b", "klein-9b", "dev")
DEFAULT_TP = (1, 2, 4, 8)
DEFAULT_TOKENS = ((512, 1024), (512, 4096))  # (text, image)


@dataclasses.dataclass
class KernelResult:
    kernel: str
    gemm: bool
    config: str
    uses: list[str]  # "klein-4b tp2 512+1024" ...
    ok_compiled: bool = False
    error: str = ""
    registers: int = -1
    shared_bytes: int = -1
    stack_bytes: int = -1
    local_bytes: int = -1
    spill_store_bytes: int = -1
    spill_load_bytes: int = -1
    wgmma: bool = False
    hgmma_count: int = 0

    def failures(self, shared_limit: int) -> list[str]:
        name = f"{self.kernel} [{self.config}]"
        if not self.ok_compiled:
            return [f"{name}: failed to compile: {self.error}"]
        out = []
        if self.gemm and not self.wgmma:
            out.append(f"{name}: GEMM does not use wgmma (no HGMMA in the SASS)")
        if self.shared_bytes > shared_limit:
            out.append(f"{name}: shared memory {self.shared_bytes} B exceeds {shared_limit} B")
        if self.spill_store_bytes or self.spill_load_bytes:
            out.append(f"{name}: spills {self.spill_store_bytes} B stores / {self.spill_load_bytes} B loads")
        if self.stack_bytes or self.local_bytes:
            out.append(f"{name}: stack frame {self.stack_bytes} B, local memory {self.local_bytes} B")
        return out


@dataclasses.dataclass
class CompileReport:
    arch: int
    triton_version: str
    kernels: list[KernelResult]

    @property
    def failures(self) -> list[str]:
        limit = SHARED_LIMIT.get(self.arch, 227 * 1024)
        return [f for k in self.kernels for f in k.failures(limit)]

    @property
    def ok(self) -> bool:
        return not self.failures

    def to_json(self) -> dict:
        return {"arch": self.arch, "triton_version": self.triton_version, "ok": self.ok, "failures": self.failures,
                "kernels": [dataclasses.asdict(k) for k in self.kernels]}


# --------------------------------------------------------------------------------------------------------------
# Recording launches
# --------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class _Launch:
    kernel: object  # the JIT function
    args: tuple
    kwargs: dict


class _Recorder:
    def __init__(self, kernel, sink: list[_Launch]):
        self.kernel, self.sink = kernel, sink

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.sink.append(_Launch(self.kernel, args, kwargs))
        return launch


@contextlib.contextmanager
def _recording(module, names: Sequence[str]) -> Iterator[list[_Launch]]:
    sink: list[_Launch] = []
    saved = {n: getattr(module, n) for n in names}
    try:
        for n, k in saved.items():
            setattr(module, n, _Recorder(k, sink))
        yield sink
    finally:
        for n, k in saved.items():
            setattr(module, n, k)


_TRITON_TYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.float64: "fp64",
                 torch.int32: "i32", torch.int64: "i64"}
_OPTION_KEYS = ("num_warps", "num_stages", "num_ctas", "maxnreg")


def _jit_fn(kernel):
    from triton.runtime.jit import JITFunction

    return kernel if isinstance(kernel, JITFunction) else JITFunction(kernel.fn)  # interpreter wraps .fn


def _compile_spec(launch: _Launch):
    """(fn, signature, constexprs, attrs, options) as the JIT would specialize this launch."""
    fn = _jit_fn(launch.kernel)
    names = fn.arg_names
    bound = dict(zip(names, launch.args))
    options = {k: v for k, v in launch.kwargs.items() if k in _OPTION_KEYS}
    bound.update({k: v for k, v in launch.kwargs.items() if k not in _OPTION_KEYS})
    signature, constexprs, attrs = {}, {}, {}
    for i, name in enumerate(names):
        value = bound[name]
        param = fn.params[i]
        if param.is_constexpr:
            signature[name] = "constexpr"
            constexprs[name] = value
        elif isinstance(value, torch.Tensor):
            signature[name] = "*" + _TRITON_TYPES[value.dtype]
            attrs[(i,)] = [["tt.divisibility", 16]]  # torch allocations are 256-byte aligned
        elif isinstance(value, bool):
            signature[name] = "i1"
        elif isinstance(value, int):
            if value == 1 and not param.do_not_specialize:
                signature[name] = "constexpr"  # the JIT specializes ints equal to 1
                constexprs[name] = 1
                continue
            signature[name] = "i64" if abs(value) >= 2**31 else "i32"
            if value % 16 == 0 and not param.do_not_specialize:
                attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(value, float):
            signature[name] = "fp32"
        else:
            raise TypeError(f"cannot type argument {name}={value!r} of {fn.__name__}")
    return fn, signature, constexprs, attrs, options


def _config_label(fn, signature: dict, constexprs: dict, attrs: dict, options: dict) -> str:
    parts = [f"{k}={v}" for k, v in constexprs.items() if k.isupper()]
    parts += [f"{k}={v}" for k, v in options.items()]
    # Integer arguments the JIT specialized as divisible by 16 (they change the code: vector widths, masks).
    div16 = [fn.arg_names[i] for (i,) in attrs if not signature[fn.arg_names[i]].startswith("*")]
    return " ".join(parts) + (f" div16=[{','.join(div16)}]" if div16 else "")


# --------------------------------------------------------------------------------------------------------------
# The shapes: what each launcher sees for a model, a TP degree and a token count
# --------------------------------------------------------------------------------------------------------------


def _launches_for(cfg, tp: int, tokens: int, dtype=torch.bfloat16) -> list[tuple[str, bool, _Launch]]:
    # By module path: the package re-exports functions under the same names as their modules.
    proj_mod = importlib.import_module(f"{__package__}.fused_qkv_mlp_proj")
    ln_mod = importlib.import_module(f"{__package__}.layernorm_modulate")
    qk_mod = importlib.import_module(f"{__package__}.qk_norm_rope")
    rpm_mod = importlib.import_module(f"{__package__}.row_parallel_matmul")

    meta = {"device": "meta", "dtype": dtype}
    heads, d, hidden, mlp = cfg.heads // tp, cfg.head_dim, cfg.hidden_size, cfg.mlp_hidden // tp
    out: list[tuple[str, bool, _Launch]] = []
    x = torch.empty(1, tokens, hidden, **meta)
    cos = torch.empty(tokens, d, device="meta", dtype=torch.float32)
    norm_w = torch.empty(d, **meta)

    with _recording(proj_mod, ["_fused_qkv_mlp_kernel"]) as rec:
        w = torch.empty(3 * heads * d + 2 * mlp, hidden, **meta)
        proj_mod._fused_triton(x, w, norm_w, norm_w, cos, cos, heads, d, mlp, cfg.eps)
    out += [("fused_qkv_mlp_proj", True, launch) for launch in rec]

    with _recording(qk_mod, ["_qk_norm_rope_fwd_kernel", "_qk_norm_rope_bwd_kernel"]) as rec:
        q = torch.empty(1, tokens, heads, d, **meta)
        qk_mod._fwd_triton(q, q, norm_w, norm_w, cos, cos, cfg.eps)
        qk_mod._bwd_triton(q, q, norm_w, norm_w, cos, cos, q, q, cfg.eps)
    out += [("qk_norm_rope." + ("fwd" if i == 0 else "bwd"), False, launch) for i, launch in enumerate(rec)]

    with _recording(ln_mod, ["_ln_mod_fwd_kernel"]) as rec:
        mod = torch.empty(1, hidden, **meta)
        ln_mod._layernorm_modulate_triton(x, mod, mod, cfg.eps)
    out += [("layernorm_modulate", False, launch) for launch in rec]

    # Row-parallel out-projections: single-stream to_out over [attn | mlp] with gate + residual (rank 0), and a
    # one-part layer (double-stream linear_out) with gate only (ranks > 0), in 1 chunk and in the 4-chunk
    # overlap (each chunk is its own launch on a row range).
    with _recording(rpm_mod, ["_row_parallel_mm_kernel"]) as rec:
        attn, act = torch.empty(1, tokens, heads * d, **meta), torch.empty(1, tokens, mlp, **meta)
        gate = torch.empty(1, hidden, **meta)
        w_out = torch.empty(hidden, heads * d + mlp, **meta)
        rpm_mod.row_parallel_matmul_triton([attn, act], w_out, gate, x, True)
        w_ff = torch.empty(hidden, mlp, **meta)
        rpm_mod.row_parallel_matmul_triton([act], w_ff, gate, None, False, row_range=(0, tokens // 4))
    out += [("row_parallel_matmul", True, launch) for launch in rec]
    return out


# --------------------------------------------------------------------------------------------------------------
# Compile and inspect
# --------------------------------------------------------------------------------------------------------------


def _tool(name: str) -> str:
    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name)


def _ptxas(arch: int) -> str:
    """The ptxas triton itself uses for ``arch`` (triton 3.9 takes ``ptxas-blackwell``, CUDA 13.x, for sm_90+:
    its PTX is newer than the legacy ``ptxas`` accepts)."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        return get_ptxas(arch).path
    except (ImportError, TypeError, AttributeError):
        return _tool("ptxas")


def _inspect(compiled, result: KernelResult, arch: int) -> None:
    result.shared_bytes = int(compiled.metadata.shared)
    ptx = compiled.asm["ptx"]
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp, "k.cubin")
        cubin.write_bytes(compiled.asm["cubin"])
        usage = subprocess.run([_tool("cuobjdump"), "-res-usage", str(cubin)], capture_output=True, text=True,
                               check=True).stdout
        m = re.search(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)", usage)
        if m:
            result.registers, result.stack_bytes, _, result.local_bytes = map(int, m.groups())
        sass = subprocess.run([_tool("cuobjdump"), "-sass", str(cubin)], capture_output=True, text=True,
                              check=True).stdout
        result.hgmma_count = len(re.findall(r"\bHGMMA\b", sass))
        result.wgmma = result.hgmma_count > 0 and "wgmma.mma_async" in ptx
        ptx_file = Path(tmp, "k.ptx")
        ptx_file.write_text(ptx)
        suffix = "a" if arch >= 90 else ""
        verbose = subprocess.run([_ptxas(arch), f"-arch=sm_{arch}{suffix}", "-v", str(ptx_file), "-o",
                                  str(Path(tmp, "k2.cubin"))], capture_output=True, text=True)
        text = verbose.stdout + verbose.stderr
        m = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text)
        if m:
            result.spill_store_bytes, result.spill_load_bytes = map(int, m.groups())


def compile_report(arch: int = 90, presets: Sequence[str] = DEFAULT_PRESETS, tp: Sequence[int] = DEFAULT_TP,
                   tokens: Sequence[tuple[int, int]] = DEFAULT_TOKENS) -> CompileReport:
    """Compile every kernel at the configurations its launcher uses for the given shapes (see module doc)."""
    if not HAS_TRITON:
        raise RuntimeError("compile_report needs triton installed")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from tpfuse.tp_layers.config import Flux2Config

    target = GPUTarget("cuda", arch, 32)
    results: dict[str, KernelResult] = {}
    specs = {}
    for preset in presets:
        cfg = Flux2Config.preset(preset)
        for n in tp:
            if cfg.heads % n or cfg.mlp_hidden % n:
                continue
            for txt, img in tokens:
                for name, gemm, launch in _launches_for(cfg, n, txt + img):
                    fn, sig, constexprs, attrs, options = _compile_spec(launch)
                    key = json.dumps([name, sig, {k: str(v) for k, v in constexprs.items()},
                                      sorted(str(a) for a in attrs), options], sort_keys=True)
                    if key not in results:
                        results[key] = KernelResult(name, gemm, _config_label(fn, sig, constexprs, attrs, options), [])
                        specs[key] = (fn, sig, constexprs, attrs, options)
                    results[key].uses.append(f"{preset} tp{n} {txt}+{img}")
    for key, result in results.items():
        fn, sig, constexprs, attrs, options = specs[key]
        try:
            compiled = triton.compile(ASTSource(fn, sig, constexprs, attrs), target=target, options=options)
            result.ok_compiled = True
            _inspect(compiled, result, arch)
        except Exception as exc:  # noqa: BLE001 - a failed compile is a reported failure
            result.error = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    return CompileReport(arch, triton.__version__, sorted(results.values(), key=lambda r: (r.kernel, r.config)))


def format_compile_report(report: CompileReport) -> str:
    lines = [f"tpfuse compile-report: sm_{report.arch}, triton {report.triton_version}, "
             f"{len(report.kernels)} distinct compilations"]
    header = f"{'kernel':<22} {'regs':>4} {'smem KB':>8} {'stack':>5} {'spill B':>8} {'wgmma':>6}  config / used for"
    lines.append(header)
    lines.append("-" * len(header))
    for k in report.kernels:
        if not k.ok_compiled:
            lines.append(f"{k.kernel:<22} COMPILE FAILED: {k.error}")
            continue
        spills = k.spill_store_bytes + k.spill_load_bytes
        wg = ("yes" if k.wgmma else "NO") if k.gemm else "-"
        lines.append(f"{k.kernel:<22} {k.registers:>4} {k.shared_bytes / 1024:>8.1f} {k.stack_bytes:>5} "
                     f"{spills:>8} {wg:>6}  {k.config}")
        uses = sorted(set(k.uses))
        lines.append(f"{'':<22} {'':>4} {'':>8} {'':>5} {'':>8} {'':>6}  {len(uses)} shapes: {', '.join(uses[:4])}"
                     + (" ..." if len(uses) > 4 else ""))
    lines.append("")
    lines.append("PASS" if report.ok else "FAIL:\n  " + "\n  ".join(report.failures))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="tpfuse compile-report", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


def add_arguments(parser) -> None:
    parser.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 90 for H100/H200")
    parser.add_argument("--presets", default=",".join(DEFAULT_PRESETS))
    parser.add_argument("--tp", default=",".join(map(str, DEFAULT_TP)), help="tensor-parallel degrees")
    parser.add_argument("--json", default=None, help="also write the report as JSON to this path")


def run(args) -> int:
    report = compile_report(args.arch, [p for p in args.presets.split(",") if p],
                            [int(t) for t in args.tp.split(",") if t])
    print(format_compile_report(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report.to_json(), indent=2))
    return 0 if report.ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
