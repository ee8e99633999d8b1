"""The source folder ``kernels/`` must not shadow Hugging Face's ``kernels`` package.

A Python started in the checkout root (``python -c``, ``python -m``, a notebook) has the root on ``sys.path``, so
``import kernels`` (transformers, diffusers and peft import it) finds tpfuse's folder first. Each case runs in a
fresh interpreter with cwd = the checkout root, as a user would.
"""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Checks shared by both environments: diffusers' FLUX.2 model, transformers (whose modeling_utils probes kernels at
# import time) and peft import; tpfuse.kernels works in the same process with its ops registered; no ``kernels.*``
# module was loaded from the checkout's folder (tpfuse's ops would be registered twice).
_COMMON = """
import os, sys
import diffusers.models.transformers.transformer_flux2
from diffusers import Flux2Transformer2DModel
import transformers, transformers.modeling_utils, peft
import tpfuse.kernels, torch
torch.ops.tpfuse.layernorm_modulate.default
assert callable(tpfuse.kernels.qk_norm_rope)
here = os.path.join(os.getcwd(), "kernels")
from_checkout = [n for n, m in sys.modules.items() if n.startswith("kernels.")
                 and (getattr(m, "__file__", None) or "").startswith(here + os.sep)]
assert not from_checkout, from_checkout
from transformers.utils import is_kernels_available as tf_available
from diffusers.utils import is_kernels_available as df_available
"""


def _run(code: str) -> str:
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stdout


def _hf_kernels_dir() -> Path:
    try:
        dist = importlib.metadata.distribution("kernels")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("Hugging Face's kernels package is not installed")
    return Path(dist.locate_file("")).resolve()


# "": how ``python -c`` and a notebook see the cwd; the absolute root: how ``python -m`` sees it, here with a second
# tpfuse checkout on the path too (``PYTHONPATH`` naming another copy), which once handed back and forth forever.
@pytest.mark.parametrize("entry", ["", "absolute"])
def test_checkout_root_hands_kernels_over_to_hugging_face(entry, tmp_path):
    site = _hf_kernels_dir()
    shutil.copytree(ROOT / "kernels", tmp_path / "kernels", ignore=shutil.ignore_patterns("__pycache__"))
    setup = (f"import os, sys; sys.path[0] = os.getcwd(); sys.path.insert(1, {str(tmp_path)!r})\n"
             if entry == "absolute" else "")
    out = _run(setup + _COMMON + """
import importlib.metadata, importlib.util
import kernels
from kernels import CUDAProperties, get_kernel
import kernels._internals.layer
print(kernels.__file__)
assert importlib.util.find_spec("kernels").origin == kernels.__file__
assert sys.modules["kernels._internals.layer"].__file__.startswith(os.path.dirname(kernels.__file__))
assert kernels.__version__ == importlib.metadata.version("kernels")
assert tf_available() and df_available()
""")
    assert Path(out.strip().splitlines()[-1]).resolve() == site / "kernels" / "__init__.py"


def test_checkout_root_without_hugging_face_kernels(tmp_path):
    """Hugging Face's package hidden: the environment is a copy of site-packages (links) without it or its metadata.

    transformers finds the folder with ``find_spec`` and imports it unguarded to read a version, so the bare import
    succeeds with an empty module; transformers and diffusers report kernels unavailable, and nothing can be
    imported from it, tpfuse's files least of all."""
    site = _hf_kernels_dir()
    out = _run(f"""
import os, site, sys
real = {str(site)!r}
view = {str(tmp_path)!r}
for name in os.listdir(real):
    if name != "kernels" and not (name.startswith("kernels-") and name.endswith(".dist-info")):
        os.symlink(os.path.join(real, name), os.path.join(view, name))
sys.path[:] = [p for p in sys.path if not (p and os.path.exists(p) and os.path.samefile(p, real))]
site.addsitedir(view)
import importlib.metadata
try:
    importlib.metadata.version("kernels")
    raise AssertionError("the kernels distribution is still visible")
except importlib.metadata.PackageNotFoundError:
    pass
""" + _COMMON + """
assert not tf_available() and not df_available()
import kernels
assert not hasattr(kernels, "__version__")
for stmt in ["from kernels import get_kernel", "import kernels._rope", "from kernels import qk_norm_rope"]:
    try:
        exec(stmt)
    except ImportError:
        continue
    raise AssertionError(stmt + " succeeded")
try:
    kernels.get_kernel
    raise AssertionError("kernels.get_kernel exists")
except AttributeError as e:
    assert "not installed" in str(e) and "tpfuse.kernels" in str(e), e
print("ok")
""")
    assert out.strip().endswith("ok")


def test_folder_under_another_dotted_name_is_not_found():
    """With the checkout's parent on sys.path the folder is also ``<checkout>.kernels``: refused, naming the right
    name, before any of tpfuse's modules runs under it."""
    _run(f"""
import importlib, sys
sys.path.insert(0, {str(ROOT.parent)!r})
try:
    importlib.import_module({ROOT.name + ".kernels"!r})
    raise AssertionError("imported")
except ModuleNotFoundError as e:
    assert "tpfuse.kernels" in str(e), e
assert not [m for m in sys.modules if "_rope" in m or "qk_norm_rope" in m], sorted(sys.modules)
""")
