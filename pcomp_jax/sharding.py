"""Device meshes and the mapping from logical axis names to mesh axes.

Every pytree the pipeline moves (``Weights``, chunk ``Rows``, the ``ChunkSelection`` and
the ``KVCache``) declares the logical names of its arrays' axes next to their shapes
(``pcomp_jax.axes``). ``LOGICAL_RULES`` is the one place that says which logical axis goes
to which mesh axis; ``shardings(tree, mesh)`` reads them through flax's
``logical_to_mesh_sharding``, and ``shard(tree, mesh)`` places a tree accordingly. The
chunk axis of the prefill rows is split over the mesh axis ``chunk``; attention heads, KV
heads, the MLP width and the vocabulary over ``model`` (tensor parallelism); everything
else is replicated. Several hosts join through ``jax.distributed.initialize()`` before
``make_mesh`` is called; the same code then spans all of their devices.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from .axes import logical_axes
from .errors import ConfigError

CHUNK_AXIS = "chunk"
MODEL_AXIS = "model"

# (logical axis, mesh axis or None). The chunk rows are split over ``chunk`` (data
# parallelism over chunks); attention heads, KV heads (so the chunk caches, the selection
# and the decoding cache too), the MLP width and the vocabulary over ``model`` (tensor
# parallelism; XLA inserts the collectives). Everything else is replicated.
LOGICAL_RULES: tuple[tuple[str, str | None], ...] = (
    ("chunk", CHUNK_AXIS),  # chunk rows of one prefill group
    ("row", None),  # token slots of a chunk row
    ("question", None),  # the question tokens scored in every row
    ("kept_chunks", None),  # chunks of the running top-k selection
    ("kept_tokens", None),  # tokens kept per chunk, layer and KV head
    ("batch", None),  # decoding batch
    ("cache_slots", None),  # KV cache slots
    ("observed", None),  # the last queries kept for decode-time eviction
    ("layers", None),
    ("vocab", MODEL_AXIS),
    ("embed", None),
    ("q_heads", MODEL_AXIS),
    ("kv_heads", MODEL_AXIS),
    ("head_dim", None),
    ("mlp", MODEL_AXIS),
)


def make_mesh(num_devices: int | None = None, model_parallel: int = 1) -> Mesh:
    """A 2-D mesh ``(chunk, model)`` over the first ``num_devices`` devices (default: all,
    of every process): ``model_parallel`` devices on ``model``, the rest of the factor on
    ``chunk``."""
    devices = jax.devices()
    n = len(devices) if num_devices is None else num_devices
    if not 1 <= n <= len(devices):
        raise ConfigError(f"num_devices must be between 1 and {len(devices)} (the devices available), got {n}")
    if model_parallel < 1 or n % model_parallel:
        raise ConfigError(f"model_parallel={model_parallel} must divide the {n} devices used (num_devices)")
    left_out = sorted({d.process_index for d in devices} - {d.process_index for d in devices[:n]})
    if left_out:
        raise ConfigError(f"num_devices={n} leaves process(es) {left_out} without a device in the mesh; every "
                          f"process of the run must take part: use num_devices={len(devices)} (all) or fewer processes")
    return Mesh(np.asarray(devices[:n]).reshape(n // model_parallel, model_parallel), (CHUNK_AXIS, MODEL_AXIS))


def check_model_fits_mesh(cfg, mesh: Mesh) -> None:
    """Refuses a ``model`` axis that does not divide the model's query heads, KV heads and
    MLP width (what ``LOGICAL_RULES`` splits over it). cfg: a ``ModelConfig``."""
    size = mesh.shape[MODEL_AXIS]
    sizes = {"query heads": cfg.num_heads, "KV heads": cfg.num_kv_heads, "MLP width": cfg.intermediate_size}
    bad = [f"{n} {name}" for name, n in sizes.items() if n % size]
    if bad:
        raise ConfigError(f"model_parallel={size} must divide the model's query heads ({cfg.num_heads}), KV heads "
                          f"({cfg.num_kv_heads}) and MLP width ({cfg.intermediate_size}); {', '.join(bad)} do not; "
                          f"choose a divisor of {math.gcd(*sizes.values())}")


def rules_for(cfg, mesh: Mesh) -> tuple[tuple[str, str | None], ...]:
    """``LOGICAL_RULES`` for ``cfg`` on ``mesh``: the vocabulary stays whole (replicated) when
    the ``model`` axis does not divide it."""
    if cfg.vocab_size % mesh.shape[MODEL_AXIS] == 0:
        return LOGICAL_RULES
    return tuple((name, None if name == "vocab" else axis) for name, axis in LOGICAL_RULES)


def shardings(tree, mesh: Mesh, rules=LOGICAL_RULES):
    """A ``tree``-shaped pytree of ``NamedSharding``, from each array's declared logical axes."""
    return jax.tree.map(
        lambda spec: nn.logical_to_mesh_sharding(spec, mesh, rules),
        logical_axes(tree),
        is_leaf=lambda x: isinstance(x, PartitionSpec),
    )


def shard(tree, mesh: Mesh, rules=LOGICAL_RULES):
    """Places ``tree`` (weights, rows, a selection, a cache) on ``mesh`` according to ``rules``.

    When ``mesh`` spans several processes, each process gives only the part of every array
    its own devices hold (``jax.make_array_from_process_local_data``): its share of the
    chunk rows, a full copy of what is replicated. Every process passes the same ``tree``."""
    targets = shardings(tree, mesh, rules)
    if jax.process_count() == 1:
        return jax.device_put(tree, targets)
    return jax.tree.map(_place_on, tree, targets)


def _place_on(value, sharding: NamedSharding):
    """One leaf onto ``sharding`` across processes: a global array already there as it is,
    another global array resharded, host data from this process's share."""
    if isinstance(value, jax.Array) and not value.is_fully_addressable:
        return value if value.sharding == sharding else jax.device_put(value, sharding)
    return _place_local_share(value, sharding)


def _place_local_share(value, sharding: NamedSharding):
    """The global array of ``sharding`` from this process's slice of ``value`` (the whole
    value, the same on every process)."""
    value = np.asarray(value)
    indices = list(sharding.addressable_devices_indices_map(value.shape).values())
    local = tuple(
        slice(min(ix[d].start or 0 for ix in indices), max(value.shape[d] if ix[d].stop is None else ix[d].stop
                                                            for ix in indices))
        for d in range(value.ndim)
    )
    return jax.make_array_from_process_local_data(sharding, value[local], value.shape)


def shard_weights(weights, mesh: Mesh, rules=LOGICAL_RULES):
    """Places ``weights`` on ``mesh`` according to ``rules``."""
    return shard(weights, mesh, rules)


def chunk_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
    """Sharding of a bare array whose leading axis is the chunk axis (other axes replicated)."""
    return NamedSharding(mesh, PartitionSpec(CHUNK_AXIS, *([None] * (ndim - 1))))
