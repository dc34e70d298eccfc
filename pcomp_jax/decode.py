"""Greedy decoding, the evictions after the merge, and the full-attention baseline.

``greedy_decode`` is the decoding loop every method shares, over a ``DecodeState``
pytree; ``StageEviction`` and ``DecodeEviction`` are the optional evictions of stages 2
and 3, ranked by the method's token scorer (the merge itself is ``pcomp_jax.merge``).
``row_forward`` is the one padded full-attention row forward; ``forward`` and
``generate_full`` are the full-attention baseline built on it.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

import flax.struct

from .attention import causal_attention
from .axes import axes_field
from .buckets import bucket_length
from .compress import SnapKV, TokenScorer, keep_best_entries
from .cache import KVCache, cache_from_prefill
from .checkpoints import Model
from .errors import InputTooLongError, PcompError
from .model.config import ModelConfig
from .model.llama import Weights, cached_forward, emit_keys_values, prefill_forward

END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end_of_text|>", "<|endoftext|>", "<end_of_turn>", "</s>")


@dataclasses.dataclass
class Generation:
    """Result of a generation: the decoded ``text`` and the new ``token_ids`` (stop token excluded)."""

    text: str
    token_ids: list[int]
    prompt_length: int


def check_token_ids(token_ids, vocab_size: int) -> np.ndarray:
    """Validates token ids (1-D or 2-D, non-empty, integers in ``[0, vocab_size)``)."""
    try:
        ids = np.asarray(token_ids)
    except ValueError:  # NumPy refuses nested lists of different lengths
        ids = None
    if ids is None or ids.dtype == object:
        raise PcompError("token ids must be a 1-D list or a 2-D list of rows of equal length (a rectangular "
                         "array); pad the rows or pass them one at a time")
    if ids.ndim not in (1, 2) or ids.size == 0:
        raise PcompError(f"token ids must be a non-empty 1-D or 2-D array, got shape {ids.shape}")
    if not np.issubdtype(ids.dtype, np.integer):
        raise PcompError(f"token ids must be integers, got dtype {ids.dtype}")
    if ids.min() < 0 or ids.max() >= vocab_size:
        raise PcompError(f"token ids must lie in [0, {vocab_size}); got values from {ids.min()} to {ids.max()}")
    return ids.astype(np.int32)


def row_forward(weights: Weights, cfg: ModelConfig, tokens: jax.Array, length: jax.Array, logits_at=None,
                emit=emit_keys_values):
    """Full causal attention over padded rows, positions from 0 (traceable; callers jit).

    tokens: ``[B, Tb]`` with real tokens at ``0..length-1``; padding gets position 0 so that
    it cannot change a position-dependent rope (dynamic NTK looks at the largest).
    logits_at, emit: as in ``model.llama.prefill_forward``. Returns its ``(logits, emitted)``.
    """
    steps = jnp.arange(tokens.shape[1], dtype=jnp.int32)
    positions = jnp.broadcast_to(jnp.where(steps < length, steps, 0), tokens.shape)
    attention = causal_attention("auto", dtype=weights.embed.dtype, sliding=cfg.has_sliding_layers)
    return prefill_forward(weights, cfg, tokens, positions, logits_at=logits_at, attention=attention, emit=emit)


@functools.partial(jax.jit, static_argnames="cfg")
def _forward_jit(weights: Weights, cfg: ModelConfig, tokens: jax.Array, length: jax.Array) -> jax.Array:
    """Logits of every position of ``tokens [B, Tb]`` (``row_forward``)."""
    return row_forward(weights, cfg, tokens, length)[0]


def forward(model: Model, token_ids) -> np.ndarray:
    """Full causal attention over ``token_ids`` ``[T]`` or ``[B, T]``; positions start at 0.

    Returns float32 logits ``[..., T, vocab]`` as a NumPy array. Lengths are padded to
    a power-of-two bucket (after the real tokens, where causality hides the padding).
    """
    ids = check_token_ids(token_ids, model.config.vocab_size)
    batch = ids.reshape(-1, ids.shape[-1])
    t = batch.shape[1]
    padded = np.zeros((batch.shape[0], bucket_length(t)), np.int32)
    padded[:, :t] = batch
    logits = np.asarray(_forward_jit(model.params, model.config, jnp.asarray(padded), jnp.int32(t)))[:, :t]
    return logits.reshape(*ids.shape, -1)


def stop_token_ids(model: Model) -> list[int]:
    """EOS ids of the config and tokenizer, plus the chat template's end-of-turn tokens."""
    stops = set(model.config.eos_token_ids)
    tok = model.tokenizer
    if tok is not None:
        if tok.eos_token_id is not None:
            stops.add(int(tok.eos_token_id))
        vocab = tok.get_vocab()
        stops.update(vocab[t] for t in END_OF_TURN_TOKENS if t in vocab)
    return sorted(stops)


def encode_prompt(model: Model, prompt, chat: bool) -> np.ndarray:
    """Token ids of a prompt: a string (wrapped in the chat template when ``chat``) or ids as given."""
    if not isinstance(prompt, str):
        return check_token_ids(prompt, model.config.vocab_size).reshape(-1)
    tok = model.tokenizer
    if tok is None:
        raise PcompError(f"{model.source!r} has no tokenizer; pass token ids instead of a string")
    if not prompt.strip():
        raise PcompError("the prompt is empty; give some text to answer")
    if chat:
        if not getattr(tok, "chat_template", None):
            raise PcompError(f"{model.source!r} has no chat template; call with chat=False")
        prompt = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
    ids = tok(prompt, add_special_tokens=not chat)["input_ids"]
    if len(ids) == 0:
        raise PcompError("the prompt is empty")
    return np.asarray(ids, np.int32)


@flax.struct.dataclass
class DecodeState:
    """The greedy decoding loop's state for B rows.

    step: ``[]`` tokens emitted so far; cache: the ``KVCache`` every emitted token was fed
    to but ``token``; token, position: ``[B]`` the next token to emit and feed, and its
    position; done: ``[B]`` rows that emitted a stop token; emitted: ``[B, num_steps]`` the
    tokens emitted (-1 after a row stopped and in unused steps).
    """

    step: jax.Array = axes_field()
    cache: KVCache
    token: jax.Array = axes_field("batch")
    position: jax.Array = axes_field("batch")
    done: jax.Array = axes_field("batch")
    emitted: jax.Array = axes_field("batch", "decode_steps")

    @classmethod
    def start(cls, cache: KVCache, first_token: jax.Array, first_position: jax.Array, num_steps: int) -> "DecodeState":
        """The state before the first step: ``first_token`` ``[B]`` (predicted by the
        prefill) at ``first_position`` ``[B]``, room for ``num_steps`` tokens."""
        batch = first_token.shape[0]
        return cls(step=jnp.int32(0), cache=cache, token=first_token.astype(jnp.int32),
                   position=first_position.astype(jnp.int32), done=jnp.zeros((batch,), bool),
                   emitted=jnp.full((batch, num_steps), -1, jnp.int32))


def greedy_decode(
    weights: Weights,
    cfg: ModelConfig,
    state: DecodeState,
    stop_ids: jax.Array,
    max_new_tokens: jax.Array,
    eviction: DecodeEviction | None = None,
) -> DecodeState:
    """Greedy decoding in a ``lax.while_loop`` from ``state`` (``DecodeState.start``).

    stop_ids: ``[K]`` int32; a row stops after emitting one of them (it is recorded).
    max_new_tokens: traced limit ``<= num_steps`` (the width of ``state.emitted``).
    eviction: optional decode-time eviction (``DecodeEviction``; the cache must keep the
    attention window its scorer reads): after each step every layer and KV head drops one
    entry. Returns the final state: ``emitted`` holds the tokens (a stop token included),
    ``cache`` every emitted token fed.
    """

    def cond(state):
        return (state.step < max_new_tokens) & ~jnp.all(state.done)

    def body(state):
        emitted = state.emitted.at[:, state.step].set(jnp.where(state.done, -1, state.token))
        done = state.done | jnp.isin(state.token, stop_ids)
        logits, cache = cached_forward(weights, cfg, state.token[:, None], state.position[:, None], state.cache)
        if eviction is not None:
            cache = eviction.evict_one(cache)
        next_token = jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32)
        return DecodeState(step=state.step + 1, cache=cache, token=next_token, position=state.position + 1,
                           done=done, emitted=emitted)

    return jax.lax.while_loop(cond, body, state)


@dataclasses.dataclass(frozen=True)
class StageEviction:
    """docs/algorithm.md stage 2's optional second pass: in every layer, the merged cache's
    chunk entries are cut to ``budget`` per KV head, ranked by the method's token
    ``scorer`` (``TokenScorer.merged_scores``; SnapKV: the attention of the question's last
    ``obs_window`` tokens, max-pooled over neighbouring entries); P and the question stay.
    Static (a jit argument)."""

    budget: int
    scorer: TokenScorer = SnapKV()

    def drop_fn(self, prefix_len: int, question_len: jax.Array):
        """``drop_from_cache`` hook for ``cached_forward`` (see ``calibrate.merged_drop_fn``):
        ``drop(q [B, Qb, H, D], k_cache [B, S, KVH, D], valid [B, S, KVH], layer_index,
        query_slots [B, Qb]) -> valid [B, S, KVH]``, the entries this layer keeps.
        prefix_len: P's slots (never dropped); question_len: the real question tokens.
        In a local layer the scorer gets ``window_visible`` (what each query's window
        shows): entries no question token sees score lowest."""

        def drop(q, k_cache, valid, layer_index, query_slots, window_visible=None):
            slots = jnp.arange(k_cache.shape[1])
            question = (slots[None, None, :] == query_slots[:, :, None]).any(axis=1)  # [B, S]
            chunks = jnp.moveaxis(valid, 2, 1) & ~question[:, None, :] & (slots >= prefix_len)[None, None, :]
            window = {} if window_visible is None else {"window_visible": window_visible}
            scores = self.scorer.merged_scores(q, k_cache, valid, query_slots, question_len, chunks, **window)
            keep = keep_best_entries(scores, chunks, self.budget)
            return valid & jnp.moveaxis(keep | ~chunks, 1, 2)

        return drop


@dataclasses.dataclass(frozen=True)
class DecodeEviction:
    """docs/algorithm.md stage 3's optional dynamic eviction (the reference's ``kv_cache_dynamic``):
    every layer and KV head holds its cache at the size the question prefill left it.

    After each new token, the entries a layer and KV head holds, but its newest
    ``scorer.decode_window()`` (at least one), are ranked by the method's token ``scorer``
    (``TokenScorer.held_scores``) and the lowest-ranked one leaves that layer and head's
    cache (ties: the earliest). SnapKV ranks by the attention probabilities of its last
    ``obs_window`` queries (the question's last tokens, then the generated ones) as they
    were when each query ran, summed over the KV head's query heads and max-pooled over
    neighbouring entries in order; the cache keeps them (``KVCache.attention_window``).
    Slots are not reused: the static buffer is as for plain decoding; what attention reads
    stays at a fixed number of entries. Static (a jit argument)."""

    scorer: TokenScorer = SnapKV()

    @property
    def window(self) -> int:
        """Attention rows the cache keeps for the scorer (0: none)."""
        return self.scorer.decode_window()

    def empty_window(self, cache: KVCache) -> KVCache:
        """``cache`` with an all-zero ``attention_window`` ``[L, B, KVH, window, S]`` (unchanged
        when the scorer reads none)."""
        if self.window == 0:
            return cache
        num_layers, batch, slots, kv_heads, _ = cache.keys.shape
        return cache.replace(attention_window=jnp.zeros((num_layers, batch, kv_heads, self.window, slots),
                                                        jnp.float32))

    def last_queries(self, length: jax.Array) -> jax.Array | None:
        """``[window]`` indices of the last ``window`` of ``length`` tokens (-1 before the
        first), or None when the scorer reads none."""
        if self.window == 0:
            return None
        offsets = length - self.window + jnp.arange(self.window)
        return jnp.where(offsets >= 0, offsets, -1)

    def evict_one(self, cache: KVCache) -> KVCache:
        """Drops the lowest-ranked entry but the newest ``max(window, 1)``, in every layer,
        batch row and KV head (none where it holds no more than those)."""
        slots = jnp.arange(cache.capacity)
        valid = jnp.moveaxis(cache.valid, 3, 2)  # [L, B, KVH, S]
        held_from_here = jnp.cumsum(valid[..., ::-1], axis=-1)[..., ::-1]  # entries at this slot or later
        candidates = valid & (held_from_here > max(self.window, 1))
        scores = self.scorer.held_scores(cache.keys, cache.attention_window, cache.end, candidates)
        lowest = jnp.argmin(jnp.where(candidates, scores, jnp.inf), axis=-1)
        drop = (slots == lowest[..., None]) & candidates.any(axis=-1, keepdims=True)
        return cache.replace(valid=jnp.moveaxis(valid & ~drop, 2, 3))


decode_jit = jax.jit(greedy_decode, static_argnames=("cfg", "eviction"))


@functools.partial(jax.jit, static_argnames=("cfg", "num_steps"))
def _prefill_prompt(weights, cfg, tokens, length, num_steps):
    """tokens: ``[1, Tb]`` padded prompt; length: real prompt length (traced).
    Returns the cache (room for ``num_steps`` more tokens) and the first new token."""
    logits, (keys, values) = row_forward(weights, cfg, tokens, length, logits_at=(length - 1)[None, None])
    cache = cache_from_prefill(keys, values, length[None], tokens.shape[1] + num_steps)
    return cache, jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32)


def decode_budget(max_new_tokens: int) -> int:
    """Static decode buffer for a requested number of new tokens (a bucket)."""
    return bucket_length(max_new_tokens, minimum=16)


def finish(model: Model, out, stops, prompt_length: int) -> Generation:
    """Turns a decode buffer ``[1, num_steps]`` into ids (stop token dropped) and text."""
    new = [int(t) for t in np.asarray(out)[0] if t >= 0]
    if new and new[-1] in set(np.asarray(stops).tolist()):
        new = new[:-1]
    text = model.tokenizer.decode(new, skip_special_tokens=True) if model.tokenizer is not None else ""
    return Generation(text=text, token_ids=new, prompt_length=prompt_length)


def pad_ids(ids: np.ndarray, minimum: int = 64) -> np.ndarray:
    """``ids [T]`` padded with zeros to a static bucket (``buckets.bucket_length``)."""
    padded = np.zeros(bucket_length(len(ids), minimum=minimum), np.int32)
    padded[: len(ids)] = ids
    return padded


def generate_ids(model: Model, ids: np.ndarray, max_new_tokens: int) -> Generation:
    """Greedy full-attention generation from prompt ids ``[T]``, with no window check."""
    stops = jnp.asarray(stop_token_ids(model) or [-1], jnp.int32)
    steps = decode_budget(max_new_tokens)
    cache, first = _prefill_prompt(model.params, model.config, jnp.asarray(pad_ids(ids))[None], jnp.int32(len(ids)), steps)
    position = jnp.array([len(ids)], jnp.int32)
    state = DecodeState.start(cache, first, position, steps)
    done = decode_jit(model.params, model.config, state, stops, jnp.int32(max_new_tokens))
    return finish(model, done.emitted, stops, len(ids))


def check_max_new_tokens(max_new_tokens) -> None:
    """Refuses (``PcompError``) a ``max_new_tokens`` that is not a positive integer."""
    if not isinstance(max_new_tokens, (int, np.integer)) or isinstance(max_new_tokens, bool) or max_new_tokens < 1:
        raise PcompError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")


def generate_full(model: Model, prompt, max_new_tokens: int = 64, chat: bool = True) -> Generation:
    """Greedy generation with full attention over the whole prompt.

    prompt: a string (rendered with the chat template when ``chat``) or token ids.
    Stops at EOS or the chat template's end-of-turn token, or after ``max_new_tokens``.
    Raises ``InputTooLongError`` when prompt + new tokens exceed the model's window.
    """
    check_max_new_tokens(max_new_tokens)
    ids = encode_prompt(model, prompt, chat)
    window = model.config.window
    if len(ids) + max_new_tokens > window:
        raise InputTooLongError(
            f"the prompt has {len(ids)} tokens and max_new_tokens={max_new_tokens}; together they must fit in "
            f"the model's window of {window} tokens (full attention); shorten the prompt or use ParallelComp"
        )
    return generate_ids(model, ids, max_new_tokens)
