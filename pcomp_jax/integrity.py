"""What makes saved state trustworthy: a digest of every weight, checksums of saved files,
and directories written whole or not at all.

- ``weights_digest(model)``: SHA-256 over every parameter (its path in the ``Weights``
  pytree, shape, dtype and bytes), computed once per loaded ``Model`` and cached on it.
- ``file_checksums(directory)`` / ``verify_checksums(directory, expected)``: SHA-256 of
  every file below a directory, and the check that names the first file that is
  missing, extra or changed.
- ``record_digest(record)``: SHA-256 of a JSON record's canonical form, stored beside it
  so that an edited or truncated record is caught.
- ``atomic_directory(path)``: a context manager that yields a temporary sibling directory
  and renames it to ``path`` only when the block succeeds; on failure nothing is left.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import uuid

import jax
import numpy as np

from .errors import CheckpointError

__all__ = ["atomic_directory", "file_checksums", "record_digest", "verify_checksums", "weights_digest"]

_CHUNK = 1 << 20


def _host_array(leaf) -> np.ndarray:
    """``leaf`` as one host array (gathered from every process when it spans several)."""
    if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(leaf, tiled=True))
    return np.asarray(leaf)


def weights_digest(model) -> str:
    """SHA-256 (hex) of every parameter of ``model.params`` with its pytree path, shape and
    dtype: any changed weight (a merged LoRA, another quantization) changes it. Cached on
    the ``Model`` object, so it is computed once per loaded model."""
    cached = getattr(model, "_weights_digest", None)
    if cached is not None and cached[0] is model.params:
        return cached[1]
    digest = hashlib.sha256()
    for path, leaf in jax.tree_util.tree_flatten_with_path(model.params)[0]:
        array = _host_array(leaf)
        digest.update(f"{jax.tree_util.keystr(path)}|{array.shape}|{array.dtype}\n".encode())
        digest.update(np.ascontiguousarray(array).tobytes())
    value = digest.hexdigest()
    object.__setattr__(model, "_weights_digest", (model.params, value))
    return value


def file_sha256(path: str) -> str:
    """SHA-256 of a file's bytes, read in blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def file_checksums(directory: str) -> dict[str, str]:
    """Relative path (``/``-separated) -> SHA-256 of every file below ``directory``."""
    sums = {}
    for root, _, files in os.walk(directory):
        for name in files:
            full = os.path.join(root, name)
            sums[os.path.relpath(full, directory).replace(os.sep, "/")] = file_sha256(full)
    return dict(sorted(sums.items()))


def verify_checksums(directory: str, expected: dict[str, str], what: str) -> None:
    """Raises ``CheckpointError`` naming the first file below ``directory`` that is missing,
    changed or not among ``expected`` (relative path -> SHA-256)."""
    for relative, checksum in expected.items():
        full = os.path.join(directory, *relative.split("/"))
        if not os.path.isfile(full):
            raise CheckpointError(f"{what} is damaged: {full} is missing; read the document again")
        if file_sha256(full) != checksum:
            raise CheckpointError(f"{what} is damaged: {full} does not match its checksum; read the document again")
    extra = sorted(set(file_checksums(directory)) - set(expected))
    if extra:
        raise CheckpointError(f"{what} is damaged: {os.path.join(directory, extra[0])} was not written with it; "
                              "read the document again")


def record_digest(record: dict) -> str:
    """SHA-256 of ``record``'s canonical JSON (sorted keys, no spaces)."""
    return hashlib.sha256(json.dumps(record, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


@contextlib.contextmanager
def atomic_directory(path: str):
    """Yields a new temporary directory beside ``path``; renames it to ``path`` when the block
    ends without error, else removes it. ``path`` must not exist (``CheckpointError``)."""
    path = os.path.abspath(path)
    if os.path.exists(path):
        raise CheckpointError(f"{path!r} already exists; choose a new directory so that nothing is overwritten")
    parent = os.path.dirname(path)
    temporary = os.path.join(parent, f".{os.path.basename(path)}.partial-{uuid.uuid4().hex[:8]}")
    try:
        os.makedirs(temporary)
    except OSError as err:
        raise CheckpointError(f"cannot write {path!r}: {err.strerror or err}") from err
    try:
        yield temporary
        os.rename(temporary, path)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
