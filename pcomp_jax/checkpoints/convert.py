"""Hugging Face tensor layout -> ``Weights`` pytree.

Both checkpoint readers (safetensors directories and GGUF files) hand over tensors
under Hugging Face names and in its ``[out_features, in_features]`` layout; this
module reshapes them to the head-split layout of ``pcomp_jax.model.llama`` and
stacks the layers.

Gemma's RMSNorms scale by ``1 + w`` where the others scale by ``w``: its norm weights are
stored as ``1 + w`` here (``NORM_OFFSET``), so the model has one RMSNorm for every family
and saved (orbax) weights hold the folded values.
"""

from __future__ import annotations

from typing import Callable

import jax.numpy as jnp

from ..errors import CheckpointError
from ..model.config import GEMMA_FAMILY, ModelConfig
from ..model.llama import LayerWeights, Weights

GetTensor = Callable[[str], "jnp.ndarray"]


def norm_offset(cfg: ModelConfig) -> float:
    """What a checkpoint's RMSNorm weights are offset by in this package's weights: 1 for
    Gemma (``x * (1 + w)``), 0 for the others."""
    return 1.0 if cfg.architecture in GEMMA_FAMILY else 0.0


def build_weights(get: GetTensor, has: Callable[[str], bool], cfg: ModelConfig, dtype,
                  norms_offset: bool = False) -> Weights:
    """Assembles ``Weights`` from Hugging Face-named tensors.

    get(name) returns the tensor (any array type); has(name) says whether it exists.
    norms_offset: the norm weights already hold Gemma's ``1 + w`` (GGUF files), so the
    offset (``norm_offset``) is not added again.
    """
    offset = 0.0 if norms_offset else norm_offset(cfg)
    e, h, kvh, d = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim

    def tensor(name: str):
        if not has(name):
            raise CheckpointError(f"checkpoint has no tensor {name!r}, which a {cfg.architecture} needs")
        if name.endswith("norm.weight") and offset:  # folded in float32, then cast once
            return jnp.asarray(jnp.asarray(get(name), jnp.float32) + offset, dtype=dtype)
        return jnp.asarray(get(name), dtype=dtype)

    def stack(suffix: str, convert):
        return jnp.stack([convert(tensor(f"model.layers.{i}.{suffix}")) for i in range(cfg.num_layers)])

    def bias(proj: str, heads: int):
        if not cfg.qkv_bias:
            return None
        return stack(f"self_attn.{proj}.bias", lambda b: b.reshape(heads, d))

    def optional(flag: bool, suffix: str):
        return stack(suffix, lambda w: w) if flag else None

    # Llama's post_attention_layernorm is the norm before the MLP; Gemma's (post_norms) is the
    # norm on the attention output, and pre_feedforward_layernorm the one before the MLP.
    mlp_norm = "pre_feedforward_layernorm.weight" if cfg.post_norms else "post_attention_layernorm.weight"
    layers = LayerWeights(
        attn_norm=stack("input_layernorm.weight", lambda w: w),
        wq=stack("self_attn.q_proj.weight", lambda w: w.T.reshape(e, h, d)),
        wk=stack("self_attn.k_proj.weight", lambda w: w.T.reshape(e, kvh, d)),
        wv=stack("self_attn.v_proj.weight", lambda w: w.T.reshape(e, kvh, d)),
        wo=stack("self_attn.o_proj.weight", lambda w: w.T.reshape(h, d, e)),
        mlp_norm=stack(mlp_norm, lambda w: w),
        w_gate=stack("mlp.gate_proj.weight", lambda w: w.T),
        w_up=stack("mlp.up_proj.weight", lambda w: w.T),
        w_down=stack("mlp.down_proj.weight", lambda w: w.T),
        bq=bias("q_proj", h),
        bk=bias("k_proj", kvh),
        bv=bias("v_proj", kvh),
        q_norm=optional(cfg.qk_norm, "self_attn.q_norm.weight"),
        k_norm=optional(cfg.qk_norm, "self_attn.k_norm.weight"),
        post_attn_norm=optional(cfg.post_norms, "post_attention_layernorm.weight"),
        post_mlp_norm=optional(cfg.post_norms, "post_feedforward_layernorm.weight"),
    )
    lm_head = None if cfg.tie_embeddings else tensor("lm_head.weight").T
    return Weights(
        embed=tensor("model.embed_tokens.weight"),
        layers=layers,
        final_norm=tensor("model.norm.weight"),
        lm_head=lm_head,
    )
