"""Fused Triton kernels (``tpfuse.kernels``).

Empty for now: the fused QKV+MLP projection, QKNorm+RoPE, LayerNorm-modulation and the row-parallel matmul land
here, one op per file, each with its plain-torch reference. Nothing here imports triton at import time.
"""

__all__: list[str] = []
