"""Hand-written kernels (Pallas)."""
