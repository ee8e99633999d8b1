"""The CUDA C++ backend: torch-free kernels in ``csrc/``, built with nvcc, loaded with ctypes, exposed as
``torch.library`` custom ops (with fake implementations, so they trace under ``torch.compile``).

The ``.cu`` files include only CUDA's own headers and export ``extern "C"`` launchers (pointers, sizes, strides, a
``cudaStream_t``; a ``cudaError_t`` code back): the CPU torch wheel's CUDA headers are incomplete, so a ``.cu`` that
included torch could not even compile in CI. The library is built on first use on a CUDA machine and cached per
nvcc version, architecture and source hash (``$TPFUSE_CACHE``, default ``~/.cache/tpfuse``), or ahead of time with
``tpfuse build-csrc``. Selecting it: ``backend="cuda"`` or ``TPFUSE_BACKEND=cuda`` for the ops that have a csrc
kernel (``qk_norm_rope``, ``layernorm_modulate``: forward; their backward is the Triton/torch one).

Everything that decides *how* a kernel is launched (vector width, threads per row, block and grid) is plain
Python here and is tested on the CPU; the C++ side only dispatches on dtype and vector width.
"""


import ctypes
import functools
import hashlib
import os
import re
import shutil
import subprocess
from importlib import resources
from pathlib import Path

import torch

from ._checks import check_int32_addressable

__all__ = ["build", "load", "nvcc_command", "sources", "qk_launch_config", "ln_launch_config", "vector_width",
           "fast_divisor",
           "DTYPE_CODES", "qk_norm_rope_cuda", "layernorm_modulate_cuda", "CsrcError"]

DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}  # csrc/common.cuh: DType
SOURCES = ("qk_norm_rope.cu", "layernorm_modulate.cu")
HEADERS = ("common.cuh",)


class CsrcError(RuntimeError):
    """The CUDA C++ backend cannot be built, loaded or launched (the message says why)."""


# --------------------------------------------------------------------------------------------------------------
# Launch configuration (pure; tested on the CPU)
# --------------------------------------------------------------------------------------------------------------


def vector_width(dtype: torch.dtype, aligned: bool) -> int:
    """Elements per 16-byte access when every row start is 16-byte aligned (the kernels finish a row whose width
    is not a multiple of it with a scalar tail), else 1: scalar loads only, which need no alignment beyond the
    element's."""
    return 16 // torch.empty((), dtype=dtype).element_size() if aligned else 1


def _aligned(t: torch.Tensor, row_strides) -> bool:
    """Every row start of ``t`` is 16-byte aligned: the base pointer and each row stride."""
    elt = t.element_size()
    return t.data_ptr() % 16 == 0 and all((s * elt) % 16 == 0 for s in row_strides)


def fast_divisor(d: int) -> tuple[int, int, int]:
    """``(d, mul, shr)`` for csrc's ``FastDiv``: ``n // d == (n * mul) >> (32 + shr)`` for every ``0 <= n < 2^31``
    (``mul = ceil(2^(31 + l) / d)``, ``l = ceil(log2 d)``; ``mul = 0`` means ``d == 1``)."""
    if not 1 <= d < 2**31:
        raise ValueError(f"fast_divisor: d={d} must be in [1, 2^31)")
    if d == 1:
        return 1, 0, 0
    p = 31 + (d - 1).bit_length()
    return d, -(-(1 << p) // d), p - 32


# (lanes per row, vectors per lane) the vector kernel is instantiated for (csrc/qk_norm_rope.cu), preferred first:
# two vectors per lane spend one shuffle level less per row (sm_90, D=128 bf16: 0.10 vs 0.11 warp instructions
# per byte).
QK_VECTOR_SHAPES = ((8, 2), (16, 2), (8, 1), (16, 1), (32, 1))
QK_ROWS_PER_LANE = 4


def qk_launch_config(n_rows: int, d: int, vec: int, block: int = 256) -> dict:
    """The vector kernel when a row is ``tpr`` lanes x ``vpl`` vectors of ``vec`` elements (a shape in
    ``QK_VECTOR_SHAPES``): each lane takes the Q and K rows of ``QK_ROWS_PER_LANE`` consecutive (b, s, h) in turn.
    Otherwise the scalar kernel: ``tpr`` lanes (a power of two up to a warp) walk a row a pair at a time, Q rows
    then K rows."""
    for tpr, vpl in QK_VECTOR_SHAPES if vec > 1 else ():
        if tpr * vpl * vec == d:
            grid = max(1, -(-n_rows // (QK_ROWS_PER_LANE * (block // tpr))))
            return {"vector": 1, "vec": vec, "tpr": tpr, "vpl": vpl, "block": block, "grid": grid,
                    "rows": QK_ROWS_PER_LANE}
    tpr = 1
    while tpr < min(d // 2, 32):
        tpr *= 2
    return {"vector": 0, "vec": 1, "tpr": tpr, "vpl": 0, "block": block,
            "grid": max(1, -(-2 * n_rows * tpr // block)), "rows": 1}


LN_VECTOR_SHAPES = ((4, 1), (8, 1), (12, 1), (16, 1), (12, 2), (16, 2), (12, 4), (16, 4))  # (nv, wpr) instantiated
LN_BLOCK = 256


def ln_launch_config(batch: int, seq: int, d: int, vec: int) -> dict:
    """The vector kernel when a row is ``wpr`` warps x 32 lanes x ``nv`` vectors of ``vec`` (FLUX.2: 3072 and 4096
    in one warp, 6144 in two, bf16): ``LN_BLOCK / 32 / wpr`` rows of one batch entry per block. Otherwise the
    generic kernel: one block per row, sized to cover the row in one vector per thread."""
    if vec > 1 and d % vec == 0:
        vectors = d // vec
        for nv, wpr in LN_VECTOR_SHAPES:
            if nv * wpr * 32 == vectors:
                rows = LN_BLOCK // 32 // wpr
                return {"nv": nv, "wpr": wpr, "vec": vec, "block": LN_BLOCK, "grid": (-(-seq // rows), batch),
                        "rows": rows}
    per_row = -(-d // vec)  # vectors in a row
    block = min(1024, max(32, -(-per_row // 32) * 32))
    return {"nv": 0, "wpr": 0, "vec": vec, "block": block, "grid": (seq, batch), "rows": 1}


# --------------------------------------------------------------------------------------------------------------
# Building and loading the library
# --------------------------------------------------------------------------------------------------------------


def sources() -> list[Path]:
    """The ``.cu`` sources shipped in the package (``tpfuse.csrc``)."""
    root = resources.files("tpfuse.csrc")
    return [Path(str(root / name)) for name in SOURCES]


def nvcc_path() -> str:
    for candidate in (os.environ.get("NVCC"), shutil.which("nvcc"),
                      os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "nvcc")):
        if candidate and os.path.exists(candidate):
            return candidate
    raise CsrcError("nvcc not found (set NVCC or CUDA_HOME, or install the CUDA toolkit)")


def nvcc_command(arch: int, out: Path, shared: bool = True, verbose_ptxas: bool = False) -> list[str]:
    cmd = [nvcc_path(), "-O3", "-std=c++17", f"-gencode=arch=compute_{arch},code=sm_{arch}", "-lineinfo"]
    if verbose_ptxas:
        cmd += ["-Xptxas", "-v"]
    if shared:
        cmd += ["--shared", "-Xcompiler", "-fPIC", *map(str, sources()), "-o", str(out)]
    return cmd


def _nvcc_version() -> str:
    text = subprocess.run([nvcc_path(), "--version"], capture_output=True, text=True).stdout
    m = re.search(r"release (\d+\.\d+)", text)
    return m.group(1) if m else "unknown"


def _default_arch() -> int:
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        return 10 * major + minor
    return 90


def library_path(arch: int) -> Path:
    root = resources.files("tpfuse.csrc")
    digest = hashlib.sha256()
    for name in (*SOURCES, *HEADERS):
        digest.update((root / name).read_bytes())
    digest.update(str(arch).encode())
    cache = Path(os.environ.get("TPFUSE_CACHE", Path.home() / ".cache" / "tpfuse"))
    return cache / "csrc" / f"cuda-{_nvcc_version()}" / f"sm{arch}-{digest.hexdigest()[:16]}" / "libtpfuse_csrc.so"


def build(arch: int | None = None, force: bool = False) -> Path:
    """Compile ``csrc/*.cu`` into a shared library for ``arch`` (default: this GPU, else 90); cached. ptxas's
    resource report (registers, stack frame, spills per kernel) is kept beside it as ``ptxas.log``."""
    arch = arch or _default_arch()
    out = library_path(arch)
    if out.exists() and not force:
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(f".{os.getpid()}.tmp.so")
    proc = subprocess.run(nvcc_command(arch, tmp, verbose_ptxas=True), capture_output=True, text=True)
    if proc.returncode != 0:
        raise CsrcError(f"nvcc failed building the csrc library for sm_{arch}:\n{proc.stderr[-4000:]}")
    (out.parent / "ptxas.log").write_text(proc.stderr)
    tmp.replace(out)  # atomic: concurrent ranks building the same library never see half a file
    return out


@functools.lru_cache(maxsize=None)
def load(arch: int | None = None) -> ctypes.CDLL:
    """Build (if needed) and load the library; argument types are declared for every launcher."""
    lib = ctypes.CDLL(str(build(arch)))
    p, i32, u32, f32 = ctypes.c_void_p, ctypes.c_int, ctypes.c_uint, ctypes.c_float
    lib.tpfuse_qk_norm_rope_fwd.argtypes = [i32, i32, i32, p, p, p, p, p, p, p, i32, i32, ctypes.POINTER(i32),
                                            ctypes.POINTER(u32), f32, i32, i32, i32, i32, p]
    lib.tpfuse_qk_norm_rope_fwd.restype = i32
    lib.tpfuse_layernorm_modulate_fwd.argtypes = [i32, i32, i32, i32, p, p, p, p, i32, i32, i32,
                                                  ctypes.POINTER(i32), f32, i32, p]
    lib.tpfuse_layernorm_modulate_fwd.restype = i32
    return lib


def _check(code: int, op: str) -> None:
    if code != 0:
        raise CsrcError(f"{op}: the CUDA launcher returned error code {code} (cudaError_t)")


def _stream(t: torch.Tensor) -> int:
    return torch.cuda.current_stream(t.device).cuda_stream


def _i32s(values) -> ctypes.Array:
    return (ctypes.c_int * len(values))(*values)


def _u32s(values) -> ctypes.Array:
    return (ctypes.c_uint * len(values))(*values)


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


# --------------------------------------------------------------------------------------------------------------
# Custom ops
# --------------------------------------------------------------------------------------------------------------


@torch.library.custom_op("tpfuse::qk_norm_rope_cuda", mutates_args=())
def qk_norm_rope_cuda(q: torch.Tensor, k: torch.Tensor, q_weight: torch.Tensor, k_weight: torch.Tensor,
                      angles: torch.Tensor | None, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """csrc forward of :func:`tpfuse.kernels.qk_norm_rope` (validated by the caller); ``angles``: the compact
    ``[2, S, D/2]`` fp32 table of :func:`tpfuse.kernels._rope.angle_table`, or ``None``."""
    B, S, H, D = q.shape
    qo, ko = torch.empty_like(q), torch.empty_like(k)
    qw, kw = q_weight.to(q.dtype).contiguous(), k_weight.to(q.dtype).contiguous()
    rows = [t.stride()[:3] for t in (q, k, qo, ko)]
    aligned = all(_aligned(t, r) for t, r in zip((q, k, qo, ko), rows)) and _aligned(qw, []) and _aligned(kw, [])
    cfg = qk_launch_config(B * S * H, D, vector_width(q.dtype, aligned))
    check_int32_addressable("qk_norm_rope (cuda)", {"q": q, "k": k, "qo": qo, "ko": ko, "angles": angles})
    if cfg["grid"] * cfg["block"] >= 2**31:  # the kernels' global thread index is an int
        raise ValueError(f"qk_norm_rope (cuda): {B * S * H} (token, head) rows need {cfg['grid']} x {cfg['block']} "
                         "threads, over 2^31 - 1: split the batch")
    if B * S * H == 0:
        return qo, ko
    with torch.cuda.device(q.device):
        code = load().tpfuse_qk_norm_rope_fwd(
            DTYPE_CODES[q.dtype], cfg["vector"], cfg["vpl"], _ptr(q), _ptr(k), _ptr(qw), _ptr(kw), _ptr(angles), _ptr(qo),
            _ptr(ko), B * S * H, D, _i32s([s for r in rows for s in r]), _u32s([*fast_divisor(H), *fast_divisor(S)]),
            float(eps), int(angles is not None), cfg["tpr"], cfg["block"], cfg["grid"], _stream(q))
    _check(code, "qk_norm_rope (cuda)")
    return qo, ko


@qk_norm_rope_cuda.register_fake
def _(q, k, q_weight, k_weight, angles, eps):
    return torch.empty_like(q), torch.empty_like(k)


@torch.library.custom_op("tpfuse::layernorm_modulate_cuda", mutates_args=())
def layernorm_modulate_cuda(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float) -> torch.Tensor:
    """csrc forward of :func:`tpfuse.kernels.layernorm_modulate`; ``shift``/``scale`` ``[B|1, D]``."""
    B, S, D = x.shape
    shift, scale = shift.to(x.dtype).contiguous(), scale.to(x.dtype).contiguous()
    y = torch.empty((B, S, D), device=x.device, dtype=x.dtype)
    aligned = (_aligned(x, x.stride()[:2]) and _aligned(y, y.stride()[:2]) and _aligned(shift, shift.stride()[:1])
               and _aligned(scale, scale.stride()[:1]))
    cfg = ln_launch_config(B, S, D, vector_width(x.dtype, aligned))
    check_int32_addressable("layernorm_modulate (cuda)", {"x": x, "y": y, "shift": shift, "scale": scale})
    smb = shift.stride(0) if shift.shape[0] == B and B > 1 else 0
    if B * S == 0:
        return y
    with torch.cuda.device(x.device):
        code = load().tpfuse_layernorm_modulate_fwd(
            DTYPE_CODES[x.dtype], cfg["nv"], cfg["wpr"], cfg["vec"], _ptr(x), _ptr(shift), _ptr(scale), _ptr(y), B,
            S, D, _i32s([x.stride(0), x.stride(1), y.stride(0), y.stride(1), smb]), float(eps), cfg["block"],
            _stream(x))
    _check(code, "layernorm_modulate (cuda)")
    return y


@layernorm_modulate_cuda.register_fake
def _(x, shift, scale, eps):
    return torch.empty(x.shape, device=x.device, dtype=x.dtype)


# Autocast: these norm ops compute in fp32 whatever the autocast dtype (as F.layer_norm/F.rms_norm do under CUDA
# autocast), so a caller that reaches them directly under autocast gets fp32 inputs and outputs.
for _op in ("tpfuse::qk_norm_rope_cuda", "tpfuse::layernorm_modulate_cuda"):
    torch.library.register_autocast(_op, "cuda", torch.float32)
