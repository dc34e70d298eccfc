"""Attention-distribution statistics and plots (``python -m pcomp_jax.analyze``)."""

from .attention_stats import PATTERNS, attention_profiles, classify_layer, relative_position_bins

__all__ = ["PATTERNS", "attention_profiles", "classify_layer", "relative_position_bins"]
