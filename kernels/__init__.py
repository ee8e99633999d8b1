"""Fused Triton kernels (``tpfuse.kernels``), one op per module, each next to its plain-torch reference.

Dispatch happens per call in each launcher: CUDA tensors run Triton, CPU tensors run the reference;
``TPFUSE_BACKEND=torch|triton`` (or ``backend=``) forces one. ``record_backends()`` shows which ran.
"""

# A checkout root on sys.path (``python -m pytest`` or ``python -c`` run there) makes this folder importable as a bare
# ``kernels``: transformers and diffusers take it for Hugging Face's ``kernels`` package and import it to read its
# version, and it would register tpfuse's torch.library ops a second time under other module names (seen as a
# segfault in dynamo's fake-tensor tracing). Imported under any other name it defines nothing (no version: they
# then treat Hugging Face's kernels as unavailable).
if __name__ == "tpfuse.kernels":
    from ._dispatch import record_backends, select_backend
    from .fused_qkv_mlp_proj import fused_qkv_mlp_proj, fused_qkv_mlp_proj_reference
    from .layernorm_modulate import layernorm_modulate, layernorm_modulate_reference
    from .qk_norm_rope import qk_norm_rope, qk_norm_rope_joint, qk_norm_rope_joint_reference, qk_norm_rope_reference

__all__ = [
    "fused_qkv_mlp_proj",
    "fused_qkv_mlp_proj_reference",
    "layernorm_modulate",
    "layernorm_modulate_reference",
    "qk_norm_rope",
    "qk_norm_rope_joint",
    "qk_norm_rope_joint_reference",
    "qk_norm_rope_reference",
    "record_backends",
    "select_backend",
]
