"""examples/flux2_klein_tp.py runs offline on CPU ranks: diffusers' Flux2KleinPipeline with a tpfuse
tensor-parallel transformer, the same image on every rank."""

import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "flux2_klein_tp.py"


def test_example_random_weights_two_ranks(tmp_path):
    pytest.importorskip("transformers")  # diffusers' Flux2KleinPipeline needs it importable
    out = tmp_path / "image.png"
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           str(EXAMPLE), "--random-weights", "--preset", "tiny", "--out", str(out)],
                          capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "TP 2: (1, 3, 32, 32) image, identical on all ranks: True" in proc.stdout
    from PIL import Image

    assert Image.open(out).size == (32, 32)
