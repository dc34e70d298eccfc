"""A saved document is trusted only when every file and the record hold their checksums, and
only by a model whose every weight is the one it was read with; saves are atomic."""

import dataclasses
import json
import os

import numpy as np
import pytest
from test_document import BASE, CONTEXT, QUESTIONS

import pcomp_jax
from pcomp_jax import read_document
from pcomp_jax.document import DOCUMENT_RECORD
from pcomp_jax.integrity import record_digest, weights_digest


@pytest.fixture(scope="module")
def model(hf_checkpoints):
    return pcomp_jax.load_model(hf_checkpoints("llama_gqa_untied")[0])


@pytest.fixture(scope="module")
def saved(model, tmp_path_factory):
    """A host document saved once; each test copies it before damaging it."""
    path = tmp_path_factory.mktemp("saved") / "doc"
    read_document(model, CONTEXT, BASE, host=True).save(str(path))
    return path


@pytest.fixture
def copy_of(saved, tmp_path):
    import shutil

    target = tmp_path / "doc"
    shutil.copytree(saved, target)
    return target


def largest_array_file(path) -> str:
    files = [os.path.join(root, name) for root, _, names in os.walk(path / "document") for name in names]
    return max(files, key=os.path.getsize)


def load(model, path):
    return read_document(model, config=BASE, load=str(path))


def test_an_intact_copy_loads_and_answers(model, copy_of):
    assert load(model, copy_of).ask(QUESTIONS[0], 4).text == read_document(model, CONTEXT, BASE).ask(
        QUESTIONS[0], 4).text


def test_overwritten_bytes_in_an_array_file_are_refused_naming_it(model, copy_of):
    target = largest_array_file(copy_of)
    with open(target, "r+b") as f:
        f.seek(os.path.getsize(target) // 2)
        f.write(os.urandom(64))
    with pytest.raises(pcomp_jax.CheckpointError, match=f"damaged: {target} does not match its checksum"):
        load(model, copy_of)


@pytest.mark.parametrize("damage", ["delete", "truncate", "add"])
def test_missing_truncated_or_foreign_files_are_refused(model, copy_of, damage):
    target = largest_array_file(copy_of)
    if damage == "delete":
        os.remove(target)
    elif damage == "truncate":
        os.truncate(target, os.path.getsize(target) // 3)
    else:
        target = os.path.join(os.path.dirname(target), "stray")
        open(target, "w").close()
    words = {"delete": "is missing", "truncate": "does not match its checksum", "add": "was not written with it"}
    with pytest.raises(pcomp_jax.CheckpointError, match=f"{target} {words[damage]}"):
        load(model, copy_of)


@pytest.mark.parametrize("edit, message", [
    (lambda r: [], "is not a document record"),
    (lambda r: {k: v for k, v in r.items() if k != "fingerprint"}, "lacks a valid 'fingerprint' field"),
    (lambda r: {**r, "num_groups": r["num_groups"] + 1}, "does not match its checksum"),
    (lambda r: {**r, "format": 1}, "has format 1, not 2"),
    (lambda r: {**r, "num_groups": "two"}, "lacks a valid 'num_groups' field"),
])
def test_an_edited_or_broken_record_is_refused(model, copy_of, edit, message):
    record_path = copy_of / DOCUMENT_RECORD
    record = json.loads(record_path.read_text())
    record_path.write_text(json.dumps(edit(record)))
    with pytest.raises(pcomp_jax.CheckpointError, match=message):
        load(model, copy_of)


def test_a_record_rewritten_with_its_checksum_but_without_the_fingerprint_is_refused(model, copy_of):
    record_path = copy_of / DOCUMENT_RECORD
    record = json.loads(record_path.read_text())
    record["fingerprint"] = {"tokenizer": record["fingerprint"]["tokenizer"]}
    record["record_sha256"] = record_digest({k: v for k, v in record.items() if k != "record_sha256"})
    record_path.write_text(json.dumps(record))
    with pytest.raises(pcomp_jax.CheckpointError, match="lacks the model's fingerprint"):
        load(model, copy_of)


def test_non_utf8_record_and_plain_directories_are_refused(model, copy_of, tmp_path):
    (copy_of / DOCUMENT_RECORD).write_bytes(b"{\xff}")
    with pytest.raises(pcomp_jax.CheckpointError, match="is not a document written by Document.save"):
        load(model, copy_of)
    with pytest.raises(pcomp_jax.CheckpointError, match="is not a directory written by Document.save"):
        load(model, tmp_path / "nothing here")


@pytest.mark.parametrize("field", ["wq", "wv", "w_down"])
def test_a_model_with_any_changed_weight_is_refused(model, saved, field):
    layers = model.params.layers
    changed = getattr(layers, field).at[1, 0, 0].add(1e-3)  # one number of the last layer
    other = dataclasses.replace(model, params=dataclasses.replace(
        model.params, layers=dataclasses.replace(layers, **{field: changed})))
    assert weights_digest(other) != weights_digest(model)
    with pytest.raises(pcomp_jax.PcompError, match=r"another model \(weights differ\)"):
        load(other, saved)


def test_the_weights_digest_is_computed_once_per_model(model, monkeypatch):
    first = weights_digest(model)
    monkeypatch.setattr(np, "ascontiguousarray", lambda *a: pytest.fail("digest computed again"))
    assert weights_digest(model) == first


def test_a_failed_save_leaves_nothing_and_a_retry_works(model, tmp_path, monkeypatch):
    import orbax.checkpoint as ocp

    doc = read_document(model, CONTEXT, BASE, host=True)
    real_save = ocp.StandardCheckpointer.save

    def full_disk(self, *args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ocp.StandardCheckpointer, "save", full_disk)
    with pytest.raises(pcomp_jax.CheckpointError, match=r"cannot save the document to .*No space left on device"):
        doc.save(str(tmp_path / "doc"))
    assert os.listdir(tmp_path) == []  # no half-written directory, no temporary sibling
    monkeypatch.setattr(ocp.StandardCheckpointer, "save", real_save)
    doc.save(str(tmp_path / "doc"))
    assert load(model, tmp_path / "doc").num_chunks == doc.num_chunks


def test_saving_into_an_unwritable_place_is_one_error(model, tmp_path):
    doc = read_document(model, CONTEXT, BASE, host=True)
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(pcomp_jax.CheckpointError, match="cannot write"):
        doc.save(str(blocker / "doc"))
