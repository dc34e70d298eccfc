"""Device meshes and the mapping from logical axis names to mesh axes.

The chunk axis (the leading batch axis of prefill rows) is sharded over the mesh axis
``chunk``. Weights are replicated by default; ``LOGICAL_RULES`` is the one place
that says which logical axis goes to which mesh axis, read by flax's
``logical_to_mesh_sharding``. Several hosts join through ``jax.distributed.initialize()``
before ``make_mesh`` is called; the same code then spans all of their devices.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from .errors import ConfigError
from .model.llama import Weights, logical_axes

CHUNK_AXIS = "chunk"

# (logical axis, mesh axis or None). Weights are replicated; activations' batch axis
# ("chunk") is split across devices.
LOGICAL_RULES: tuple[tuple[str, str | None], ...] = (
    ("chunk", CHUNK_AXIS),
    ("layers", None),
    ("vocab", None),
    ("embed", None),
    ("q_heads", None),
    ("kv_heads", None),
    ("head_dim", None),
    ("mlp", None),
)


def make_mesh(num_devices: int | None = None) -> Mesh:
    """A 1-D mesh with axis ``chunk`` over the first ``num_devices`` devices (default: all)."""
    devices = jax.devices()
    n = len(devices) if num_devices is None else num_devices
    if not 1 <= n <= len(devices):
        raise ConfigError(f"num_devices must be between 1 and {len(devices)} (the devices available), got {n}")
    return Mesh(np.asarray(devices[:n]), (CHUNK_AXIS,))


def weight_shardings(weights: Weights, mesh: Mesh, rules=LOGICAL_RULES) -> Weights:
    """A ``Weights``-shaped pytree of ``NamedSharding`` from each array's logical axes."""
    specs = logical_axes(weights)
    return jax.tree.map(
        lambda spec: nn.logical_to_mesh_sharding(spec, mesh, rules),
        specs,
        is_leaf=lambda x: isinstance(x, PartitionSpec),
    )


def shard_weights(weights: Weights, mesh: Mesh, rules=LOGICAL_RULES) -> Weights:
    """Places ``weights`` on ``mesh`` according to ``rules``."""
    return jax.device_put(weights, weight_shardings(weights, mesh, rules))


def chunk_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
    """Sharding of an array whose leading axis is the chunk axis (other axes replicated)."""
    return NamedSharding(mesh, PartitionSpec(CHUNK_AXIS, *([None] * (ndim - 1))))
