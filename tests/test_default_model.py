"""The embedded default model (SmolLM2-135M-Instruct, 4-bit GGUF): against transformers' GGUF
loader; the pipeline on it (one kept chunk without eviction is full attention over P + that
chunk + Q, the equivalence that separates what the method does from what the model can read);
a document read once answers as ``answer`` does; runs repeat bit for bit; bfloat16 keeps
float32's chunks and answer. One module, so that a test process loads each model once."""

import numpy as np
import pytest
import tiny
from bounds import assert_bfloat16_close, assert_within, bfloat16_bound, model_bound, nll_bound, scale_of

import pcomp_jax
from pcomp_jax import ParallelCompConfig, answer, read_document
from pcomp_jax.chunking import chunk_bounds, encode_parts
from pcomp_jax.decode import generate_ids
from pcomp_jax.tasks import make_task

pytestmark = [pytest.mark.default_model, pytest.mark.slow]

# num_devices=1: the pipeline tests check the real model, not sharding (test_sharding.py,
# test_pipeline.py do); its programs split over the suite's four CPU devices take twice as
# long on a 2-core machine.
ONE_DEVICE = 1

TEXT = (
    "It is a truth universally acknowledged, that a single man in possession of a good fortune, must be in want "
    "of a wife. However little known the feelings or views of such a man may be on his first entering a "
    "neighbourhood, this truth is so well fixed in the minds of the surrounding families, that he is considered "
    "the rightful property of some one or other of their daughters. \"My dear Mr. Bennet,\" said his lady to him "
    "one day, \"have you heard that Netherfield Park is let at last?\" Mr. Bennet replied that he had not. \"But it "
    "is,\" returned she; \"for Mrs. Long has just been here, and she told me all about it.\" Mr. Bennet made no "
    "answer. \"Do you not want to know who has taken it?\" cried his wife impatiently. \"You want to tell me, and I "
    "have no objection to hearing it.\" This was invitation enough."
)


@pytest.fixture(scope="module")
def model(default_model):
    return default_model


@pytest.fixture(scope="module")
def reference():
    import functools

    import gguf
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pcomp_jax.checkpoints import DEFAULT_GGUF

    folder = tiny.default_model_dir()
    with pytest.MonkeyPatch.context() as patch:
        # transformers' GGUF loader parses the file once per call (tokenizer, config, weights)
        # and builds gguf's tensor-name table once per tensor; both are pure in their
        # arguments, so one of each serves every call (about 20 of its 30 s on 2 cores)
        patch.setattr(gguf, "GGUFReader", functools.lru_cache(maxsize=None)(gguf.GGUFReader))
        patch.setattr(gguf, "get_tensor_name_map", functools.lru_cache(maxsize=None)(gguf.get_tensor_name_map))
        tok = AutoTokenizer.from_pretrained(folder, gguf_file=DEFAULT_GGUF)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=DEFAULT_GGUF, dtype=torch.float32).eval()
    return model, tok


def test_default_config(model):
    cfg = model.config
    assert (cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.window) == (30, 9, 3, 64, 8192)
    assert cfg.tie_embeddings and model.dtype == np.float32


def test_digits_are_split_one_by_one(model):
    pieces = model.tokenizer.tokenize("Call 5551234 now.")
    assert [p for p in pieces if p.isdigit()] == list("5551234")
    assert "".join(pieces).replace("Ġ", " ") == "Call 5551234 now."


def test_tokenizer_round_trip_and_agreement(model, reference):
    _, ref_tok = reference
    ids = model.tokenizer(TEXT)["input_ids"]
    assert model.tokenizer.decode(ids) == TEXT
    assert ids == ref_tok(TEXT)["input_ids"]


def test_bfloat16_is_within_its_rounding_bound_of_float32(model, default_model_bfloat16, reference):
    # bounds.bfloat16_bound: measured on this input, mean |bf16 - f32| is 0.113 for model and
    # 0.104 (AVX-512 bf16 CPU) to 0.128 (AVX2 CPU) for transformers' bfloat16 model.
    import copy

    import torch

    ref_model, _ = reference
    ids = np.asarray(model.tokenizer(TEXT * 4)["input_ids"][:256])[None]
    f32 = pcomp_jax.forward(model, ids)
    bf16 = pcomp_jax.forward(default_model_bfloat16, ids)
    hf_bf16 = tiny.hf_logits(copy.deepcopy(ref_model).to(torch.bfloat16), ids)
    depth = model.config.num_layers + 1
    assert_bfloat16_close(bf16, f32, depth=depth)
    assert np.abs(bf16 - hf_bf16).mean() <= 2 * bfloat16_bound(np.abs(f32).mean(), depth=depth)
    assert (bf16.argmax(-1) == f32.argmax(-1)).mean() > 0.97


def test_logits_match_transformers_gguf(model, reference):
    ref_model, _ = reference
    ids = np.asarray(model.tokenizer(TEXT)["input_ids"][:128])[None]
    assert ids.shape == (1, 128)
    expected = tiny.hf_logits(ref_model, ids)
    assert_within(pcomp_jax.forward(model, ids), expected, model_bound(model.config, scale_of(expected), row_len=128),
                  "logits")


@pytest.mark.parametrize("prompt,chat", [("The capital of France is", False), ("What is the capital of France?", True)])
def test_greedy_tokens_match_transformers(model, reference, prompt, chat):
    import torch

    ref_model, ref_tok = reference
    if chat:
        text = ref_tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
        ids = ref_tok(text, add_special_tokens=False)["input_ids"]
    else:
        ids = ref_tok(prompt)["input_ids"]
    with torch.no_grad():
        out = ref_model.generate(torch.tensor([ids]), max_new_tokens=20, do_sample=False)[0, len(ids):].tolist()
    result = pcomp_jax.generate_full(model, prompt, max_new_tokens=20, chat=chat)
    assert result.prompt_length == len(ids)
    stop = ref_model.generation_config.eos_token_id
    expected = out[: out.index(stop)] if stop in out else out
    assert result.token_ids == expected
    if chat:
        assert "Paris" in result.text



@pytest.fixture(scope="module")
def passkey(model):
    """A 1536-token passkey input (3 chunks of at most 512), its config, and answer()'s result."""
    task = make_task("passkey", model.tokenizer, 1536, 0.4, seed=3)
    config = ParallelCompConfig(chunk_len=512, top_k_chunks=2, capacity=128, num_devices=ONE_DEVICE)
    return task, config, answer(model, task.context, task.question, config, max_new_tokens=12)


def test_document_answers_a_passkey_as_answer_does(model, passkey):
    task, config, reference = passkey
    ours = read_document(model, task.context, config).ask(task.question, max_new_tokens=12)
    assert ours.num_chunks == reference.num_chunks >= 3
    assert_within(ours.chunk_scores, reference.chunk_scores,
                  nll_bound(model.config, reference.chunk_scores, row_len=config.chunk_len + 64), "chunk scores")
    assert ours.selected_chunks == reference.selected_chunks
    assert ours.token_ids == reference.token_ids and task.is_correct(ours.text), (ours.text, reference.text)


def test_runs_repeat_exactly_and_bfloat16_agrees_with_float32(model, default_model_bfloat16, passkey):
    # Measured (2026-11-25, 2048-token passkeys at depths 0.3 and 0.8; 2026-11-26, this input):
    # same chunks and answer in both dtypes; chunk scores (mean question NLL, 1.2-2.4) differ
    # by at most 0.012.
    task, config, first = passkey
    again = answer(model, task.context, task.question, config, max_new_tokens=12)
    assert again.token_ids == first.token_ids and again.chunk_scores == first.chunk_scores  # bit for bit
    bf16 = answer(default_model_bfloat16, task.context, task.question, config, max_new_tokens=12)
    assert bf16.selected_chunks == first.selected_chunks
    assert task.is_correct(first.text) and task.is_correct(bf16.text), (first.text, bf16.text)
    print("largest chunk-score difference, bfloat16 - float32:",
          np.abs(np.asarray(bf16.chunk_scores) - np.asarray(first.chunk_scores)).max())
    assert np.abs(np.asarray(bf16.chunk_scores) - np.asarray(first.chunk_scores)).max() < 0.05



@pytest.mark.parametrize("kind, depth", [("passkey", 0.1), ("number_string", 0.9)])
def test_one_kept_chunk_without_eviction_is_full_attention_over_it(model, kind, depth):
    task = make_task(kind, model.tokenizer, 1024, depth, seed=2)  # two chunks of at most 512: one is dropped
    config = ParallelCompConfig(chunk_len=512, top_k_chunks=1, capacity=None, num_devices=ONE_DEVICE)
    ours = answer(model, task.context, task.question, config, max_new_tokens=12)
    parts = encode_parts(model.tokenizer, task.context, task.question, config.instruction, config.answer_prefix,
                         config.chat)
    (chunk,) = ours.selected_chunks
    start, end = chunk_bounds(len(parts.context), config.chunk_len, parts.breaks)[chunk]
    full = generate_ids(model, np.concatenate([parts.prefix, parts.context[start:end], parts.question]), 12)
    assert ours.token_ids == full.token_ids, (ours.text, full.text)
