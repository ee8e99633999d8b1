"""The CUDA C++ backend: torch-free kernels in ``csrc/``, built with nvcc, loaded with ctypes, exposed as
``torch.library`` custom ops (with fake implementations, so they trace under ``torch.compile``).

The ``.cu`` files include only CUDA's own headers and export ``extern "C"`` launchers (pointers, sizes, strides, a
``cudaStream_t``; a ``cudaError_t`` code back): the CPU torch wheel's CUDA headers are incomplete, so a ``.cu`` that
included torch could not even compile in CI. The library is built on first use on a CUDA machine and cached per
nvcc version, architecture and source hash (``$TPFUSE_CACHE``, default ``~/.cache/tpfuse``), or ahead of time with
``tpfuse build-csrc``. Selecting it: ``backend="cuda"`` or ``TPFUSE_BACKEND=cuda`` for the ops that have a csrc
kernel (``qk_norm_rope``, ``layernorm_modulate``: forward; their backward is the Triton/torch one).

Everything that decides *how* a kernel is launched (vector width, threads per row, block and grid) is plain
Python here and is tested on the CPU; the C++ side only dispatches on dtype and the instantiated shape.

Alignment: the vector kernels need 16-byte aligned rows; the fallback kernels (``layernorm_modulate``'s word
kernel, ``qk_norm_rope``'s pair kernel) need rows that start at an even element (one 32-bit word, or an 8-byte
float2 in fp32, never straddles a row), so no kernel issues a 16-bit access. Rows at odd element offsets (a view
starting at an odd element) are copied first, and ``layernorm_modulate`` with an odd D (every other y row starts
mid-word) or over 8192 features off the vector path runs in fp32 and rounds once: neither happens in the models'
layouts, and both give the same result as the kernel would.
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
           "fast_divisor", "DTYPE_CODES", "qk_norm_rope_cuda", "layernorm_modulate_cuda", "CsrcError"]

DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}  # csrc/common.cuh: DType
SOURCES = ("qk_norm_rope.cu", "layernorm_modulate.cu")
HEADERS = ("common.cuh",)


class CsrcError(RuntimeError):
    """The CUDA C++ backend cannot be built, loaded or launched (the message says why)."""


# --------------------------------------------------------------------------------------------------------------
# Launch configuration (pure; tested on the CPU)
# --------------------------------------------------------------------------------------------------------------


def vector_width(dtype: torch.dtype, aligned: bool) -> int:
    """Elements per access: a 16-byte vector when every row start is 16-byte aligned, else one 32-bit word (two
    16-bit elements, one fp32); the pair kernel reads a whole RoPE pair (4 or 8 bytes) either way."""
    size = torch.empty((), dtype=dtype).element_size()
    return 16 // size if aligned else max(1, 4 // size)


def _aligned(t: torch.Tensor, row_strides, nbytes: int = 16) -> bool:
    """Every row start of ``t`` is ``nbytes``-aligned: the base pointer and each row stride."""
    elt = t.element_size()
    return t.data_ptr() % nbytes == 0 and all((s * elt) % nbytes == 0 for s in row_strides)


def _realigned(t: torch.Tensor) -> torch.Tensor:
    """A fresh contiguous copy (a new allocation: aligned even where ``t`` is a contiguous view at an odd offset)."""
    return t.clone(memory_format=torch.contiguous_format)


def fast_divisor(d: int) -> tuple[int, int, int]:
    """``(d, mul, shr)`` for csrc's ``FastDiv``: ``n // d == (n * mul) >> (32 + shr)`` for every ``0 <= n < 2^31``
    (``mul = ceil(2^(31 + l) / d)``, ``l = ceil(log2 d)``; ``mul = 0`` means ``d == 1``)."""
    if not 1 <= d < 2**31:
        raise ValueError(f"fast_divisor: d={d} must be in [1, 2^31)")
    if d == 1:
        return 1, 0, 0
    p = 31 + (d - 1).bit_length()
    return d, -(-(1 << p) // d), p - 32


# (lanes per row, vectors per lane) the vector kernel is instantiated for (csrc/qk_norm_rope.cu), one per width:
# two vectors per lane spend one shuffle level less per row than one (sm_90, D = 128 bf16: 0.089 vs 0.11-0.12 warp
# instructions per byte; the one-vector shapes (16, 1), (32, 1) were never picked and (8, 1) for D = 64 is (4, 2)).
QK_VECTOR_SHAPES = ((8, 2), (16, 2), (4, 2))
QK_ROWS_PER_LANE = 4
# The pair kernel: lanes per row (instantiated) x 8 RoPE pairs per lane, so D <= 16 x lanes; 512 is 4x the head dim of
# every supported model (128).
QK_PAIR_LANES = (4, 8, 16, 32)
QK_PAIRS_PER_LANE = 8
QK_MAX_D = 2 * QK_PAIRS_PER_LANE * QK_PAIR_LANES[-1]


def qk_launch_config(n_rows: int, d: int, vec: int, block: int = 256) -> dict:
    """The vector kernel when a row is ``tpr`` lanes x ``vpl`` 16-byte vectors of ``vec`` elements (a shape in
    ``QK_VECTOR_SHAPES``); otherwise the pair kernel, ``tpr`` lanes (the fewest in ``QK_PAIR_LANES`` that cover
    ``d``) x 8 pairs, masked. Either way each lane takes the Q and K rows of ``QK_ROWS_PER_LANE`` consecutive
    (b, s, h) in turn."""
    for tpr, vpl in QK_VECTOR_SHAPES if vec >= 4 else ():  # vec >= 4: 16-byte vectors (vector_width)
        if tpr * vpl * vec == d:
            grid = max(1, -(-n_rows // (QK_ROWS_PER_LANE * (block // tpr))))
            return {"vector": 1, "vec": vec, "tpr": tpr, "vpl": vpl, "block": block, "grid": grid,
                    "rows": QK_ROWS_PER_LANE}
    tpr = next((t for t in QK_PAIR_LANES if 2 * QK_PAIRS_PER_LANE * t >= d), None)
    if tpr is None:
        raise ValueError(f"qk_norm_rope (cuda): head_dim D={d} exceeds the CUDA C++ kernels' {QK_MAX_D} (use "
                         "backend='triton')")
    return {"vector": 0, "vec": 2, "tpr": tpr, "vpl": QK_PAIRS_PER_LANE, "block": block,
            "grid": max(1, -(-n_rows // (QK_ROWS_PER_LANE * (block // tpr)))), "rows": QK_ROWS_PER_LANE}


# (nv, wpr, tiles) instantiated in csrc/layernorm_modulate.cu: the vector kernel's nv 16-byte vectors per lane x 32
# lanes x wpr warps is exactly the row (FLUX.2: 3072 and 4096 bf16 in one warp, 6144 in two), tiles rows of each
# warp in turn per block; the word kernel's nv 32-bit words per lane cover up to that many (masked).
LN_VEC_SHAPES = ((4, 1, 2), (8, 1, 1), (12, 1, 1), (16, 1, 1), (12, 2, 1), (16, 2, 1), (12, 4, 2), (16, 4, 2))
LN_WORD_SHAPES = ((32, 1, 2), (48, 1, 2), (64, 1, 2), (48, 2, 2), (64, 2, 2))
LN_WORD_SHAPES_FP32 = ((48, 4, 2), (64, 4, 2), (48, 8, 1), (64, 8, 1))  # fp32 only (6144-16384 features)
LN_BLOCK = 256
LN_WARPS = LN_BLOCK // 32


def ln_word_shapes(dtype: torch.dtype) -> tuple:
    return LN_WORD_SHAPES + (LN_WORD_SHAPES_FP32 if dtype == torch.float32 else ())


def ln_launch_config(batch: int, seq: int, d: int, dtype: torch.dtype, vector: bool,
                     per_token: bool = False) -> dict | None:
    """The vector kernel when ``vector`` (16-byte aligned rows) and ``d`` is a vector shape's width exactly;
    otherwise the word kernel with the smallest capacity >= ``d`` (rows at even elements; ``d`` even for 16-bit
    types). ``None`` where no kernel takes the row (16-bit: odd ``d``, or over 8192 features off the vector path):
    the launcher runs those in fp32. Per batch, the block stages its batch entry's modulation as fp32 in shared
    memory (``smem`` bytes, with 8 floats of reduction scratch)."""
    size = torch.empty((), dtype=dtype).element_size()
    vec, epw = 16 // size, 4 // size

    def config(kind, nv, wpr, tiles, per_access, row_floats):
        rows = LN_WARPS // wpr * tiles
        return {"kind": kind, "nv": nv, "wpr": wpr, "tiles": tiles, "vec": per_access, "block": LN_BLOCK,
                "grid": (-(-seq // rows), batch), "rows": rows, "capacity": nv * wpr * 32 * per_access,
                "smem": ((0 if per_token else row_floats) + LN_WARPS) * 4}

    if vector:
        for nv, wpr, tiles in LN_VEC_SHAPES:
            if nv * wpr * 32 * vec == d:
                return config(0, nv, wpr, tiles, vec, 2 * d)
    if d % epw == 0:
        for nw, wpr, tiles in sorted(ln_word_shapes(dtype), key=lambda s: s[0] * s[1]):
            if nw * wpr * 32 * epw >= d:
                return config(1, nw, wpr, tiles, epw, 2 * nw * wpr * 32 * epw)
    return None


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


def nvcc_command(arch: int, out: Path, shared: bool = True, verbose_ptxas: bool = False,
                 source: Path | None = None) -> list[str]:
    """nvcc for every source into one shared library, or (``source``) one translation unit into an object."""
    cmd = [nvcc_path(), "-O3", "-std=c++17", f"-gencode=arch=compute_{arch},code=sm_{arch}", "-lineinfo"]
    if verbose_ptxas:
        cmd += ["-Xptxas", "-v"]
    if source is not None:
        cmd += ["-c", "-Xcompiler", "-fPIC", str(source), "-o", str(out)]
    elif shared:
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
    # One nvcc per source, concurrently, then a link: the sources take ~15 s and ~9 s on their own (their ~150
    # kernel instantiations), so the wall time is the longer one, not the sum.
    objects = [out.parent / f"{src.stem}.{os.getpid()}.o" for src in sources()]
    try:
        procs = [subprocess.Popen(nvcc_command(arch, obj, verbose_ptxas=True, source=src), stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) for src, obj in zip(sources(), objects)]
        logs = [p.communicate() for p in procs]
        failed = [(src.name, err) for src, p, (_, err) in zip(sources(), procs, logs) if p.returncode != 0]
        if failed:
            raise CsrcError(f"nvcc failed building the csrc library for sm_{arch} ({failed[0][0]}):\n"
                            f"{failed[0][1][-4000:]}")
        link = subprocess.run([nvcc_path(), "--shared", *map(str, objects), "-o", str(tmp)], capture_output=True,
                              text=True)
        if link.returncode != 0:
            raise CsrcError(f"nvcc failed linking the csrc library for sm_{arch}:\n{link.stderr[-4000:]}")
    finally:
        for obj in objects:
            obj.unlink(missing_ok=True)
    (out.parent / "ptxas.log").write_text("".join(out_ + err for out_, err in logs))
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
    lib.tpfuse_layernorm_modulate_fwd.argtypes = [i32, i32, i32, i32, i32, i32, p, p, p, p, i32, i32, i32,
                                                  ctypes.POINTER(i32), f32, p]
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
    qo, ko = torch.empty_like(q), torch.empty_like(k)  # rows at even elements: fresh, D even
    pair = 2 * q.element_size()  # the pair kernel's access: one RoPE pair, aligned
    q_in, k_in = (t if _aligned(t, t.stride()[:3], pair) else _realigned(t) for t in (q, k))
    qw, kw = (w.to(q.dtype).contiguous() for w in (q_weight, k_weight))
    qw, kw = (w if _aligned(w, []) else _realigned(w) for w in (qw, kw))
    rows = [t.stride()[:3] for t in (q_in, k_in, qo, ko)]
    if not (_aligned(qo, rows[2], pair) and _aligned(ko, rows[3], pair)):
        raise CsrcError(f"qk_norm_rope (cuda): output rows not {pair}-byte aligned (strides {qo.stride()})")
    aligned = all(_aligned(t, r) for t, r in zip((q_in, k_in, qo, ko), rows))
    cfg = qk_launch_config(B * S * H, D, vector_width(q.dtype, aligned))
    check_int32_addressable("qk_norm_rope (cuda)", {"q": q_in, "k": k_in, "qo": qo, "ko": ko, "angles": angles})
    if cfg["grid"] * cfg["block"] >= 2**31:  # the kernels' global thread index is an int
        raise ValueError(f"qk_norm_rope (cuda): {B * S * H} (token, head) rows need {cfg['grid']} x {cfg['block']} "
                         "threads, over 2^31 - 1: split the batch")
    if B * S * H == 0:
        return qo, ko
    with torch.cuda.device(q.device):
        code = load().tpfuse_qk_norm_rope_fwd(
            DTYPE_CODES[q.dtype], cfg["vector"], cfg["vpl"], _ptr(q_in), _ptr(k_in), _ptr(qw), _ptr(kw), _ptr(angles),
            _ptr(qo), _ptr(ko), B * S * H, D, _i32s([s for r in rows for s in r]),
            _u32s([*fast_divisor(H), *fast_divisor(S)]), float(eps), int(angles is not None), cfg["tpr"],
            cfg["block"], cfg["grid"], _stream(q))
    _check(code, "qk_norm_rope (cuda)")
    return qo, ko


@qk_norm_rope_cuda.register_fake
def _(q, k, q_weight, k_weight, angles, eps):
    return torch.empty_like(q), torch.empty_like(k)


def _staged_rows(m: torch.Tensor, copy: bool = False) -> torch.Tensor:
    """A per-batch modulation ``[B|1, D]`` as the kernels stage it: 16-byte aligned rows padded to a multiple of 16
    bytes (16-byte loads for the whole row); a tiny copy only where it is not already (or ``copy``)."""
    vec = 16 // m.element_size()
    if not copy and m.shape[-1] % vec == 0 and m.stride(-1) == 1 and _aligned(m, m.stride()[:1]):
        return m
    out = m.new_zeros(m.shape[0], -(-m.shape[-1] // vec) * vec)
    out[:, :m.shape[-1]] = m
    return out


def _layernorm_modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float) -> torch.Tensor:
    B, S, D = x.shape
    mods = [m.to(x.dtype) for m in (shift, scale)]
    mods = [m.unsqueeze(1) if m.dim() == 2 else m for m in mods]  # [B|1, S|1, D]
    per_token = mods[0].shape[1] > 1
    y = torch.empty((B, S, D), device=x.device, dtype=x.dtype)
    if B * S == 0:
        return y
    if x.element_size() == 2 and D % 2 == 0:  # rows at an odd element: a copy (then 16-byte aligned if D % 8 == 0)
        x = x if _aligned(x, x.stride()[:2], 4) else _realigned(x)
        if per_token:
            mods = [m if _aligned(m, m.stride()[:2], 4) else _realigned(m) for m in mods]
    vector = (_aligned(x, x.stride()[:2]) and _aligned(y, y.stride()[:2])
              and (not per_token or all(_aligned(m, m.stride()[:2]) for m in mods)))
    cfg = ln_launch_config(B, S, D, x.dtype, vector, per_token)
    if cfg is None:  # 16-bit: an odd D, or over 8192 features off the vector path (see the module doc)
        return _layernorm_modulate(x.float(), shift.float(), scale.float(), eps).to(x.dtype)
    if per_token:
        if mods[0].stride() != mods[1].stride():  # one stride pair for both
            mods = [_realigned(m) for m in mods]
        shift_t, scale_t = mods
        mb = shift_t.stride(0) if shift_t.shape[0] == B and B > 1 else 0
        ms = shift_t.stride(1)
    else:
        shift_t, scale_t = (_staged_rows(m[:, 0]) for m in mods)
        if shift_t.stride() != scale_t.stride():  # one stride for both: two fresh padded copies
            shift_t, scale_t = (_staged_rows(m[:, 0], copy=True) for m in mods)
        mb, ms = (shift_t.stride(0) if shift_t.shape[0] == B and B > 1 else 0), 0
    check_int32_addressable("layernorm_modulate (cuda)", {"x": x, "y": y, "shift": shift_t, "scale": scale_t})
    with torch.cuda.device(x.device):
        code = load().tpfuse_layernorm_modulate_fwd(
            DTYPE_CODES[x.dtype], cfg["kind"], cfg["nv"], cfg["wpr"], cfg["tiles"], int(per_token), _ptr(x),
            _ptr(shift_t), _ptr(scale_t), _ptr(y), B, S, D,
            _i32s([x.stride(0), x.stride(1), y.stride(0), y.stride(1), mb, ms]), float(eps), _stream(x))
    _check(code, "layernorm_modulate (cuda)")
    return y


@torch.library.custom_op("tpfuse::layernorm_modulate_cuda", mutates_args=())
def layernorm_modulate_cuda(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float) -> torch.Tensor:
    """csrc forward of :func:`tpfuse.kernels.layernorm_modulate` (validated by the caller); ``shift``/``scale``:
    per batch ``[B|1, D]`` or ``[B|1, 1, D]``, or per token ``[B|1, S, D]``. Output contiguous ``[B, S, D]``."""
    return _layernorm_modulate(x, shift, scale, eps)


@layernorm_modulate_cuda.register_fake
def _(x, shift, scale, eps):
    return torch.empty(x.shape, device=x.device, dtype=x.dtype)


# Autocast: these norm ops compute in fp32 whatever the autocast dtype (as F.layer_norm/F.rms_norm do under CUDA
# autocast), so a caller that reaches them directly under autocast gets fp32 inputs and outputs.
for _op in ("tpfuse::qk_norm_rope_cuda", "tpfuse::layernorm_modulate_cuda"):
    torch.library.register_autocast(_op, "cuda", torch.float32)
