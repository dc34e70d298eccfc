"""The registry of methods by name: the one table ``methods.register_method`` fills and a
config's ``method`` is checked against. A leaf module (it imports nothing of the package),
so that ``pcomp_jax.config`` can check names without importing the pipeline."""

from __future__ import annotations

REGISTRY: dict[str, object] = {}  # name -> methods.Method, in registration order


def method_names() -> tuple[str, ...]:
    """The names a config's ``method`` may take, in registration order."""
    return tuple(REGISTRY)
