"""The CUDA C++ backend: compiled for sm_90 with no spills (CI has nvcc, no GPU), the library builds and loads
through ctypes, and the host-side launch logic is checked on the CPU. Numerics run where a GPU is."""

import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

from tpfuse.kernels import fused_qkv_mlp_proj, layernorm_modulate, qk_norm_rope, qk_norm_rope_reference
from tpfuse.kernels import cuda_backend as cb
from tpfuse.kernels.layernorm_modulate import layernorm_modulate_reference

NVCC = shutil.which("nvcc") or (os.path.exists("/usr/local/cuda/bin/nvcc") and "/usr/local/cuda/bin/nvcc")
needs_nvcc = pytest.mark.skipif(not NVCC, reason="nvcc not installed")


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """`tpfuse build-csrc --arch 90` into a fresh cache: one nvcc run (~30 s) serves the build and the spill
    checks (the build keeps ptxas's report beside the library)."""
    if not NVCC:
        pytest.skip("nvcc not installed")
    cache = tmp_path_factory.mktemp("csrc-cache")
    env = {**os.environ, "TPFUSE_CACHE": str(cache)}
    proc = subprocess.run([sys.executable, "-m", "tpfuse.tp_layers.cli", "build-csrc", "--arch", "90"],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr
    return cache, proc


@needs_nvcc
@pytest.mark.parametrize("source", cb.SOURCES)
def test_compiles_for_sm90_without_spills(source, built):
    cache, _ = built
    (log,) = cache.glob("csrc/*/sm90-*/ptxas.log")
    report = log.read_text()
    prefix = {"qk_norm_rope.cu": "qk_norm_rope_", "layernorm_modulate.cu": "ln_mod_"}[source]
    # ptxas prints one "Compiling entry function" line, then its properties, per kernel.
    entries = re.split(r"(?=ptxas info\s*: Compiling entry function)", report)
    mine = [e for e in entries if re.search(rf"Compiling entry function '_ZN6tpfuse\d+{prefix}\w+' for 'sm_90'", e)]
    per_dtype = {"qk_norm_rope.cu": 2 * len(cb.QK_VECTOR_SHAPES) + 1,  # vector kernels with/without RoPE, scalar
                 "layernorm_modulate.cu": len(cb.LN_VECTOR_SHAPES) + 2}  # vector kernels, generic (vec and 1)
    assert len(mine) == 3 * per_dtype[source], report
    for entry in mine:
        stats = re.findall(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", entry)
        assert stats == [("0", "0", "0")], entry


@needs_nvcc
def test_build_command_builds_library_that_caches_and_loads(built, monkeypatch):
    cache, proc = built
    assert proc.stdout.strip().endswith("libtpfuse_csrc.so")
    monkeypatch.setenv("TPFUSE_CACHE", str(cache))
    path = cb.build(90)
    assert path.exists() and str(cache) in str(path) and "sm90-" in str(path)
    assert str(path) == proc.stdout.strip().splitlines()[-1].strip()
    mtime = path.stat().st_mtime_ns
    assert cb.build(90) == path and path.stat().st_mtime_ns == mtime  # cached: not rebuilt
    import ctypes

    lib = ctypes.CDLL(str(path))  # statically linked cudart: loads without a GPU or driver
    assert lib.tpfuse_qk_norm_rope_fwd and lib.tpfuse_layernorm_modulate_fwd


# ---------------------------------------------------------------------------------------------------------------
# Host-side launch logic (pure Python)
# ---------------------------------------------------------------------------------------------------------------


def test_vector_width():
    assert cb.vector_width(torch.bfloat16, aligned=True) == 8  # 16 bytes
    assert cb.vector_width(torch.float32, aligned=True) == 4
    assert cb.vector_width(torch.bfloat16, aligned=False) == 1  # misaligned rows: scalar loads only


def test_alignment_check_sees_offsets_and_strides():
    buf = torch.zeros(4, 2 * 136, dtype=torch.bfloat16)
    assert cb._aligned(buf, buf.stride()[:1])  # 272-element rows: 544 bytes, a multiple of 16
    assert not cb._aligned(buf[:, 1:129], buf.stride()[:1])  # an odd element offset
    assert not cb._aligned(torch.zeros(4, 20, dtype=torch.bfloat16), (20,))  # 40-byte rows


def test_fast_divisor_is_exact():
    import random

    rng = random.Random(0)
    for d in [1, 2, 3, 5, 7, 24, 48, 96, 1000, 4608, 65535, 2**20 + 7, 2**30 + 1, 2**31 - 1]:
        d_, mul, shr = cb.fast_divisor(d)
        assert d_ == d and 0 <= mul < 2**32
        for n in [0, 1, d - 1, d, d + 1, 2**31 - 1, *(rng.randrange(2**31) for _ in range(2000))]:
            q = n if mul == 0 else (n * mul >> 32) >> shr  # the kernel's umulhi(n, mul) >> shr
            assert q == n // d, (d, n)
    with pytest.raises(ValueError, match="d=0 must be in"):
        cb.fast_divisor(0)


def _qk_cover(cfg, n_rows, d):
    """(row, element) pairs the launch touches for Q, as the kernels walk them."""
    seen = []
    if cfg["vector"]:
        groups = cfg["grid"] * cfg["block"] // cfg["tpr"]
        for g in range(groups):
            for i in range(cfg["rows"]):
                r = g * cfg["rows"] + i
                if r < n_rows:
                    seen += [(r, (v * cfg["tpr"] + lane) * cfg["vec"] + j) for lane in range(cfg["tpr"])
                             for v in range(cfg["vpl"]) for j in range(cfg["vec"])]
    else:  # Q rows are the first n_rows of the 2 * n_rows row groups
        for r in range(min(n_rows, cfg["grid"] * cfg["block"] // cfg["tpr"])):
            seen += [(r, e) for lane in range(cfg["tpr"]) for s in range(2 * lane, d, 2 * cfg["tpr"])
                     for e in (s, s + 1)]
    return sorted(seen)


@pytest.mark.parametrize("dtype,d,aligned,vector", [(torch.bfloat16, 128, True, True),
                                                    (torch.bfloat16, 256, True, True),
                                                    (torch.float32, 128, True, True), (torch.float16, 20, True, False),
                                                    (torch.float16, 20, False, False), (torch.bfloat16, 64, True, True),
                                                    (torch.float32, 6, True, False),
                                                    (torch.bfloat16, 128, False, False)])
def test_qk_launch_covers_every_element_once(dtype, d, aligned, vector):
    vec = cb.vector_width(dtype, aligned)
    n_rows = 1001  # not a multiple of the rows a block covers
    cfg = cb.qk_launch_config(n_rows=n_rows, d=d, vec=vec)
    assert bool(cfg["vector"]) == vector
    assert cfg["tpr"] & (cfg["tpr"] - 1) == 0 and cfg["tpr"] <= 32 and cfg["block"] % cfg["tpr"] == 0
    if vector:
        assert (cfg["tpr"], cfg["vpl"]) == next(s for s in cb.QK_VECTOR_SHAPES if s[0] * s[1] * vec == d)
    else:
        assert cfg["grid"] * cfg["block"] >= 2 * n_rows * cfg["tpr"]  # Q rows then K rows
    assert _qk_cover(cfg, n_rows, d) == [(r, e) for r in range(n_rows) for e in range(d)]


@pytest.mark.parametrize("dtype,d,aligned,vector", [(torch.bfloat16, 3072, True, True),
                                                    (torch.bfloat16, 6144, True, True),
                                                    (torch.bfloat16, 4096, True, True),
                                                    (torch.float32, 3072, True, True), (torch.float32, 40, True, False),
                                                    (torch.bfloat16, 3001, True, False),
                                                    (torch.bfloat16, 3072, False, False)])
def test_ln_launch_covers_the_row(dtype, d, aligned, vector):
    vec = cb.vector_width(dtype, aligned)
    cfg = cb.ln_launch_config(batch=2, seq=7, d=d, vec=vec)
    assert bool(cfg["nv"]) == vector
    if vector:
        assert (cfg["nv"], cfg["wpr"]) in cb.LN_VECTOR_SHAPES and cfg["block"] == cb.LN_BLOCK
        assert cfg["grid"] == (-(-7 // cfg["rows"]), 2) and cfg["rows"] * cfg["wpr"] * 32 == cfg["block"]
        seen = sorted(((j * cfg["wpr"] + w) * 32 + lane) * vec + i for j in range(cfg["nv"])
                      for w in range(cfg["wpr"]) for lane in range(32) for i in range(vec))
    else:
        assert cfg["block"] % 32 == 0 and 32 <= cfg["block"] <= 1024 and cfg["grid"] == (7, 2)
        d_vec = (d // vec) * vec
        seen = sorted([x for t in range(cfg["block"]) for s in range(t * vec, d_vec, cfg["block"] * vec)
                       for x in range(s, s + vec)] + list(range(d_vec, d)))
    assert seen == list(range(d))


# ---------------------------------------------------------------------------------------------------------------
# Selection and errors without CUDA; fake implementations for torch.compile
# ---------------------------------------------------------------------------------------------------------------


def test_cuda_backend_errors_without_cuda(monkeypatch):
    q = torch.randn(1, 3, 2, 8)
    w = torch.ones(8)
    with pytest.raises(RuntimeError, match="the cuda \\(csrc\\) backend needs CUDA tensors, got cpu tensors"):
        qk_norm_rope(q, q, w, w, None, None, backend="cuda")
    with pytest.raises(RuntimeError, match="needs CUDA tensors"):
        layernorm_modulate(torch.randn(1, 3, 8), torch.zeros(1, 8), torch.zeros(1, 8), backend="cuda")
    x, wt = torch.randn(1, 3, 8), torch.randn(3 * 32 + 2 * 4, 8)
    with pytest.raises(ValueError, match="no CUDA C\\+\\+ \\(csrc\\) kernel for this op"):
        fused_qkv_mlp_proj(x, wt, torch.ones(32), torch.ones(32), None, None, 1, 32, 4, backend="cuda")
    monkeypatch.setenv("TPFUSE_BACKEND", "cuda")
    with pytest.raises(RuntimeError, match="needs CUDA tensors"):
        qk_norm_rope(q, q, w, w, None, None)


def test_fake_implementations_trace_without_the_library():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        q = torch.empty(2, 5, 3, 8).transpose(1, 2).contiguous().transpose(1, 2)
        qo, ko = torch.ops.tpfuse.qk_norm_rope_cuda(q, q, torch.empty(8), torch.empty(8), torch.empty(2, 5, 4),
                                                    1e-6)
        y = torch.ops.tpfuse.layernorm_modulate_cuda(torch.empty(2, 5, 16), torch.empty(2, 16), torch.empty(2, 16),
                                                      1e-6)
    assert qo.shape == q.shape and qo.stride() == q.stride() and ko.shape == q.shape
    assert y.shape == (2, 5, 16)


# ---------------------------------------------------------------------------------------------------------------
# Numerics (GPU only)
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("D,layout", [(128, "bshd"), (128, "bhsd"), (20, "bshd"), (128, "offset"), (64, "bshd"),
                                      (256, "bshd")])
def test_cuda_qk_norm_rope_matches_reference(dtype, D, layout):
    g = torch.Generator(device="cuda").manual_seed(0)
    shape = (2, 3, 77, D) if layout == "bhsd" else (2, 77, 3, D + (1 if layout == "offset" else 0))
    q = torch.randn(shape, device="cuda", generator=g).to(dtype)
    k = torch.randn(shape, device="cuda", generator=g).to(dtype)
    if layout == "bhsd":
        q, k = q.transpose(1, 2), k.transpose(1, 2)
    if layout == "offset":  # rows start at an odd element: misaligned for vectors, scalar path
        q, k = q[..., 1:], k[..., 1:]
    w = (1 + 0.1 * torch.randn(D, device="cuda", generator=g)).to(dtype)
    ang = torch.rand(77, D // 2, device="cuda", generator=g) * 6.28
    cos, sin = ang.cos().repeat_interleave(2, 1), ang.sin().repeat_interleave(2, 1)
    out = qk_norm_rope(q, k, w, w, cos, sin, backend="cuda")
    ref = qk_norm_rope_reference(q, k, w, w, cos, sin)
    for o, r in zip(out, ref):
        torch.testing.assert_close(o, r)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("D", [3072, 3001, 4096, 6144])
def test_cuda_layernorm_modulate_matches_reference(dtype, D):
    g = torch.Generator(device="cuda").manual_seed(0)
    x = (3 * torch.randn(2, 33, D, device="cuda", generator=g) + 1).to(dtype)
    shift, scale = (torch.randn(2, D, device="cuda", generator=g).to(dtype) for _ in range(2))
    torch.testing.assert_close(layernorm_modulate(x, shift, scale, backend="cuda"),
                               layernorm_modulate_reference(x, shift, scale))
