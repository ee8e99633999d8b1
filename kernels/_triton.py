"""Import triton where it exists; elsewhere (no wheel for the platform) kernels are defined but never launched.

The stand-in makes ``@triton.jit`` the identity and ``tl.constexpr`` annotations harmless, so that
``tpfuse.kernels`` and the torch references import on any platform; :func:`select_backend` refuses the triton
backend there with a clear error.
"""

from __future__ import annotations

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised only where triton has no wheel
    HAS_TRITON = False

    class _Missing:
        def __getattr__(self, name):
            return self

        def __call__(self, *args, **kwargs):
            if len(args) == 1 and callable(args[0]) and not kwargs:
                return args[0]  # @triton.jit
            return self

    triton = tl = _Missing()

__all__ = ["triton", "tl", "HAS_TRITON"]
