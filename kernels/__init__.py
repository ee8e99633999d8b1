"""Fused Triton kernels (``tpfuse.kernels``), one op per module, each next to its plain-torch reference.

Dispatch happens per call in each launcher: CUDA tensors run Triton, CPU tensors run the reference;
``TPFUSE_BACKEND=torch|triton`` (or ``backend=``) forces one. ``record_backends()`` shows which ran.

This folder is only ever ``tpfuse.kernels``. A checkout root on ``sys.path`` (``python``, ``python -c``/``-m``,
``python -m pytest`` or a notebook started there) also makes it importable as a bare ``kernels``, the name of
Hugging Face's package, which transformers, diffusers and peft import (``from kernels import CUDAProperties``).
Imported as ``kernels``, it hands over: it loads the installed ``kernels`` package found on ``sys.path`` without
the checkout root and leaves that in ``sys.modules["kernels"]``, so ``import kernels``, its submodules and
``importlib.metadata`` all see the real package. Without one installed it stays an empty module: no attributes,
no submodules, no ``__version__`` (transformers' and diffusers' ``is_kernels_available()`` are then False, as in
an environment without the checkout; ``from kernels import get_kernel`` raises ImportError). It does not raise
ModuleNotFoundError there because transformers, having found the folder with ``importlib.util.find_spec``, imports
it unguarded to read its version (``transformers.modeling_utils`` would fail to import). Under any other name it
raises ModuleNotFoundError. It never imports tpfuse's own modules under another name: a second copy would register
tpfuse's ``torch.library`` ops twice (a segfault in dynamo's fake-tensor tracing).
"""

from __future__ import annotations

if __name__ == "tpfuse.kernels":
    from ._dispatch import record_backends, select_backend
    from .fused_linear_act import fused_linear_act, fused_linear_act_reference
    from .fused_qkv_mlp_proj import fused_qkv_mlp_proj, fused_qkv_mlp_proj_reference
    from .joint_qkv_proj import joint_qkv_proj, joint_qkv_proj_reference
    from .layernorm_modulate import layernorm_modulate, layernorm_modulate_reference
    from .qk_norm_rope import qk_norm_rope, qk_norm_rope_joint, qk_norm_rope_joint_reference, qk_norm_rope_reference

    __all__ = [
        "fused_linear_act",
        "fused_linear_act_reference",
        "fused_qkv_mlp_proj",
        "fused_qkv_mlp_proj_reference",
        "joint_qkv_proj",
        "joint_qkv_proj_reference",
        "layernorm_modulate",
        "layernorm_modulate_reference",
        "qk_norm_rope",
        "qk_norm_rope_joint",
        "qk_norm_rope_joint_reference",
        "qk_norm_rope_reference",
        "record_backends",
        "select_backend",
    ]
else:
    import os as _os

    _HERE = _os.path.dirname(_os.path.abspath(__file__))

    def _installed_spec(name: str):
        """The spec of the installed package ``name``, found by every finder but with the checkout root left out of
        the path finder's search (None if there is none)."""
        import importlib.machinery
        import sys

        def is_tpfuse(folder: str) -> bool:
            # This folder, or another tpfuse checkout's (two checkouts on the path): handing over to that one would
            # hand back to this one, forever.
            return all(_os.path.isfile(_os.path.join(folder, f)) for f in ("__init__.py", "_dispatch.py",
                                                                             "qk_norm_rope.py"))

        def offers_tpfuse(entry) -> bool:
            try:
                return is_tpfuse(_os.path.join(_os.fspath(entry) or _os.getcwd(), name))
            except (OSError, TypeError, ValueError):
                return False

        path = [entry for entry in sys.path if not offers_tpfuse(entry)]
        for finder in sys.meta_path:
            # Not just the path finder: an editable install of the real package is found by its own finder.
            find_spec = getattr(finder, "find_spec", None)
            if find_spec is None:
                continue
            spec = find_spec(name, path) if finder is importlib.machinery.PathFinder else find_spec(name, None)
            if spec is not None and not (spec.origin and is_tpfuse(_os.path.dirname(_os.path.abspath(spec.origin)))):
                return spec
        return None

    def _hand_over(name: str) -> bool:
        """Execute the installed package ``name`` in this module's place in ``sys.modules``; False if there is none."""
        import importlib.util
        import sys

        spec = _installed_spec(name)
        if spec is None:
            return False
        module = importlib.util.module_from_spec(spec)
        # The import system returns whatever sys.modules[name] holds once this file has run (and drops it if this
        # file raises): the real package, as if this folder had not been on the path. ``_initializing`` is what the
        # import system sets while it executes a module: another thread importing ``kernels`` meanwhile waits for it
        # instead of taking the half-executed package.
        spec._initializing = True
        sys.modules[name] = module
        try:
            spec.loader.exec_module(module)
        finally:
            spec._initializing = False
        return True

    if __name__ != "kernels":
        raise ModuleNotFoundError(f"No module named {__name__!r}: {_HERE} is the package tpfuse.kernels, import it "
                                  "under that name", name=__name__)
    if not _hand_over(__name__):
        # No installed ``kernels``: an empty module (see the module docstring for why not ModuleNotFoundError). No
        # submodule search path, so ``import kernels.<x>`` cannot load tpfuse's files under the wrong name.
        __path__ = []
        __all__ = []

        def __getattr__(attr: str, _here=_HERE):
            if attr.startswith("__"):
                raise AttributeError(f"module 'kernels' has no attribute {attr!r}")
            raise AttributeError(f"module 'kernels' has no attribute {attr!r}: Hugging Face's kernels package is not "
                                 f"installed, and {_here} is tpfuse's source folder (tpfuse.kernels), found as "
                                 "'kernels' because the checkout root is on sys.path")

        del _os, _HERE, _installed_spec, _hand_over  # nothing of the hand-over machinery is left to import
