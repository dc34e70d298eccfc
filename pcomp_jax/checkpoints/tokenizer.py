"""Tokenizers built from GGUF metadata, with llama.cpp's pre-tokenizer rules.

A byte-level BPE vocabulary (``tokenizer.ggml.model == "gpt2"``) is rebuilt with the
``tokenizers`` library; the pre-tokenizer follows ``tokenizer.ggml.pre`` the way
llama.cpp reads it (SmolLM2's ``smollm``: every digit on its own, then the GPT-2
byte-level split). SentencePiece vocabularies (``"llama"``) go through transformers'
own GGUF converter. The result is a transformers tokenizer, so chat templates,
``encode`` and ``decode`` work as for any Hugging Face checkpoint.
"""

from __future__ import annotations

import os

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

from ..errors import CheckpointError

# Pre-tokenizer regexes of llama.cpp (llama-vocab.cpp), by the GGUF ``tokenizer.ggml.pre`` name.
_LLAMA3_SPLIT = (
    r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_DIGITS_FIRST = ("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva")
_GPT2_ONLY = ("default", "gpt2", "mpt", "olmo", "jais")

TOKEN_TYPE_CONTROL = 3
TOKEN_TYPE_USER_DEFINED = 4


def pre_tokenizer_for(pre: str):
    """The ``tokenizers`` pre-tokenizer matching llama.cpp's rule named ``pre``."""
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in _DIGITS_FIRST:
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    if pre in _GPT2_ONLY:
        return byte_level
    splits = {"llama-bpe": _LLAMA3_SPLIT, "llama3": _LLAMA3_SPLIT, "qwen2": _QWEN2_SPLIT}
    if pre in splits:
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(splits[pre]), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    known = sorted(set(_DIGITS_FIRST + _GPT2_ONLY) | set(splits))
    raise CheckpointError(f"GGUF pre-tokenizer {pre!r} is not supported; supported: {', '.join(known)}")


def tokenizer_from_gguf(path: str, meta: dict):
    """A transformers tokenizer for the GGUF file at ``path``; ``meta`` holds its metadata."""
    kind = meta.get("tokenizer.ggml.model")
    if kind == "llama":
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(os.path.dirname(path) or ".", gguf_file=os.path.basename(path))
    if kind != "gpt2":
        raise CheckpointError(
            f"{path}: GGUF tokenizer model {kind!r} is not supported; supported: 'gpt2' (byte-level BPE), 'llama'"
        )
    tokens = list(meta["tokenizer.ggml.tokens"])
    merges = [tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]]
    types = list(meta.get("tokenizer.ggml.token_type", [1] * len(tokens)))
    bpe = models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, fuse_unk=False)
    tok = Tokenizer(bpe)
    tok.pre_tokenizer = pre_tokenizer_for(meta.get("tokenizer.ggml.pre", "default"))
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(
        [
            AddedToken(t, special=types[i] == TOKEN_TYPE_CONTROL, normalized=False)
            for i, t in enumerate(tokens)
            if types[i] in (TOKEN_TYPE_CONTROL, TOKEN_TYPE_USER_DEFINED)
        ]
    )

    def token(key):
        idx = meta.get(f"tokenizer.ggml.{key}_token_id")
        return None if idx is None or idx >= len(tokens) else tokens[idx]

    bos = token("bos")
    if meta.get("tokenizer.ggml.add_bos_token", False) and bos is not None:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tokens.index(bos))]
        )
    from transformers import PreTrainedTokenizerFast

    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=bos, eos_token=token("eos"), unk_token=token("unknown"), pad_token=token("padding")
    )
    wrapped.chat_template = meta.get("tokenizer.chat_template")
    return wrapped
