"""Question prefill on the merged cache, greedy decoding, and the full-attention baseline.

``merged_forward`` is stage 2 of ParallelComp: the merge of a ``prefill.ChunkSelection``
and a run of new tokens on top of it; ``question_prefill`` runs the question that way and
``greedy_decode`` is the decoding loop that every method shares (``decode_selection`` does
both from host-side ids). ``row_forward`` is the one padded full-attention row forward;
``forward`` and ``generate_full`` are the full-attention baseline built on it.
"""

from __future__ import annotations

import dataclasses
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np

from .attention import causal_attention, query_probs
from .buckets import bucket_length
from .calibrate import merged_drop_fn
from .compress import keep_best_entries, pool_in_order
from .cache import KVCache, cache_from_prefill
from .checkpoints import Model
from .errors import InputTooLongError, PcompError
from .model.config import ModelConfig
from .model.llama import Weights, cached_forward, emit_keys_values, prefill_forward
from .prefill import ChunkSelection, MergeLayout, ParallelLayout, merge_selection

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
    attention = causal_attention("auto", dtype=weights.embed.dtype)
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


def greedy_decode(
    weights: Weights,
    cfg: ModelConfig,
    cache: KVCache,
    first_token: jax.Array,
    first_position: jax.Array,
    stop_ids: jax.Array,
    num_steps: int,
    max_new_tokens: jax.Array,
    eviction: DecodeEviction | None = None,
):
    """Greedy decoding in a ``lax.while_loop``.

    first_token, first_position: ``[B]``, the token predicted by the prefill and its position.
    stop_ids: ``[K]`` int32; a row stops after emitting one of them (it is recorded).
    num_steps: static buffer size; max_new_tokens: traced limit ``<= num_steps``.
    eviction: optional decode-time eviction (``DecodeEviction``; the cache must keep an
    ``attention_window``): after each step every layer and KV head drops one entry.
    Returns ``(tokens [B, num_steps] int32, cache)``: the emitted tokens (a stop token
    included), -1 after a row stopped and in unused steps; the cache after the last step
    (every emitted token fed).
    """
    batch = first_token.shape[0]

    def cond(state):
        step, _, _, _, done, _ = state
        return (step < max_new_tokens) & ~jnp.all(done)

    def body(state):
        step, cache, token, position, done, out = state
        out = out.at[:, step].set(jnp.where(done, -1, token))
        done = done | jnp.isin(token, stop_ids)
        logits, cache = cached_forward(weights, cfg, token[:, None], position[:, None], cache)
        if eviction is not None:
            cache = eviction.evict_one(cache)
        next_token = jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32)
        return step + 1, cache, next_token, position + 1, done, out

    state = (
        jnp.int32(0),
        cache,
        first_token.astype(jnp.int32),
        first_position.astype(jnp.int32),
        jnp.zeros((batch,), bool),
        jnp.full((batch, num_steps), -1, jnp.int32),
    )
    _, cache, _, _, _, out = jax.lax.while_loop(cond, body, state)
    return out, cache


@dataclasses.dataclass(frozen=True)
class StageEviction:
    """docs/algorithm.md stage 2's optional second SnapKV pass: in every layer, the merged cache's
    chunk entries are cut to ``budget`` per KV head by the attention of the last
    ``obs_window`` question tokens (summed over them and the KV head's query heads,
    max-pooled over neighbouring entries with ``pool_kernel``); P and the question stay.
    Static (a jit argument)."""

    budget: int
    obs_window: int = 8
    pool_kernel: int = 7

    def drop_fn(self, prefix_len: int, question_len: jax.Array):
        """``drop_from_cache`` hook for ``cached_forward`` (see ``calibrate.merged_drop_fn``)."""

        def drop(q, k_cache, valid, layer_index, query_slots):
            s = k_cache.shape[1]
            slots = jnp.arange(s)
            question = (slots[None, None, :] == query_slots[:, :, None]).any(axis=1)  # [B, S]
            valid_h = jnp.moveaxis(valid, 2, 1)  # [B, KVH, S]
            chunks = valid_h & ~question[:, None, :] & (slots >= prefix_len)[None, None, :]
            w = self.obs_window
            offsets = question_len - w + jnp.arange(w)  # the last w question tokens (fewer if Q is shorter)
            idx = jnp.clip(offsets, 0, q.shape[1] - 1)
            q_slot = query_slots[:, idx]  # [B, w]
            seen = (valid_h | question[:, None, :])[:, :, None, :] & (slots[None, None, :] <= q_slot[:, :, None])[:, None]
            probs = query_probs(q[:, idx], k_cache, seen) * (offsets >= 0)[None, None, None, :, None]
            scores = pool_in_order(probs.sum(axis=(2, 3)), chunks, self.pool_kernel)
            keep = keep_best_entries(scores, chunks, self.budget)
            return valid & jnp.moveaxis(keep | ~chunks, 1, 2)

        return drop


@dataclasses.dataclass(frozen=True)
class DecodeEviction:
    """docs/algorithm.md stage 3's optional dynamic eviction (the reference's ``kv_cache_dynamic``):
    every layer and KV head holds its cache at the size the question prefill left it.

    The cache keeps the attention probabilities of its last ``obs_window`` queries (the
    question's last tokens, then the generated ones) as they were when each query ran,
    summed over the KV head's query heads (``KVCache.attention_window``). After each new
    token, the entries a layer and KV head holds, but its newest ``obs_window``, are scored
    by the sum of those rows, max-pooled over neighbouring entries in order (``pool_kernel``),
    and the lowest-scored one leaves that layer and head's cache (ties: the earliest). Slots
    are not reused: the static buffer is as for plain decoding; what attention reads stays
    at a fixed number of entries. Static (a jit argument)."""

    obs_window: int = 8
    pool_kernel: int = 7

    def empty_window(self, cache: KVCache) -> KVCache:
        """``cache`` with an all-zero ``attention_window`` ``[L, B, KVH, obs_window, S]``."""
        num_layers, batch, slots, kv_heads, _ = cache.keys.shape
        return cache.replace(attention_window=jnp.zeros((num_layers, batch, kv_heads, self.obs_window, slots),
                                                        jnp.float32))

    def last_queries(self, length: jax.Array) -> jax.Array:
        """``[obs_window]`` indices of the last ``obs_window`` of ``length`` tokens (-1 before the first)."""
        offsets = length - self.obs_window + jnp.arange(self.obs_window)
        return jnp.where(offsets >= 0, offsets, -1)

    def evict_one(self, cache: KVCache) -> KVCache:
        """Drops the lowest-scored entry but the newest ``obs_window``, in every layer, batch
        row and KV head (none where it holds no more than those)."""
        slots = jnp.arange(cache.capacity)
        valid = jnp.moveaxis(cache.valid, 3, 2)  # [L, B, KVH, S]
        held_from_here = jnp.cumsum(valid[..., ::-1], axis=-1)[..., ::-1]  # entries at this slot or later
        candidates = valid & (held_from_here > self.obs_window)
        pooled = pool_in_order(cache.attention_window.sum(axis=3), candidates, self.pool_kernel)
        lowest = jnp.argmin(jnp.where(candidates, pooled, jnp.inf), axis=-1)
        drop = (slots == lowest[..., None]) & candidates.any(axis=-1, keepdims=True)
        return cache.replace(valid=jnp.moveaxis(valid & ~drop, 2, 3))


def chain_drops(*drops):
    """One ``drop_from_cache`` hook applying the given ones (None skipped) in order; None if none."""
    drops = [d for d in drops if d is not None]
    if not drops:
        return None

    def drop(q, k_cache, valid, layer_index, query_slots):
        for d in drops:
            valid = d(q, k_cache, valid, layer_index, query_slots)
        return valid

    return drop


def merged_forward(
    weights, cfg, prefix_keys, prefix_values, selection: ChunkSelection, tokens, length, room: int,
    merged_rules: tuple = (), rule_queries=None, layout: MergeLayout = ParallelLayout(),
    eviction: StageEviction | None = None, decode_eviction: DecodeEviction | None = None,
):
    """Stage 2 (traceable; callers jit): merge the selection, then run ``tokens`` on top of it.

    tokens: ``[Tb]`` padded ids, real up to ``length`` (traced); they take positions from the
    longest kept row on, padding at that first position (no new largest position).
    room: free cache slots after the kept chunks (``>= Tb``). merged_rules: stage-``merged``
    calibration rules, whose queries are the last of the first ``rule_queries`` tokens
    (default ``length``); removed entries leave that layer's cache. layout: where the kept
    chunks sit (``prefill.MergeLayout``). eviction: the optional stage eviction
    (``StageEviction``), after calibration, observing the same queries. decode_eviction:
    the cache keeps the attention of the last ``obs_window`` of the ``length`` tokens
    (``DecodeEviction``).
    Returns ``(logits [Tb, V] float32, cache, first_position)``.
    """
    cache, start = merge_selection(prefix_keys, prefix_values, selection, room, layout, cfg)
    steps = jnp.arange(tokens.shape[0], dtype=jnp.int32)
    positions = (start + jnp.where(steps < length, steps, 0))[None]
    rule_queries = length if rule_queries is None else rule_queries
    drop = chain_drops(merged_drop_fn(merged_rules, rule_queries) if merged_rules else None,
                       eviction.drop_fn(prefix_keys.shape[1], rule_queries) if eviction is not None else None)
    observe_at = None
    if decode_eviction is not None:
        cache, observe_at = decode_eviction.empty_window(cache), decode_eviction.last_queries(length)
    logits, cache = cached_forward(weights, cfg, tokens[None], positions, cache, drop_from_cache=drop,
                                   observe_at=observe_at)
    return logits[0], cache, start


@functools.partial(jax.jit, static_argnames=("cfg", "num_steps", "merged_rules", "layout", "eviction",
                                             "decode_eviction"))
def question_prefill(
    weights, cfg, prefix_keys, prefix_values, selection: ChunkSelection, question, question_len, num_steps,
    merged_rules: tuple = (), layout: MergeLayout = ParallelLayout(), eviction: StageEviction | None = None,
    decode_eviction: DecodeEviction | None = None,
):
    """Stage 2: merge the selection and run the question on top of it (``merged_forward``).

    question: ``[Qb]`` padded ids; question_len: real length. ``merged_rules``: stage-``merged``
    calibration rules (removed entries leave that layer's cache). ``decode_eviction``: the
    returned cache keeps the attention of the question's last ``obs_window`` tokens for it.
    Returns the cache ready for decoding ``num_steps`` tokens, the first answer token ``[1]``
    and its position ``[1]``.
    """
    qb = question.shape[0]
    logits, cache, start = merged_forward(
        weights, cfg, prefix_keys, prefix_values, selection, question, question_len, qb + num_steps, merged_rules,
        layout=layout, eviction=eviction, decode_eviction=decode_eviction,
    )
    end = cache.end - qb + question_len  # drop the question's padding from the cache
    valid = cache.valid & (jnp.arange(cache.capacity) < end[:, None])[None, :, :, None]
    cache = cache.replace(valid=valid, end=end)
    first = jnp.argmax(logits[question_len - 1]).astype(jnp.int32)
    return cache, first[None], (start + question_len)[None]


decode_jit = jax.jit(greedy_decode, static_argnames=("cfg", "num_steps", "eviction"))


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


def decode_selection(
    model: Model, weights: Weights, prefix_keys, prefix_values, selection: ChunkSelection, question_ids,
    max_new_tokens: int, merged_rules: tuple = (), timings: dict | None = None,
    layout: MergeLayout = ParallelLayout(), eviction: StageEviction | None = None,
    decode_eviction: DecodeEviction | None = None,
) -> Generation:
    """Stages 2 and 3 from host-side ids: the question ``question_ids [Q]`` (the prompt's part
    Q) prefilled on the merged selection, then greedy decoding of up to ``max_new_tokens``
    (stops at the model's stop tokens). ``weights``: as used for the selection (sharded or not).
    eviction, decode_eviction: the optional stage and decode-time evictions.
    ``timings``, when given, gets the seconds of ``question_prefill`` and ``decode``.
    """
    check_max_new_tokens(max_new_tokens)
    timings = {} if timings is None else timings
    t = time.perf_counter()
    question_ids = np.asarray(question_ids, np.int32)
    steps = decode_budget(max_new_tokens)
    cache, first, position = question_prefill(
        weights, model.config, prefix_keys, prefix_values, selection, jnp.asarray(pad_ids(question_ids, minimum=16)),
        jnp.int32(len(question_ids)), steps, merged_rules=tuple(merged_rules), layout=layout, eviction=eviction,
        decode_eviction=decode_eviction,
    )
    jax.block_until_ready(cache)
    now = time.perf_counter()
    timings["question_prefill"] = timings.get("question_prefill", 0.0) + now - t
    stops = jnp.asarray(stop_token_ids(model) or [-1], jnp.int32)
    out, _ = decode_jit(weights, model.config, cache, first, position, stops, steps, jnp.int32(max_new_tokens),
                        decode_eviction)
    gen = finish(model, out, stops, prefix_keys.shape[1] + len(question_ids))
    timings["decode"] = timings.get("decode", 0.0) + time.perf_counter() - now
    return gen


def generate_ids(model: Model, ids: np.ndarray, max_new_tokens: int) -> Generation:
    """Greedy full-attention generation from prompt ids ``[T]``, with no window check."""
    stops = jnp.asarray(stop_token_ids(model) or [-1], jnp.int32)
    steps = decode_budget(max_new_tokens)
    cache, first = _prefill_prompt(model.params, model.config, jnp.asarray(pad_ids(ids))[None], jnp.int32(len(ids)), steps)
    position = jnp.array([len(ids)], jnp.int32)
    out, _ = decode_jit(model.params, model.config, cache, first, position, stops, steps, jnp.int32(max_new_tokens))
    return finish(model, out, stops, len(ids))


def check_max_new_tokens(max_new_tokens) -> None:
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
