"""Our own checkpoint format: weights saved with orbax, config as JSON, tokenizer beside them.

A GGUF model is dequantized once with ``save_model(model, path)``; ``load_model(path)``
then restores the float weights directly.

    path/pcomp_model.json   ModelConfig and the weight dtype
    path/params/            orbax StandardCheckpointer directory of the Weights pytree
    path/tokenizer/         the transformers tokenizer (when the model has one)
"""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import jax.numpy as jnp

from ..errors import CheckpointError
from ..model.config import ModelConfig, RopeConfig
from ..model.llama import LayerWeights, Weights

MARKER = "pcomp_model.json"


def is_orbax_dir(path: str) -> bool:
    return os.path.isfile(os.path.join(path, MARKER))


def weight_shapes(cfg: ModelConfig, dtype) -> Weights:
    """The ``Weights`` pytree as ``jax.ShapeDtypeStruct`` leaves, from the config alone."""
    l, e, h, kvh, d, f, v = (cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
                             cfg.intermediate_size, cfg.vocab_size)
    s = lambda *shape: jax.ShapeDtypeStruct(shape, dtype)
    bias = lambda heads: s(l, heads, d) if cfg.qkv_bias else None
    if_set = lambda flag, *shape: s(*shape) if flag else None
    layers = LayerWeights(
        attn_norm=s(l, e), wq=s(l, e, h, d), wk=s(l, e, kvh, d), wv=s(l, e, kvh, d), wo=s(l, h, d, e),
        mlp_norm=s(l, e), w_gate=s(l, e, f), w_up=s(l, e, f), w_down=s(l, f, e), bq=bias(h), bk=bias(kvh), bv=bias(kvh),
        q_norm=if_set(cfg.qk_norm, l, d), k_norm=if_set(cfg.qk_norm, l, d),
        post_attn_norm=if_set(cfg.post_norms, l, e), post_mlp_norm=if_set(cfg.post_norms, l, e),
    )
    return Weights(embed=s(v, e), layers=layers, final_norm=s(e), lm_head=None if cfg.tie_embeddings else s(e, v))


def save_model(model, path: str) -> None:
    """Writes ``model`` (config, weights, tokenizer) to the directory ``path`` (must not exist yet)."""
    import orbax.checkpoint as ocp

    path = os.path.abspath(path)
    if os.path.exists(path):
        raise CheckpointError(f"{path!r} already exists; choose a new directory so that nothing is overwritten")
    os.makedirs(path)
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(os.path.join(path, "params"), model.params)
    checkpointer.wait_until_finished()
    if model.tokenizer is not None:
        model.tokenizer.save_pretrained(os.path.join(path, "tokenizer"))
    record = {"config": dataclasses.asdict(model.config), "dtype": jnp.dtype(model.dtype).name, "source": model.source}
    with open(os.path.join(path, MARKER), "w") as f:
        json.dump(record, f, indent=1)


def read_config(path: str) -> tuple[ModelConfig, str]:
    try:
        with open(os.path.join(path, MARKER)) as f:
            record = json.load(f)
        raw = record["config"]
    except (OSError, json.JSONDecodeError, KeyError) as err:
        raise CheckpointError(f"{os.path.join(path, MARKER)} is not a readable pcomp_jax model record: {err}") from err
    def rope_config(rope):
        if rope.get("freq_factors") is not None:
            rope["freq_factors"] = tuple(rope["freq_factors"])
        return RopeConfig(**rope)

    rope = rope_config(raw.pop("rope"))
    local_rope = raw.pop("local_rope", None)
    raw["eos_token_ids"] = tuple(raw["eos_token_ids"])
    raw["sliding_windows"] = tuple(raw.get("sliding_windows", ()))
    try:
        cfg = ModelConfig(**raw, rope=rope, local_rope=None if local_rope is None else rope_config(local_rope))
    except TypeError as err:
        raise CheckpointError(f"{os.path.join(path, MARKER)} has a config this version does not read: {err}") from err
    return cfg, record["dtype"]


def load_orbax_dir(path: str, dtype, place=None):
    """``(config, weights, tokenizer)`` from a directory written by ``save_model``.

    The weights are restored in their saved dtype and then cast to ``dtype``. place:
    optional ``place(cfg, target) -> shardings`` (a ``Weights`` tree of ``Sharding``s): each
    array is then restored straight into its sharding, reading only this process's shards."""
    import orbax.checkpoint as ocp

    cfg, saved_dtype = read_config(path)
    params_dir = os.path.join(os.path.abspath(path), "params")
    if not os.path.isdir(params_dir):
        raise CheckpointError(f"{path!r} has {MARKER} but no params/ directory")
    target = weight_shapes(cfg, jnp.dtype(saved_dtype))
    if place is not None:
        target = jax.tree.map(lambda t, s: jax.ShapeDtypeStruct(t.shape, t.dtype, sharding=s), target,
                              place(cfg, target))
    weights = ocp.StandardCheckpointer().restore(params_dir, target)
    weights = jax.tree.map(lambda x: x.astype(dtype), weights)
    tokenizer = None
    if os.path.isdir(os.path.join(path, "tokenizer")):
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(os.path.join(path, "tokenizer"))
    return cfg, weights, tokenizer
