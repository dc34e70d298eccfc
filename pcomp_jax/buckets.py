"""Static-shape buckets: lengths are rounded up so that compilations stay few."""

from __future__ import annotations

from .errors import PcompError

STEPS_PER_OCTAVE = 8  # bucket sizes between 2^k and 2^(k+1) are multiples of 2^k / 8


def bucket_length(n: int, minimum: int = 64) -> int:
    """Rounds ``n`` up to a bucket: ``minimum`` or more, a power of two up to ``8 * minimum``
    and beyond that a multiple of ``2^k / 8`` (``2^k <= n``), so padding wastes at most 12.5%
    while the number of buckets still grows as ``log(n)``."""
    if n < 0:
        raise PcompError(f"length must be >= 0, got {n}")
    size = minimum
    while size < n and size < STEPS_PER_OCTAVE * minimum:
        size *= 2
    if size >= n:
        return size
    step = 1 << (n.bit_length() - 1)  # largest power of two <= n
    step //= STEPS_PER_OCTAVE
    return -(-n // step) * step
