"""Attention kernels written with Pallas, and the constants they share with ``pcomp_jax.attention``."""

NEG_INF = -1e30  # a masked score: finite, so that a fully masked row gives zeros rather than NaN
