"""GGUF checkpoints (llama, qwen2, qwen3 and gemma3 architectures), dequantized with the
``gguf`` package (every quantization type it reads).

llama.cpp stores the Q and K projections of ``llama`` models row-permuted for its
interleaved RoPE; ``unpermute_rows`` restores Hugging Face's half-split layout so
that the same model code serves both formats (the other architectures are stored
unpermuted). Its ``gemma3`` files hold the RMSNorm weights as ``1 + w`` already, which is
how this package keeps them (``convert``). What the file does not say, as llama.cpp
reads it: Gemma 3's layers are local but every sixth, the local RoPE base is 10000 (or
``gemma3.rope.freq_base_swa``), and the score scale is ``head_dim ** -0.5``.
"""

from __future__ import annotations

import os

import numpy as np

from ..errors import CheckpointError
from ..model.config import ModelConfig, RopeConfig
from ..model.llama import Weights
from .convert import build_weights

SUPPORTED_GGUF_ARCHITECTURES = ("llama", "qwen2", "qwen3", "gemma3")
_HF_ARCH = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
            "gemma3": "Gemma3ForCausalLM"}
GEMMA3_PATTERN = 6  # llama.cpp: every sixth Gemma 3 layer is global, the others local
GEMMA3_LOCAL_ROPE_BASE = 10000.0
_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
    "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight",
    "post_attention_norm.weight": "post_attention_layernorm.weight",
    "post_ffw_norm.weight": "post_feedforward_layernorm.weight",
}
# Gemma's norm before the MLP is ffn_norm in GGUF and pre_feedforward_layernorm in transformers
# (whose post_attention_layernorm is the norm on the attention output).
_GEMMA_LAYER_NAMES = {**_LAYER_NAMES, "ffn_norm.weight": "pre_feedforward_layernorm.weight"}
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}


def hf_name(gguf_name: str, arch: str = "llama") -> str | None:
    """Hugging Face name of a GGUF tensor of architecture ``arch``, or None for tensors
    with no counterpart."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    names = _GEMMA_LAYER_NAMES if arch == "gemma3" else _LAYER_NAMES
    parts = gguf_name.split(".", 2)
    if parts[0] == "blk" and len(parts) == 3 and parts[2] in names:
        return f"model.layers.{parts[1]}.{names[parts[2]]}"
    return None


def unpermute_rows(w: np.ndarray, num_heads: int) -> np.ndarray:
    """Undoes llama.cpp's Q/K permutation. w: ``[num_heads * head_dim, ...]`` (weight or bias).

    llama.cpp interleaves the two rotary halves of every head (pairs ``(i, i + D/2)``
    become neighbours); this puts each head's even rows first and odd rows second.
    """
    rest = w.shape[1:]
    return w.reshape(num_heads, -1, 2, *rest).swapaxes(1, 2).reshape(w.shape)


class GGUFCheckpoint:
    """An opened GGUF file: metadata, model config, lazily dequantized tensors."""

    def __init__(self, path: str):
        import gguf

        if not os.path.isfile(path):
            raise CheckpointError(f"GGUF file {path!r} does not exist")
        with open(path, "rb") as f:
            magic = f.read(4)
        if magic != b"GGUF":
            raise CheckpointError(f"{path!r} is not a GGUF file (it does not start with the bytes 'GGUF')")
        try:
            self.reader = gguf.GGUFReader(path)
            self.meta = {k: f.contents() for k, f in self.reader.fields.items()}
            self.tensors = {t.name: t for t in self.reader.tensors}
        except Exception as err:  # the reader raises many types on a damaged file
            raise CheckpointError(f"{path!r} is not a readable GGUF file (truncated or damaged?): {err}") from err
        size = os.path.getsize(path)
        for t in self.tensors.values():
            if t.data_offset + t.n_bytes > size:
                raise CheckpointError(
                    f"{path!r} is truncated: tensor {t.name!r} ends at byte {t.data_offset + t.n_bytes} "
                    f"but the file has {size} bytes"
                )
        self.path = path
        self.arch = self.meta.get("general.architecture")
        if self.arch not in SUPPORTED_GGUF_ARCHITECTURES:
            raise CheckpointError(
                f"{path!r}: GGUF architecture {self.arch!r} is not supported; supported: "
                f"{', '.join(SUPPORTED_GGUF_ARCHITECTURES)}"
            )
        self.config = self._config()
        self._by_hf_name = {hf_name(n, self.arch): n for n in self.tensors if hf_name(n, self.arch)}

    def _field(self, key: str, default=None):
        value = self.meta.get(f"{self.arch}.{key}", default)
        if value is None:
            raise CheckpointError(f"{self.path!r} lacks the GGUF metadata field {self.arch}.{key}")
        return value

    def _config(self) -> ModelConfig:
        num_heads = int(self._field("attention.head_count"))
        hidden = int(self._field("embedding_length"))
        head_dim = int(self.meta.get(f"{self.arch}.attention.key_length")
                       or self._field("rope.dimension_count", hidden // num_heads))
        vocab = len(self.meta.get("tokenizer.ggml.tokens", [])) or int(self._field("vocab_size"))
        scaling = self.meta.get(f"{self.arch}.rope.scaling.type", "none")
        if scaling not in ("none", "linear"):
            raise CheckpointError(f"{self.path!r}: GGUF rope scaling {scaling!r} is not supported (none, linear)")
        freq_factors = None
        if "rope_freqs.weight" in self.tensors:
            freq_factors = tuple(float(x) for x in self._dequantize("rope_freqs.weight").reshape(-1))
        rope = RopeConfig(
            theta=float(self._field("rope.freq_base", 10000.0)),
            type="linear" if scaling == "linear" else "default",
            factor=float(self.meta.get(f"{self.arch}.rope.scaling.factor", 1.0)),
            freq_factors=freq_factors,
        )
        eos = [self.meta.get(f"tokenizer.ggml.{k}_token_id") for k in ("eos", "eot")]
        return ModelConfig(
            architecture=_HF_ARCH[self.arch],
            vocab_size=vocab,
            hidden_size=hidden,
            intermediate_size=int(self._field("feed_forward_length")),
            num_layers=int(self._field("block_count")),
            num_heads=num_heads,
            num_kv_heads=int(self._field("attention.head_count_kv", num_heads)),
            head_dim=head_dim,
            window=int(self._field("context_length")),
            rms_norm_eps=float(self._field("attention.layer_norm_rms_epsilon", 1e-6)),
            rope=rope,
            qkv_bias="blk.0.attn_q.bias" in self.tensors,
            tie_embeddings="output.weight" not in self.tensors,
            bos_token_id=self.meta.get("tokenizer.ggml.bos_token_id"),
            eos_token_ids=tuple(sorted({int(e) for e in eos if e is not None})),
            **self._family_fields(hidden, num_heads, head_dim),
        )

    def _family_fields(self, hidden: int, num_heads: int, head_dim: int) -> dict:
        """The Qwen3 and Gemma 3 fields of ``ModelConfig`` (none for llama and qwen2)."""
        if self.arch == "qwen3":
            return dict(qk_norm=True)
        if self.arch != "gemma3":
            return {}
        num_layers = int(self._field("block_count"))
        window = int(self._field("attention.sliding_window"))
        # llama.cpp scales Gemma 3 27B's (62 layers') scores by (hidden / heads) ** -0.5, the others' by head_dim ** -0.5
        scalar = hidden / num_heads if num_layers == 62 else head_dim
        return dict(
            qk_norm=True,
            post_norms=True,
            embed_scale=float(hidden) ** 0.5,
            mlp_activation="gelu_tanh",
            query_scale=float(scalar) ** -0.5,
            sliding_windows=tuple(window if (i + 1) % GEMMA3_PATTERN else 0 for i in range(num_layers)),
            local_rope=RopeConfig(theta=float(self.meta.get(f"{self.arch}.rope.freq_base_swa", GEMMA3_LOCAL_ROPE_BASE))),
        )

    def _dequantize(self, gguf_name: str) -> np.ndarray:
        import gguf

        t = self.tensors[gguf_name]
        return gguf.quants.dequantize(np.asarray(t.data), t.tensor_type)

    def hf_tensor(self, name: str) -> np.ndarray:
        """A tensor by its Hugging Face name, dequantized to float32 in HF layout."""
        w = self._dequantize(self._by_hf_name[name])
        if self.arch == "llama" and (".q_proj." in name or ".k_proj." in name):
            heads = self.config.num_heads if ".q_proj." in name else self.config.num_kv_heads
            w = unpermute_rows(w, heads)
        return w

    def weights(self, dtype) -> Weights:
        """All weights as a ``Weights`` pytree of ``dtype``."""
        return build_weights(self.hf_tensor, self._by_hf_name.__contains__, self.config, dtype,
                             norms_offset=self.arch == "gemma3")

    def tokenizer(self):
        """The tokenizer from the file's metadata (see ``checkpoints.tokenizer``)."""
        from .tokenizer import tokenizer_from_gguf

        return tokenizer_from_gguf(self.path, self.meta)
