"""Logical axis names declared next to the arrays of a pytree.

A field made with ``axes_field("layers", "embed")`` records the names of its array's
axes in the field's metadata; ``logical_axes(tree)`` turns a ``flax.struct`` dataclass
(nested ones too) into the same tree of ``PartitionSpec``s of those names, which
``pcomp_jax.sharding`` maps to mesh axes with one set of rules. Weights, chunk rows, the
chunk selection and the KV cache all declare their axes this way.
"""

from __future__ import annotations

import dataclasses

import flax.struct
from jax.sharding import PartitionSpec


def axes_field(*names: str | None, optional: bool = False):
    """A pytree field whose array has axes ``names`` (one per dimension); ``optional``:
    the field defaults to None (no array)."""
    if optional:
        return flax.struct.field(default=None, metadata={"axes": names})
    return flax.struct.field(metadata={"axes": names})


def static_field():
    """A field that is part of the tree's structure (hashable metadata), not an array leaf."""
    return flax.struct.field(pytree_node=False)


def logical_axes(tree):
    """``tree`` with each array replaced by the ``PartitionSpec`` of its declared axis names
    (None where the field is None); nested dataclasses are walked, static fields kept."""
    out = {}
    for f in dataclasses.fields(tree):
        value = getattr(tree, f.name)
        if not f.metadata.get("pytree_node", True):
            continue
        if dataclasses.is_dataclass(value):
            out[f.name] = logical_axes(value)
        elif value is not None:
            out[f.name] = PartitionSpec(*f.metadata["axes"])
    return tree.replace(**out)


def axis_positions(tree, name: str):
    """``tree`` with each array field replaced by the position of axis ``name`` among its
    declared axes (static fields kept, None fields left None): where to cut or join every
    array of it along ``name``."""
    return tree.replace(**{f.name: None if getattr(tree, f.name) is None else f.metadata["axes"].index(name)
                           for f in dataclasses.fields(tree) if f.metadata.get("pytree_node", True)})
