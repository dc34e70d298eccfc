"""Host-side surgery on groups of a document's rows (pytrees with a ``chunk`` axis): taking
chosen rows out of several groups, narrowing, joining the rows of several groups into one."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from ..axes import axis_positions
from .passes import ChunkCaches


def take_rows(groups: list, picks: np.ndarray):
    """Rows ``picks`` (numbered across ``groups``, every group the same size) of a list of
    pytrees with a ``chunk`` axis (``ChunkCaches``, ``QuestionPass``), as one such pytree."""
    axes = axis_positions(groups[0], "chunk")
    per = next(x.shape[axis] for x, axis in zip(jax.tree.leaves(groups[0]), jax.tree.leaves(axes)))
    rows = [jax.tree.map(lambda x, axis: x[(slice(None),) * axis + (slice(r % per, r % per + 1),)],
                         groups[r // per], axes) for r in picks]
    xp = np if isinstance(jax.tree.leaves(groups[0])[0], np.ndarray) else jnp
    if xp is jnp:
        # Wait for the programs that made the rows (sharded, with collectives) before the eager
        # concatenate dispatches its own: on the CPU two programs with collectives in flight at
        # once can deadlock (each device's thread joins another program's all-reduce first).
        jax.block_until_ready(rows)
    return jax.tree.map(lambda axis, *xs: xp.concatenate(xs, axis=axis), axes, *rows)


def narrowed(caches: ChunkCaches, width: int) -> ChunkCaches:
    """``caches`` with keys and values cut to the first ``width`` row slots (unchanged when
    that is all of them)."""
    if caches.keys.shape[2] == width:
        return caches
    return caches.replace(keys=caches.keys[:, :, :width], values=caches.values[:, :, :width])


def join_rows(groups: list[ChunkCaches], start: int, stop: int, size: int, width: int) -> ChunkCaches:
    """Rows ``start .. stop - 1`` of ``groups`` (numbered across them, every group the same
    size) as one group of ``size`` rows, followed by empty ones (zero caches, chunk ids
    continuing theirs), keys and values cut to ``width`` row slots. NumPy for host caches."""
    per = groups[0].chunk_ids.shape[0]
    axes = axis_positions(groups[0], "chunk")
    pieces = []
    for g in range(start // per, (stop - 1) // per + 1):
        lo, hi = max(start - g * per, 0), min(stop - g * per, per)
        cut = lambda x, axis: x[(slice(None),) * axis + (slice(lo, hi),)]
        pieces.append(narrowed(jax.tree.map(cut, groups[g], axes), width))
    first = pieces[0]
    count, next_id = size - (stop - start), int(pieces[-1].chunk_ids[-1]) + 1
    empty = jax.tree.map(lambda x, axis: np.zeros(x.shape[:axis] + (count,) + x.shape[axis + 1:], x.dtype), first, axes)
    pieces.append(empty.replace(chunk_ids=np.arange(next_id, next_id + count, dtype=first.chunk_ids.dtype)))
    xp = np if isinstance(first.keys, np.ndarray) else jnp
    return jax.tree.map(lambda axis, *xs: xp.concatenate(xs, axis=axis), axes, *pieces)
