"""Saving a document to a directory and loading it back, checked (``Document.save``,
``read_document(load=...)``): orbax for the arrays, a JSON record of the model, tokenizer
and reading config, and a SHA-256 checksum of every file and of the record
(``pcomp_jax.integrity``)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from ..checkpoints import Model
from ..chunking import PromptParts, encode_parts
from ..config import ParallelCompConfig, from_dict, to_dict
from ..errors import CheckpointError, PcompError
from ..integrity import atomic_directory, file_checksums, record_digest, verify_checksums, weights_digest
from ..prefill import to_host
from ..sharding import rules_for, shard, shard_weights
from .passes import ChunkCaches
from .reading import Document, check_same_reading, document_plan


DOCUMENT_RECORD = "pcomp_document.json"
DOCUMENT_FORMAT = 2  # the record's layout; 2: weights digest over every parameter, file checksums
RECORD_FIELDS = {"format": int, "fingerprint": dict, "config": dict, "has_breaks": bool, "files": dict,
                 "record_sha256": str}


def first_line(err: BaseException) -> str:
    """An exception's message, first line only (tensorstore's run over many lines)."""
    text = str(err).strip() or type(err).__name__
    return text.splitlines()[0]


def fingerprint(model: Model) -> dict:
    """What identifies the model and tokenizer a document was read with (JSON data): the
    model's config, dtype and ``integrity.weights_digest`` (every parameter), and the
    tokenizer's class, size and vocabulary."""
    tok = model.tokenizer
    vocab = hashlib.sha256(json.dumps(sorted(tok.get_vocab().items())).encode()).hexdigest()
    return {
        "model": {"config": json.loads(json.dumps(dataclasses.asdict(model.config))),
                  "dtype": jnp.dtype(model.dtype).name, "weights": weights_digest(model)},
        "tokenizer": {"class": type(tok).__name__, "size": len(tok), "vocabulary": vocab},
    }


def check_record(record, path: str) -> dict:
    """``record`` (as read from ``pcomp_document.json``) if it is a whole record of this
    format whose checksum holds; else ``CheckpointError`` naming what is wrong."""
    where = os.path.join(path, DOCUMENT_RECORD)
    if not isinstance(record, dict):
        raise CheckpointError(f"{where} is not a document record (a JSON object); read the document again")
    if record.get("format") != DOCUMENT_FORMAT:
        raise CheckpointError(f"{where} has format {record.get('format')!r}, not {DOCUMENT_FORMAT}: it was written by "
                              "another version of pcomp_jax; read the document again")
    for name, kind in RECORD_FIELDS.items():
        if not isinstance(record.get(name), kind):
            raise CheckpointError(f"{where} lacks a valid {name!r} field; read the document again")
    if not (record.get("num_groups") is None or type(record["num_groups"]) is int):
        raise CheckpointError(f"{where} lacks a valid 'num_groups' field; read the document again")
    if record_digest({k: v for k, v in record.items() if k != "record_sha256"}) != record["record_sha256"]:
        raise CheckpointError(f"{where} does not match its checksum (edited or damaged); read the document again")
    return record


def check_fingerprint(stored: dict, model: Model, path: str) -> None:
    """Refuses a stored document read with another model or tokenizer, naming what differs."""
    now = fingerprint(model)
    for what in ("model", "tokenizer"):
        a, b = stored.get(what), now[what]
        if not isinstance(a, dict) or (what == "model" and not isinstance(a.get("config"), dict)):
            raise CheckpointError(f"{os.path.join(path, DOCUMENT_RECORD)} lacks the {what}'s fingerprint; "
                                  "read the document again")
        a, b = dict(a), dict(b)
        if what == "model":
            a = {**a.pop("config"), **a}
            b = {**b.pop("config"), **b}
        diff = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
        if diff:
            raise PcompError(f"the document at {path!r} was read with another {what} ({', '.join(diff)} differ); "
                             f"read it again with this {what}")


def save_document(doc, path: str) -> None:
    """Writes ``doc`` (a ``Document``) to the directory ``path`` (must not exist yet) with orbax: its
    tokens, caches and a record of the model (a digest of every weight), tokenizer and
    reading config, with a SHA-256 checksum of every file and of the record. Written to a
    temporary sibling and renamed: a failed save leaves nothing behind (``CheckpointError``)."""
    import orbax.checkpoint as ocp

    tree = {"prefix": doc.parts.prefix, "context": doc.parts.context}
    if doc.parts.breaks is not None:
        tree["breaks"] = doc.parts.breaks
    if doc.groups is not None:
        tree["prefix_keys"], tree["prefix_values"] = to_host(doc.prefix_keys), to_host(doc.prefix_values)
        tree["groups"] = [{f.name: to_host(getattr(g, f.name)) for f in dataclasses.fields(ChunkCaches)
                           if f.name != "prefix_len"} for g in doc.groups]
    try:
        with atomic_directory(path) as temporary:
            checkpointer = ocp.StandardCheckpointer()
            checkpointer.save(os.path.join(temporary, "document"), tree)
            checkpointer.wait_until_finished()
            record = {"format": DOCUMENT_FORMAT, "fingerprint": fingerprint(doc.model),
                      "config": to_dict(doc.config), "has_breaks": doc.parts.breaks is not None,
                      "num_groups": None if doc.groups is None else len(doc.groups),
                      "files": file_checksums(os.path.join(temporary, "document"))}
            record["record_sha256"] = record_digest(record)
            with open(os.path.join(temporary, DOCUMENT_RECORD), "w", encoding="utf-8") as f:
                json.dump(record, f, indent=1)
    except PcompError:
        raise
    except Exception as err:  # OSError, a full disk, tensorstore's and orbax's own errors
        raise CheckpointError(f"cannot save the document to {os.path.abspath(path)!r}: "
                              f"{first_line(err)}") from err


def load_document(model: Model, path: str, config: ParallelCompConfig | None, context: str | None,
                  host: bool) -> Document:
    """A document written by ``Document.save``, checked against ``model``, ``config`` (None:
    the stored one) and (when given) ``context``, placed on ``config``'s devices."""
    import orbax.checkpoint as ocp

    path = os.path.abspath(path)
    if not os.path.isdir(path):
        raise CheckpointError(f"{path!r} is not a directory written by Document.save")
    try:
        with open(os.path.join(path, DOCUMENT_RECORD), encoding="utf-8") as f:
            record = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path!r} is not a document written by Document.save: {first_line(err)}") from err
    record = check_record(record, path)
    try:
        stored_config = from_dict(ParallelCompConfig, record["config"])
    except (PcompError, TypeError, KeyError) as err:
        raise CheckpointError(f"{os.path.join(path, DOCUMENT_RECORD)} holds no valid config: {first_line(err)}") from err
    check_fingerprint(record["fingerprint"], model, path)
    config = stored_config if config is None else config
    check_same_reading(stored_config, config, f"the document at {path!r}")
    plan_ = document_plan(model, config)
    verify_checksums(os.path.join(path, "document"), record["files"], f"the document at {path!r}")
    try:
        tree = ocp.StandardCheckpointer().restore(os.path.join(path, "document"))
        tree = jax.tree.map(np.asarray, tree)
    except Exception as err:  # checksums held, so this is an orbax or tensorstore failure of its own
        raise CheckpointError(f"the document at {path!r} cannot be read: {first_line(err)}") from err
    expected = {"prefix", "context"} | ({"breaks"} if record["has_breaks"] else set())
    if record["num_groups"] is not None:
        expected |= {"prefix_keys", "prefix_values", "groups"}
    if set(tree) != expected or len(tree.get("groups", ())) != (record["num_groups"] or 0):
        raise CheckpointError(f"the document at {path!r} does not hold what its record says; read it again")
    breaks = tree.get("breaks") if record["has_breaks"] else None
    parts = PromptParts(tree["prefix"].astype(np.int32), tree["context"].astype(np.int32), np.zeros(0, np.int32),
                        breaks)
    if context is not None:
        given = encode_parts(model.tokenizer, context, "?", config.instruction, config.answer_prefix, config.chat)
        if not np.array_equal(given.context, parts.context):
            raise PcompError(f"the document at {path!r} was read from another context; leave context out or "
                             "read this one with read_document(model, context, config)")
    bounds = plan_.chunk_bounds(parts)
    if record["num_groups"] is None:
        return Document(model, config, parts, None, None, None, bounds, model.params, host)
    mesh = plan_.mesh()
    weights = shard_weights(model.params, mesh, rules_for(model.config, mesh))
    prefix_len = len(parts.prefix)
    groups = [ChunkCaches(**tree["groups"][i], prefix_len=prefix_len) for i in range(record["num_groups"])]
    if not host:
        groups = [shard(g, mesh) for g in groups]
    return Document(model, config, parts, groups, tree["prefix_keys"], tree["prefix_values"], bounds, weights, host)
