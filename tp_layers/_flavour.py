"""Classes that are tpfuse's tensor-parallel modules AND the diffusers classes they replace.

``flavour(tp_cls, dense_cls, module)`` returns ``class <tp_cls.__name__>(tp_cls, dense_cls)``: tpfuse's methods come
first in the MRO, ``isinstance(x, dense_cls)`` holds, and ``__name__`` stays ``tp_cls``'s (what
``_repeated_blocks`` and config ``_class_name`` read). Each gets a unique ``__qualname__`` that encodes both bases,
resolved by the owning module's ``__getattr__`` (:func:`resolve`), so instances pickle (``torch.save``) and
unpickle in a fresh process.
"""

from __future__ import annotations

import importlib

__all__ = ["flavour", "resolve"]

_SEP, _DOT = "__", "_dot_"
_CACHE: dict[tuple[type, type], type] = {}


def flavour(tp_cls: type, dense_cls: type, module: str, namespace: dict | None = None, on_create=None,
            name: str | None = None) -> type:
    key = (tp_cls, dense_cls)
    cls = _CACHE.get(key)
    if cls is None:
        qualname = _SEP.join([tp_cls.__name__, dense_cls.__module__.replace(".", _DOT), dense_cls.__name__])
        attrs = {"__module__": module, "__qualname__": qualname, "__doc__": tp_cls.__doc__, **(namespace or {})}
        cls = type(name or tp_cls.__name__, (tp_cls, dense_cls), attrs)
        if on_create is not None:
            on_create(cls, dense_cls)
        _CACHE[key] = cls
    return cls


def resolve(qualname: str, bases: dict[str, type], make) -> type:
    """The flavour a ``__qualname__`` names (``make(tp_cls, dense_cls)`` builds it); AttributeError otherwise."""
    parts = qualname.split(_SEP)
    if len(parts) != 3 or parts[0] not in bases:
        raise AttributeError(qualname)
    try:
        dense_cls = getattr(importlib.import_module(parts[1].replace(_DOT, ".")), parts[2])
    except (ImportError, AttributeError) as exc:
        raise AttributeError(qualname) from exc
    return make(bases[parts[0]], dense_cls)
