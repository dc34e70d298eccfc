"""GGUF loading: weights un-permuted like llama.cpp's layout, tokenizer from metadata, damaged files."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tiny
from bounds import assert_within, model_bound, scale_of

import pcomp_jax
from pcomp_jax.checkpoints.gguf_file import unpermute_rows


@pytest.fixture(scope="module")
def gguf_models(hf_checkpoints, tmp_path_factory):
    out = {}
    for variant, arch in [("llama_gqa_untied", "llama"), ("llama_tied_mha", "llama"), ("qwen2_bias", "qwen2")]:
        _, reference = hf_checkpoints(variant)
        path = str(tmp_path_factory.mktemp("gguf") / f"{variant}.gguf")
        tiny.write_gguf(path, reference, arch=arch)
        out[variant] = (path, reference)
    return out


@pytest.mark.parametrize("variant", ["llama_gqa_untied", "llama_tied_mha", "qwen2_bias"])
def test_gguf_logits_match_transformers(gguf_models, variant):
    path, reference = gguf_models[variant]
    model = pcomp_jax.load_model(path)
    assert model.config.tie_embeddings == reference.config.tie_word_embeddings
    ids = np.random.default_rng(0).integers(0, tiny.VOCAB_SIZE, size=(2, 64))
    expected = tiny.hf_logits(reference, ids)
    assert_within(pcomp_jax.forward(model, ids), expected, model_bound(model.config, scale_of(expected), row_len=64),
                  "logits")


def test_unpermute_inverts_llama_cpp_permutation():
    w = np.arange(4 * 8 * 3).reshape(4 * 8, 3)
    np.testing.assert_array_equal(unpermute_rows(tiny._permute_rows(w, 4), 4), w)
    assert not np.array_equal(tiny._permute_rows(w, 4), w)


def test_gguf_tokenizer_matches_reference_tokenizer(gguf_models):
    path, _ = gguf_models["llama_gqa_untied"]
    ours = pcomp_jax.load_model(path).tokenizer
    reference = tiny.tiny_hf_tokenizer()
    text = "In the beginning there were 12345 tokens, then 67.\nThe end <|im_end|>"
    assert ours(text)["input_ids"] == reference(text)["input_ids"]
    assert ours.decode(ours(text)["input_ids"]) == text
    assert [ours.convert_ids_to_tokens(i) for i in ours("x 2024")["input_ids"]][-4:] == ["2", "0", "2", "4"]
    chat = ours.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert chat.endswith("<|im_start|>assistant\n")


def test_truncated_gguf_is_a_clear_error(gguf_models, tmp_path):
    path, _ = gguf_models["llama_gqa_untied"]
    data = open(path, "rb").read()
    for keep in (len(data) // 2, 200, 3):
        bad = tmp_path / f"cut{keep}.gguf"
        bad.write_bytes(data[:keep])
        with pytest.raises(pcomp_jax.CheckpointError, match="truncated|not a readable GGUF|not a GGUF"):
            pcomp_jax.load_model(str(bad))


def test_gguf_with_unsupported_architecture(tmp_path):
    import gguf

    path = str(tmp_path / "gpt2.gguf")
    w = gguf.GGUFWriter(path, "gpt2")
    w.add_tensor("token_embd.weight", np.zeros((4, 4), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(pcomp_jax.CheckpointError, match="architecture 'gpt2' is not supported; supported: llama, qwen2"):
        pcomp_jax.load_model(path)
    assert os.path.exists(path)


def test_orbax_save_and_restore(gguf_models, tmp_path):
    """A dequantized model saved with orbax loads back to the same weights, tokenizer and logits."""
    path, _ = gguf_models["qwen2_bias"]
    model = pcomp_jax.load_model(path)
    saved = tmp_path / "saved"
    pcomp_jax.save_model(model, str(saved))
    again = pcomp_jax.load_model(str(saved))
    assert again.config == model.config
    ids = np.random.default_rng(1).integers(0, tiny.VOCAB_SIZE, size=(1, 40))
    np.testing.assert_array_equal(pcomp_jax.forward(again, ids), pcomp_jax.forward(model, ids))
    assert again.tokenizer("the cat 42")["input_ids"] == model.tokenizer("the cat 42")["input_ids"]
    assert pcomp_jax.load_model(str(saved), dtype="bfloat16").params.layers.wq.dtype == np.dtype("bfloat16")
    # a GGUF read in bfloat16 holds its float32 weights rounded to bfloat16 (conftest's
    # default_model_bfloat16 relies on it)
    rounded = jax.tree.map(lambda w: np.asarray(w.astype(jnp.bfloat16)), model.params)
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, pcomp_jax.load_model(path, dtype="bfloat16").params),
                 rounded)
    with pytest.raises(pcomp_jax.CheckpointError, match="already exists"):
        pcomp_jax.save_model(model, str(saved))


def test_convert_script_and_restore_onto_a_2x2_mesh(gguf_models, hf_checkpoints, tmp_path, capsys):
    """scripts/convert_checkpoint.py makes an orbax checkpoint of a Hugging Face directory and
    of a GGUF file; restored straight onto a (chunk 2, model 2) mesh, the weights come back
    split over heads and MLP, with the logits of the unsharded model."""
    import importlib.util

    from pcomp_jax.sharding import MODEL_AXIS, make_mesh

    spec = importlib.util.spec_from_file_location("convert_checkpoint", os.path.join(
        os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts", "convert_checkpoint.py"))
    convert = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(convert)
    hf_dir, _ = hf_checkpoints("llama_gqa_untied")
    mesh = make_mesh(4, model_parallel=2)
    ids = np.random.default_rng(2).integers(0, tiny.VOCAB_SIZE, size=(1, 30))
    for name, source in (("from_hf", hf_dir), ("from_gguf", gguf_models["qwen2_bias"][0])):
        out = tmp_path / name
        assert convert.main([source, str(out)]) == 0
        assert f"wrote {out}" in capsys.readouterr().out
        plain, placed = pcomp_jax.load_model(source), pcomp_jax.load_model(str(out), mesh=mesh)
        assert placed.params.layers.wq.sharding.spec[2] == MODEL_AXIS
        assert placed.params.layers.w_down.sharding.spec[1] == MODEL_AXIS
        assert placed.params.layers.wk.addressable_shards[0].data.shape[2] == plain.config.num_kv_heads // 2
        expected = pcomp_jax.forward(plain, ids)
        assert_within(pcomp_jax.forward(placed, ids), expected, model_bound(plain.config, scale_of(expected), row_len=30),
                      "logits on a (chunk, model) mesh")
        assert placed.tokenizer("the cat 42")["input_ids"] == plain.tokenizer("the cat 42")["input_ids"]
    assert convert.main([hf_dir, str(tmp_path / "from_hf")]) == 2  # never overwrites
    assert "already exists" in capsys.readouterr().err
    with pytest.raises(pcomp_jax.ConfigError, match="model_parallel=4 must divide"):
        pcomp_jax.load_model(str(tmp_path / "from_hf"), mesh=make_mesh(4, model_parallel=4))
