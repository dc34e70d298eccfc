"""Static-shape buckets: lengths are rounded up so that compilations stay few."""

from __future__ import annotations


def bucket_length(n: int, minimum: int = 64) -> int:
    """Smallest power of two >= max(n, minimum). The number of buckets grows as log(n)."""
    if n < 0:
        raise ValueError(f"length must be >= 0, got {n}")
    size = minimum
    while size < n:
        size *= 2
    return size
