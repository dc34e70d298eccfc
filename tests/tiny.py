"""Tiny random-weight checkpoints for tests: Hugging Face directories and GGUF files.

The Hugging Face PyTorch model saved with ``save_pretrained`` is the independent
reference; the GGUF files carry the same weights laid out the way llama.cpp writes
them (Q/K rows permuted for interleaved RoPE), so loading them exercises our un-permute.
"""

from __future__ import annotations

import os
from types import SimpleNamespace

import gguf
import numpy as np
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM
from transformers import Gemma3ForCausalLM, Gemma3TextConfig, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM
from transformers import Qwen3Config, Qwen3ForCausalLM

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("i", "n"), ("Ġ", "a"), ("e", "r"), ("o", "n"), ("Ġ", "s")]
CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def tiny_vocab() -> tuple[list[str], list[tuple[str, str]]]:
    """Special tokens, the 256 byte-level symbols, then one token per merge."""
    tokens = SPECIALS + sorted(pre_tokenizers.ByteLevel.alphabet()) + ["".join(m) for m in MERGES]
    return tokens, MERGES


def tiny_hf_tokenizer() -> PreTrainedTokenizerFast:
    """The tiny vocabulary as a transformers tokenizer (SmolLM2-like pre-tokenizer)."""
    tokens, merges = tiny_vocab()
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIALS)
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>")
    wrapped.chat_template = CHAT_TEMPLATE
    return wrapped


VOCAB_SIZE = len(tiny_vocab()[0])
BASE = dict(
    vocab_size=VOCAB_SIZE,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    rms_norm_eps=1e-6,
    initializer_range=0.2,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)

# The tiny models' sizes, as the bounds (tests/bounds.py) read them from a ModelConfig.
DIMS = SimpleNamespace(num_layers=BASE["num_hidden_layers"], hidden_size=BASE["hidden_size"],
                       intermediate_size=BASE["intermediate_size"], vocab_size=VOCAB_SIZE,
                       window=BASE["max_position_embeddings"])

VARIANTS = {
    "llama_gqa_untied": (LlamaConfig, LlamaForCausalLM, dict(tie_word_embeddings=False)),
    "llama_tied_mha": (LlamaConfig, LlamaForCausalLM, dict(tie_word_embeddings=True, num_key_value_heads=4)),
    "llama3_rope": (
        LlamaConfig,
        LlamaForCausalLM,
        dict(
            rope_parameters=dict(
                rope_type="llama3", rope_theta=10000.0, factor=8.0, low_freq_factor=1.0,
                high_freq_factor=4.0, original_max_position_embeddings=16,
            )
        ),
    ),
    "linear_rope": (LlamaConfig, LlamaForCausalLM, dict(rope_parameters=dict(rope_type="linear", rope_theta=500.0, factor=2.0))),
    "dynamic_rope": (
        LlamaConfig,
        LlamaForCausalLM,
        dict(max_position_embeddings=32, rope_parameters=dict(rope_type="dynamic", rope_theta=10000.0, factor=2.0)),
    ),
    "qwen2_bias": (Qwen2Config, Qwen2ForCausalLM, dict(tie_word_embeddings=False, use_sliding_window=False)),
    "mistral": (MistralConfig, MistralForCausalLM, dict(sliding_window=None, tie_word_embeddings=False)),
    # Gemma 3 with local, global, local layers: a local window (64) shorter than a chunk row of
    # the pipeline tests (about 140 tokens) and longer than their question part (about 50), so
    # a local layer sees part of a chunk from the question; global RoPE linear-scaled, local plain
    "gemma3_local": (Gemma3TextConfig, Gemma3ForCausalLM, dict(
        num_hidden_layers=3, head_dim=16, sliding_window=64, query_pre_attn_scalar=24,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        rope_parameters={"full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e6},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}})),
    "qwen3": (Qwen3Config, Qwen3ForCausalLM, dict(head_dim=32, tie_word_embeddings=False)),  # QK-norm, head_dim != E / H
}
FAMILY_VARIANTS = ("gemma3_local", "qwen3")  # random norms (Gemma's start at 0: a scale of 1)


def make_hf_checkpoint(path: str, variant: str, seed: int = 0, with_tokenizer: bool = True):
    """Saves a random tiny model of ``variant`` to ``path``; returns the torch model (eval, float32)."""
    config_cls, model_cls, extra = VARIANTS[variant]
    torch.manual_seed(seed)
    model = model_cls(config_cls(**{**BASE, **extra})).eval()
    if variant == "qwen2_bias":  # random biases, so that a dropped bias cannot go unnoticed
        with torch.no_grad():
            for layer in model.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    proj.bias.normal_(0, 0.5)
    if variant in FAMILY_VARIANTS:  # random norms, so that a misread norm cannot go unnoticed
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "norm" in name:
                    p.normal_(0, 0.3)
    model.save_pretrained(path, safe_serialization=True)
    if with_tokenizer:
        tiny_hf_tokenizer().save_pretrained(path)
    return model


def _permute_rows(w: np.ndarray, num_heads: int) -> np.ndarray:
    """llama.cpp's converter permutation (the inverse of what pcomp_jax undoes)."""
    return w.reshape(num_heads, 2, w.shape[0] // num_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_writer(path: str, cfg, arch: str):
    """A ``gguf.GGUFWriter`` for ``arch`` with the sizes of the transformers config ``cfg``
    (layers, context, width, MLP width, query and KV heads) written."""
    w = gguf.GGUFWriter(path, arch)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    return w


def write_gguf(path: str, model, arch: str = "llama", pre: str = "smollm") -> None:
    """Writes ``model``'s weights (float32) and the tiny tokenizer as a GGUF file like llama.cpp's."""
    cfg = model.config
    sd = {k: v.detach().numpy().astype(np.float32) for k, v in model.state_dict().items()}
    w = gguf_writer(path, cfg, arch)
    w.add_rope_freq_base(float(cfg.rope_parameters["rope_theta"]))
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    tokens, merges = tiny_vocab()
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types([3 if t in SPECIALS else 1 for t in tokens])
    w.add_token_merges([" ".join(m) for m in merges])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_chat_template(CHAT_TEMPLATE)
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    layer_names = {"input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
                   "self_attn.o_proj.weight": "attn_output.weight", "mlp.gate_proj.weight": "ffn_gate.weight",
                   "mlp.up_proj.weight": "ffn_up.weight", "mlp.down_proj.weight": "ffn_down.weight"}
    for proj in "qkv":
        layer_names[f"self_attn.{proj}_proj.weight"] = f"attn_{proj}.weight"
        layer_names[f"self_attn.{proj}_proj.bias"] = f"attn_{proj}.bias"
    for name, value in sd.items():
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        if name in names:
            w.add_tensor(names[name], value)
            continue
        _, _, idx, rest = name.split(".", 3)
        if arch == "llama" and rest.startswith(("self_attn.q_proj", "self_attn.k_proj")):
            heads = cfg.num_attention_heads if "q_proj" in rest else cfg.num_key_value_heads
            value = _permute_rows(value, heads)
        w.add_tensor(f"blk.{idx}.{layer_names[rest]}", value)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def hf_logits(model, ids: np.ndarray) -> np.ndarray:
    """Reference logits from the PyTorch model, float32 ``[B, T, V]``."""
    with torch.no_grad():
        return model(torch.tensor(np.array(ids), dtype=torch.long)).logits.float().numpy()


def default_model_dir() -> str:
    from pcomp_jax.checkpoints import default_model_path

    return os.path.dirname(default_model_path())
