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
    expected = {  # per dtype: each shape with and without RoPE / per batch and per token
        "qk_norm_rope.cu": 3 * 2 * (len(cb.QK_VECTOR_SHAPES) + len(cb.QK_PAIR_LANES)),
        "layernorm_modulate.cu": 3 * 2 * (len(cb.LN_VEC_SHAPES) + len(cb.LN_WORD_SHAPES))
        + 2 * len(cb.LN_WORD_SHAPES_FP32)}
    assert len(mine) == expected[source], report
    for entry in mine:
        stats = re.findall(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", entry)
        assert stats == [("0", "0", "0")], entry


def test_instantiated_shapes_match_the_launch_tables():
    """The C++ shape macros are the Python launch tables: a shape the launcher picks always exists (and the
    compile report inspects every instantiation, so none is dead)."""
    def macro(text, name):
        body = re.search(rf"#define {name}\(X\)\s*\\?\s*(.*)", text).group(1)
        return tuple(tuple(int(v) for v in m.split(",")) for m in re.findall(r"X\(([\d, ]+)\)", body))

    ln = (cb.sources()[1]).read_text()
    assert macro(ln, "TPFUSE_LN_VEC_SHAPES") == cb.LN_VEC_SHAPES
    assert macro(ln, "TPFUSE_LN_WORD_SHAPES") == cb.LN_WORD_SHAPES
    assert macro(ln, "TPFUSE_LN_WORD_SHAPES_FP32") == cb.LN_WORD_SHAPES_FP32
    qk = (cb.sources()[0]).read_text()
    assert macro(qk, "TPFUSE_QK_VEC_SHAPES") == cb.QK_VECTOR_SHAPES
    assert macro(qk, "TPFUSE_QK_PAIR_LANES") == tuple((t,) for t in cb.QK_PAIR_LANES)
    assert f"kQkPairsPerLane = {cb.QK_PAIRS_PER_LANE};" in qk


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
    assert cb.vector_width(torch.bfloat16, aligned=False) == 2  # otherwise 32-bit words: never a 16-bit access
    assert cb.vector_width(torch.float32, aligned=False) == 1


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
    """(row, element) pairs the launch touches for Q, as the kernels walk them: a group of tpr lanes per row, vpl
    units per lane (16-byte vectors, or RoPE pairs masked to the row), rows consecutive per group."""
    seen = []
    unit = cfg["vec"] if cfg["vector"] else 2
    groups = cfg["grid"] * cfg["block"] // cfg["tpr"]
    for g in range(groups):
        for i in range(cfg["rows"]):
            r = g * cfg["rows"] + i
            if r < n_rows:
                seen += [(r, e) for lane in range(cfg["tpr"]) for v in range(cfg["vpl"])
                         for e in range((v * cfg["tpr"] + lane) * unit, (v * cfg["tpr"] + lane + 1) * unit) if e < d]
    return sorted(seen)


@pytest.mark.parametrize("dtype,d,aligned,vector", [(torch.bfloat16, 128, True, True),
                                                    (torch.bfloat16, 256, True, True),
                                                    (torch.float32, 128, True, True), (torch.float16, 20, True, False),
                                                    (torch.float16, 20, False, False), (torch.bfloat16, 64, True, True),
                                                    (torch.float32, 6, True, False),
                                                    (torch.bfloat16, 128, False, False),
                                                    (torch.bfloat16, 512, True, False)])
def test_qk_launch_covers_every_element_once(dtype, d, aligned, vector):
    vec = cb.vector_width(dtype, aligned)
    n_rows = 1001  # not a multiple of the rows a block covers
    cfg = cb.qk_launch_config(n_rows=n_rows, d=d, vec=vec)
    assert bool(cfg["vector"]) == vector
    assert cfg["tpr"] & (cfg["tpr"] - 1) == 0 and cfg["tpr"] <= 32 and cfg["block"] % cfg["tpr"] == 0
    if vector:
        assert (cfg["tpr"], cfg["vpl"]) == next(s for s in cb.QK_VECTOR_SHAPES if s[0] * s[1] * vec == d)
    else:  # the fewest lanes whose 8 pairs cover the row
        assert cfg["tpr"] in cb.QK_PAIR_LANES and 2 * cb.QK_PAIRS_PER_LANE * cfg["tpr"] >= d
        assert cfg["tpr"] == cb.QK_PAIR_LANES[0] or 2 * cb.QK_PAIRS_PER_LANE * cfg["tpr"] < 2 * d
    assert _qk_cover(cfg, n_rows, d) == [(r, e) for r in range(n_rows) for e in range(d)]


def test_qk_launch_rejects_head_dims_past_the_pair_kernel():
    with pytest.raises(ValueError, match=r"D=514 exceeds the CUDA C\+\+ kernels' 512 \(use backend='triton'\)"):
        cb.qk_launch_config(10, 514, 2)


@pytest.mark.parametrize("dtype,d,aligned,kind", [(torch.bfloat16, 3072, True, 0), (torch.bfloat16, 6144, True, 0),
                                                  (torch.bfloat16, 4096, True, 0), (torch.float32, 3072, True, 0),
                                                  (torch.float32, 40, True, 1), (torch.bfloat16, 3000, True, 1),
                                                  (torch.bfloat16, 3072, False, 1), (torch.float16, 8192, False, 1),
                                                  (torch.float32, 16384, False, 1), (torch.float32, 3001, False, 1)])
@pytest.mark.parametrize("per_token", [False, True])
def test_ln_launch_covers_the_row(dtype, d, aligned, kind, per_token):
    cfg = cb.ln_launch_config(batch=2, seq=7, d=d, dtype=dtype, vector=aligned, per_token=per_token)
    assert cfg["kind"] == kind and cfg["block"] == cb.LN_BLOCK
    shapes = cb.LN_VEC_SHAPES if kind == 0 else cb.ln_word_shapes(dtype)
    assert (cfg["nv"], cfg["wpr"], cfg["tiles"]) in shapes
    assert cfg["rows"] == cb.LN_WARPS // cfg["wpr"] * cfg["tiles"] and cfg["grid"] == (-(-7 // cfg["rows"]), 2)
    unit = cfg["vec"]  # elements per access: a 16-byte vector or a 32-bit word
    lanes = [((j * cfg["wpr"] + w) * 32 + lane) * unit + i for j in range(cfg["nv"]) for w in range(cfg["wpr"])
             for lane in range(32) for i in range(unit)]
    if kind == 0:  # exactly the row
        assert sorted(lanes) == list(range(d))
    else:  # the smallest capacity that holds it; the rest is masked
        assert sorted(e for e in lanes if e < d) == list(range(d)) and cfg["capacity"] >= d
        assert all(cap < d for cap in (nw * w * 32 * unit for nw, w, _ in shapes) if cap < cfg["capacity"])
    per_batch_smem = 2 * d * 4 if kind == 0 else 2 * cfg["capacity"] * 4
    assert cfg["smem"] == (0 if per_token else per_batch_smem) + cb.LN_WARPS * 4


def test_ln_launch_has_no_kernel_for_odd_or_very_wide_16_bit_rows():
    """Those run in fp32 (the launcher): a word of an odd-D row would straddle two rows; the 16-bit word kernel
    stops at 8192 features."""
    assert cb.ln_launch_config(1, 4, 3001, torch.bfloat16, vector=False) is None
    assert cb.ln_launch_config(1, 4, 8200, torch.float16, vector=False) is None
    assert cb.ln_launch_config(1, 4, 12288, torch.bfloat16, vector=False) is None
    assert cb.ln_launch_config(1, 4, 12288, torch.bfloat16, vector=True)["kind"] == 0  # aligned: the vector kernel
    assert cb.ln_launch_config(1, 4, 3001, torch.float32, vector=False)["kind"] == 1


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
        y_tok = torch.ops.tpfuse.layernorm_modulate_cuda(torch.empty(2, 5, 16), torch.empty(1, 5, 16),
                                                          torch.empty(1, 5, 16), 1e-6)  # per token
    assert qo.shape == q.shape and qo.stride() == q.stride() and ko.shape == q.shape
    assert y.shape == (2, 5, 16) and y_tok.shape == (2, 5, 16) and y_tok.is_contiguous()


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
@pytest.mark.parametrize("D", [3072, 3001, 4096, 6144, 3000, 40, 12288, 10000])
@pytest.mark.parametrize("mode", ["batch", "token", "token-b1"])
def test_cuda_layernorm_modulate_matches_reference(dtype, D, mode):
    """Vector widths, word-kernel widths (3000: 8-byte rows; 40), odd D and 10000 (16-bit: through fp32), per batch
    and per token (one row per token, or broadcast over the batch)."""
    g = torch.Generator(device="cuda").manual_seed(0)
    x = (3 * torch.randn(2, 33, D, device="cuda", generator=g) + 1).to(dtype)
    shape = {"batch": (2, D), "token": (2, 33, D), "token-b1": (1, 33, D)}[mode]
    shift, scale = (torch.randn(*shape, device="cuda", generator=g).to(dtype) for _ in range(2))
    torch.testing.assert_close(layernorm_modulate(x, shift, scale, backend="cuda"),
                               layernorm_modulate_reference(x, shift, scale))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("offset", [1, 2, 8])
@pytest.mark.parametrize("per_token", [False, True])
def test_cuda_layernorm_modulate_misaligned_views(dtype, offset, per_token):
    """Rows at an odd element (copied), at 4- and 16-byte offsets (word kernel), modulation views too."""
    g = torch.Generator(device="cuda").manual_seed(1)
    D = 3072
    x = torch.randn(2, 9, D + offset, device="cuda", generator=g).to(dtype)[..., offset:]
    rows = 9 if per_token else 1
    shift = torch.randn(2, rows, D + offset, device="cuda", generator=g).to(dtype)[..., offset:]
    scale = torch.randn(2, rows, D + offset, device="cuda", generator=g).to(dtype)[..., offset:]
    torch.testing.assert_close(layernorm_modulate(x, shift, scale, backend="cuda"),
                               layernorm_modulate_reference(x, shift, scale))
