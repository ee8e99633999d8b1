"""examples/flux2_pipeline.py runs offline on CPU ranks: diffusers' Flux2Pipeline / Flux2KleinPipeline, tiny and
random, with the transformer, the text encoder and the VAE placed by tpfuse; the same image on every rank."""

import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "flux2_pipeline.py"


@pytest.mark.parametrize("kind,ranks,mesh,shown", [("klein", 2, None, "tp2"), ("dev", 4, "sp2xtp2", "sp2xtp2")])
def test_example_random_weights(tmp_path, kind, ranks, mesh, shown):
    pytest.importorskip("transformers")  # diffusers' FLUX.2 pipelines need it importable
    out = tmp_path / "image.png"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ranks),
           str(EXAMPLE), "--random-weights", "--kind", kind, "--out", str(out)] + (["--mesh", mesh] if mesh else [])
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"{shown} on {ranks} ranks: (1, 3, 32, 32) image, identical on all ranks: True" in proc.stdout
    assert f"text encoder: sharded over {ranks} ranks" in proc.stdout
    from PIL import Image

    assert Image.open(out).size == (32, 32)
