"""Benchmarks are never timed tests; their --dry-run (tiny CPU shapes) keeps every code path exercised."""

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench"


def _dry_run(script: str, out: Path, distributed: bool = False):
    """Run ``bench/<script> --dry-run`` (under torchrun on 2 gloo ranks if ``distributed``); (stdout, JSON)."""
    launch = ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"] if distributed
              else [sys.executable])
    flags = ["--distributed"] if distributed else []
    proc = subprocess.run([*launch, str(BENCH / script), *flags, "--dry-run", "--out", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout, json.loads(out.read_text())


def test_bench_kernels_dry_run(tmp_path):
    out = tmp_path / "kernels.json"
    stdout, data = _dry_run("bench_kernels.py", out)
    assert data["dry_run"] and {"device", "torch", "triton", "date"} <= set(data["info"])
    assert {r["op"] for r in data["rows"]} == {"fused_qkv_mlp_proj", "qk_norm_rope", "layernorm_modulate",
                                               "row_parallel_matmul"}
    fused = next(r for r in data["rows"] if r["op"] == "fused_qkv_mlp_proj")
    assert {"ours_ms", "eager_ms", "bare_gemm_ms", "ratio_to_bare_gemm", "tflops", "pct_peak"} <= set(fused)
    assert out.with_suffix(".md").exists() and "x eager" in stdout


def test_pytest_benchmark_entry_point():
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(BENCH),
                           "--benchmark-disable"], capture_output=True, text=True, timeout=600, cwd=BENCH)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "3 passed" in proc.stdout


def test_bench_overlap_dry_run(tmp_path):
    rows = _dry_run("bench_overlap.py", tmp_path / "overlap.json")[1]["rows"]
    assert {r["chunks"] for r in rows} >= {1, 2, 4}
    chunked = [r for r in rows if r["chunks"] > 1]
    assert all({"chunk_overhead_pct", "sequential_ms", "overlapped_ms", "exposed_comm", "ring_comm_ms_est"} <= set(r)
               for r in chunked)


def test_bench_overlap_distributed_dry_run(tmp_path):
    """The torchrun (multi-GPU) mode, on 2 gloo ranks."""
    rows = _dry_run("bench_overlap.py", tmp_path / "overlap-dist.json", distributed=True)[1]["rows"]
    assert rows and all(r["world_size"] == 2 and {"compute_ms", "sequential_ms", "overlapped_ms"} <= set(r)
                        for r in rows)


def test_bench_model_dry_run(tmp_path):
    rows = _dry_run("bench_model.py", tmp_path / "model.json")[1]["rows"]
    assert [r["impl"] for r in rows] == ["diffusers eager", "tpfuse (fused kernels)"]
    assert rows[1]["rel_err"] <= 1e-5  # the parallelized (TP 1) model computes what diffusers computes


def test_bench_model_distributed_dry_run(tmp_path):
    _, data = _dry_run("bench_model.py", tmp_path / "model-dist.json", distributed=True)
    assert data["rows"][0]["tp"] == 2
