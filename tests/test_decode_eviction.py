"""Decode-time eviction, one step by hand (the whole decode is checked against the NumPy
reference in test_against_reference.py): which entry goes, and when none can."""

import pytest
import jax.numpy as jnp
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from pcomp_jax.cache import KVCache
from pcomp_jax.compress import SnapKV
from pcomp_jax.decode import DecodeEviction


def make_cache(valid: np.ndarray, window: np.ndarray) -> KVCache:
    """valid [S, KVH] bool; window [KVH, w, S] for one layer and one batch row."""
    s, kvh = valid.shape
    zeros = jnp.zeros((1, 1, s, kvh, 2))
    end = int(np.flatnonzero(valid.any(axis=1)).max()) + 1
    return KVCache(zeros, zeros, jnp.asarray(valid)[None, None], jnp.array([end], jnp.int32),
                   jnp.asarray(window, jnp.float32)[None, None])


@pytest.mark.slow
@settings(max_examples=25, deadline=None)
@given(st.data())
def test_one_step_drops_the_lowest_older_entry_per_head(data):
    # a few cache lengths and windows (each shape compiles once), every held/dropped pattern and score
    s, kvh, w = data.draw(st.sampled_from([4, 11, 24])), data.draw(st.integers(1, 3)), data.draw(st.sampled_from([1, 3, 6]))
    valid = np.array(data.draw(st.lists(st.lists(st.booleans(), min_size=kvh, max_size=kvh), min_size=s, max_size=s)))
    valid[-1] = True  # the newest token
    # (no subnormals: XLA on the CPU flushes them to zero, which makes ties NumPy does not see)
    window = np.array(data.draw(st.lists(st.floats(0, 1, width=32, allow_subnormal=False), min_size=kvh * w * s, max_size=kvh * w * s)),
                      np.float32).reshape(kvh, w, s)
    after = np.asarray(DecodeEviction(SnapKV(obs_window=w, pool_kernel=1)).evict_one(make_cache(valid, window)).valid[0, 0])
    for g in range(kvh):
        held = np.flatnonzero(valid[:, g])
        older = held[: max(0, len(held) - w)]
        dropped = np.flatnonzero(valid[:, g] & ~after[:, g])
        assert not (after[:, g] & ~valid[:, g]).any()  # nothing comes back
        if len(older) == 0:
            assert len(dropped) == 0  # only the newest w are held: nothing can go
        else:
            scores = window[g].sum(axis=0)[older]
            assert dropped.tolist() == [older[int(np.argmin(scores))]]  # the lowest; the earliest on ties


def test_pooling_is_over_the_held_entries_in_order():
    """Max-pooling with kernel 3 over held entries only: a low entry next to a high one is
    kept; the lowest pooled one goes, gaps between held slots do not count."""
    valid = np.array([[1], [0], [1], [1], [0], [1], [1], [1], [1], [1]], bool)  # held: 0 2 3 5 6 7 8 9
    scores = np.array([0.1, 9.0, 0.9, 0.2, 9.0, 0.3, 0.5, 0.6, 0.7, 0.8], np.float32)
    window = scores[None, None, :]  # one KV head, one observed query
    after = DecodeEviction(SnapKV(obs_window=2, pool_kernel=3)).evict_one(make_cache(valid, window)).valid[0, 0, :, 0]
    # older held entries 0 2 3 5 6 7 with scores .1 .9 .2 .3 .5 .6: pooled .9 .9 .9 .5 .6 .6 -> slot 5 goes
    assert np.flatnonzero(valid[:, 0] & ~np.asarray(after)).tolist() == [5]
