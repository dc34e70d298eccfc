"""Hugging Face tensor layout -> ``Weights`` pytree.

Both checkpoint readers (safetensors directories and GGUF files) hand over tensors
under Hugging Face names and in its ``[out_features, in_features]`` layout; this
module reshapes them to the head-split layout of ``pcomp_jax.model.llama`` and
stacks the layers.
"""

from __future__ import annotations

from typing import Callable

import jax.numpy as jnp

from ..errors import CheckpointError
from ..model.config import ModelConfig
from ..model.llama import LayerWeights, Weights

GetTensor = Callable[[str], "jnp.ndarray"]


def build_weights(get: GetTensor, has: Callable[[str], bool], cfg: ModelConfig, dtype) -> Weights:
    """Assembles ``Weights`` from Hugging Face-named tensors.

    get(name) returns the tensor (any array type); has(name) says whether it exists.
    """
    e, h, kvh, d = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim

    def tensor(name: str):
        if not has(name):
            raise CheckpointError(f"checkpoint has no tensor {name!r}, which a {cfg.architecture} needs")
        return jnp.asarray(get(name), dtype=dtype)

    def stack(suffix: str, convert):
        return jnp.stack([convert(tensor(f"model.layers.{i}.{suffix}")) for i in range(cfg.num_layers)])

    def bias(proj: str, heads: int):
        if not cfg.qkv_bias:
            return None
        return stack(f"self_attn.{proj}.bias", lambda b: b.reshape(heads, d))

    layers = LayerWeights(
        attn_norm=stack("input_layernorm.weight", lambda w: w),
        wq=stack("self_attn.q_proj.weight", lambda w: w.T.reshape(e, h, d)),
        wk=stack("self_attn.k_proj.weight", lambda w: w.T.reshape(e, kvh, d)),
        wv=stack("self_attn.v_proj.weight", lambda w: w.T.reshape(e, kvh, d)),
        wo=stack("self_attn.o_proj.weight", lambda w: w.T.reshape(h, d, e)),
        mlp_norm=stack("post_attention_layernorm.weight", lambda w: w),
        w_gate=stack("mlp.gate_proj.weight", lambda w: w.T),
        w_up=stack("mlp.up_proj.weight", lambda w: w.T),
        w_down=stack("mlp.down_proj.weight", lambda w: w.T),
        bq=bias("q_proj", h),
        bk=bias("k_proj", kvh),
        bv=bias("v_proj", kvh),
    )
    lm_head = None if cfg.tie_embeddings else tensor("lm_head.weight").T
    return Weights(
        embed=tensor("model.embed_tokens.weight"),
        layers=layers,
        final_norm=tensor("model.norm.weight"),
        lm_head=lm_head,
    )
