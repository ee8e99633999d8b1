"""Test-session setup.

Without a GPU, Triton kernels run in the interpreter: ``TRITON_INTERPRET=1`` must be set before triton is
imported (torch does not import it), and the rank processes inherit it. fp32 only there: bf16 arithmetic and
``tl.dot`` on bf16 are wrong in the interpreter.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# The suite pins backends explicitly where it matters; an inherited TPFUSE_BACKEND would change the defaults.
os.environ.pop("TPFUSE_BACKEND", None)
