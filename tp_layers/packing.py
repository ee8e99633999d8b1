"""Several diffusers linears read as one packed weight, without changing their parameters.

A fused projection (``fused_qkv_mlp_proj``) wants one ``[Q | K | V | gate | up]`` weight, but a drop-in layer must
keep diffusers' separate ``to_q``/``to_k``/``to_v``/``ff.linear_in`` parameters (names, LoRA, hooks, optimizers).
:func:`share_rows` makes their weights consecutive row ranges of one tensor (each Parameter object is kept; only its
``.data`` moves), so that :func:`packed_rows` is a zero-copy view in inference. With gradients it is a ``torch.cat``
(autograd splits the gradient back to each parameter; a transient copy of this rank's packed shard, training only).
Anything that moves a weight (``model.to(...)``, a loader assigning new tensors) breaks the adjacency; the next
inference call packs again (one copy), training calls never need it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["packed_rows", "share_rows"]


def _consecutive(ws: Sequence[torch.Tensor]) -> bool:
    first = ws[0]
    if first.dim() != 2 or not first.is_contiguous():
        return False
    ptr = first.untyped_storage().data_ptr()
    offset = first.storage_offset()
    for w in ws:
        if (w.dim() != 2 or not w.is_contiguous() or w.shape[1] != first.shape[1] or w.dtype != first.dtype
                or w.device != first.device or w.untyped_storage().data_ptr() != ptr or w.storage_offset() != offset):
            return False
        offset += w.numel()
    return True


def share_rows(layers: Sequence[nn.Module]) -> bool:
    """Make the layers' weights consecutive rows of one new tensor (each Parameter kept, its ``.data`` replaced);
    False (nothing done) for ``meta`` weights or weights of different dtypes/devices/widths."""
    ws = [layer.weight for layer in layers]
    first = ws[0]
    if any(w.device.type == "meta" or w.dim() != 2 or w.shape[1] != first.shape[1] or w.dtype != first.dtype
           or w.device != first.device for w in ws):
        return False
    if _consecutive(ws):
        return True
    # Not inference tensors (an inference_mode forward may be what re-packs): the parameters stay usable for
    # training afterwards.
    with torch.no_grad(), torch.inference_mode(False):
        packed = torch.cat([w.detach() for w in ws], dim=0)
        row = 0
        for w in ws:
            w.data = packed[row:row + w.shape[0]]
            row += w.shape[0]
    return True


def packed_rows(layers: Sequence[nn.Module]) -> torch.Tensor:
    """``cat([layer.weight for layer in layers], dim=0)``: a view of the shared storage in inference (see
    :func:`share_rows`), a differentiable ``torch.cat`` when a weight needs its gradient or under compilation."""
    ws = [layer.weight for layer in layers]
    if torch.compiler.is_compiling() or (torch.is_grad_enabled() and any(w.requires_grad for w in ws)):
        return torch.cat(ws, dim=0)
    if not _consecutive(ws) and not share_rows(layers):
        return torch.cat(ws, dim=0)
    first = ws[0]
    rows = sum(w.shape[0] for w in ws)
    return first.detach().as_strided((rows, first.shape[1]), (first.shape[1], 1), first.storage_offset())
