"""CUDA C++ sources (``*.cu``), shipped as package data; built and loaded by :mod:`tpfuse.kernels.cuda_backend`."""
