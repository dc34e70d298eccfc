"""Perplexity past the trained window: the NLL of M continuation tokens after a T-token prefix.

Every method reads the same tokens: the prefix ``x[:T]`` and the continuation ``x[T:T+M]``
of one text. The continuation is scored, never used to choose what is kept:

The prefix is split into P (its first token: the attention sink every row shares), the
context ``x[1:T-q]`` and a query ``x[T-q:T]`` (its last ``query_len`` tokens), then fitted
to the window by the method (``Method.fit``, room left for the M scored tokens):

- a plain one-row method (``full``, ``truncate``): one causal row P + context + query +
  continuation (``full``: positions past the window when T + M > W);
- any other method (``parallelcomp``, ``pcw``, ``snapkv``, ``streaming``): the query plays
  the question's part in stage 1 (it scores the chunks and, with SnapKV, the tokens); stage
  2 then runs query + continuation on the merged cache (``decode.merged_forward``, in the
  config's ``merge_layout``; ``reprefill``: P + the kept chunks + query + continuation as
  one row), and the continuation's logits are scored.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

from .checkpoints import Model
from .chunking import PromptParts
from .config import ConfigError, ParallelCompConfig
from .decode import merged_forward, pad_ids, row_forward
from .errors import PcompError
from .methods import get_method
from .model.config import ModelConfig
from .model.llama import Weights
from .pipeline import calibration_rules, check_laid_out_fits, merge_layout, prefill_context, reprefill_ids, stage_rules
from .prefill import ChunkSelection, MergeLayout, ParallelLayout


@dataclasses.dataclass
class ContinuationScore:
    """token_nll: ``[M]`` NLL (nats) of each continuation token; chunks: kept chunks (chunked methods)."""

    token_nll: np.ndarray
    selected_chunks: list[int]

    @property
    def mean_nll(self) -> float:
        return float(np.mean(self.token_nll))

    @property
    def perplexity(self) -> float:
        return float(np.exp(self.mean_nll))


def token_nll(logits: jax.Array, targets: jax.Array, mask: jax.Array) -> jax.Array:
    """logits ``[N, V]``, targets ``[N]``, mask ``[N]`` -> per-token NLL ``[N]`` (0 where masked)."""
    return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets) * mask


@functools.partial(jax.jit, static_argnames="cfg")
def _row_nll(weights: Weights, cfg: ModelConfig, tokens, length, predict_at, targets, mask):
    """tokens ``[1, Tb]`` (real up to ``length``); predict_at ``[M]``: rows whose logits predict
    ``targets`` ``[M]``. Returns the NLL ``[M]``."""
    logits, _ = row_forward(weights, cfg, tokens, length, logits_at=predict_at[None], emit=lambda *_: ())
    return token_nll(logits[0], targets, mask)


@functools.partial(jax.jit, static_argnames=("cfg", "merged_rules", "layout", "eviction"))
def _merged_tail_nll(
    weights, cfg, prefix_keys, prefix_values, selection: ChunkSelection, tail, tail_len, query_len, targets, mask,
    merged_rules=(), layout: MergeLayout = ParallelLayout(), eviction=None,
):
    """Stage 2 with a scored tail: ``tail`` ``[Tb]`` = query + continuation (real up to
    ``tail_len``) run on the merged cache (``decode.merged_forward``; calibration's queries
    are the query's); the logits at tail index i predict ``targets[i]``. Returns the NLL
    ``[Tb]`` (0 where ``mask`` is)."""
    logits, _, _ = merged_forward(weights, cfg, prefix_keys, prefix_values, selection, tail, tail_len,
                                  tail.shape[0], merged_rules, rule_queries=query_len, layout=layout,
                                  eviction=eviction)
    return token_nll(logits, targets, mask)


def _plain_row_nll(model: Model, prompt_ids: np.ndarray, continuation_ids: np.ndarray) -> np.ndarray:
    """NLL ``[M]`` of the continuation after ``prompt_ids`` as one full-attention row."""
    ids = np.concatenate([prompt_ids, continuation_ids])
    m = len(continuation_ids)
    predict_at = np.arange(len(ids) - m - 1, len(ids) - 1, dtype=np.int32)
    nll = _row_nll(model.params, model.config, jnp.asarray(pad_ids(ids))[None], jnp.int32(len(ids)),
                   jnp.asarray(predict_at), jnp.asarray(continuation_ids), jnp.ones(m, jnp.float32))
    return np.asarray(nll)


def check_split(prefix_ids: np.ndarray, continuation_ids: np.ndarray, query_len: int) -> None:
    if len(continuation_ids) < 1:
        raise PcompError("the continuation has no tokens to score")
    if query_len < 1:
        raise PcompError(f"query_len must be >= 1, got {query_len}")
    if len(prefix_ids) < query_len + 2:
        raise PcompError(
            f"the prefix has {len(prefix_ids)} tokens; it needs at least query_len + 2 = {query_len + 2} "
            "(a sink token, some context and the query)"
        )


def continuation_nll(
    model: Model,
    prefix_ids,
    continuation_ids,
    config: ParallelCompConfig | None = None,
    query_len: int = 64,
) -> ContinuationScore:
    """NLL of ``continuation_ids`` after ``prefix_ids`` (1-D token ids) with ``config.method``."""
    config = ParallelCompConfig() if config is None else config
    prefix_ids = np.asarray(prefix_ids, np.int32)
    continuation_ids = np.asarray(continuation_ids, np.int32)
    check_split(prefix_ids, continuation_ids, query_len)
    m = len(continuation_ids)
    method = get_method(config.method)
    if method.decode_eviction(config) is not None:
        raise ConfigError("decode_eviction acts while generating; perplexity scores the continuation in one pass "
                          "on the merged cache, so it cannot apply: turn it off for perplexity")
    rules = calibration_rules(config, model.config.num_layers)
    parts = PromptParts(prefix=prefix_ids[:1], context=prefix_ids[1:-query_len], question=prefix_ids[-query_len:])
    parts = method.fit(parts, model.config.window, m)
    layout = merge_layout(model, config)
    if method.plain_row:
        return ContinuationScore(_plain_row_nll(model, np.concatenate([parts.prefix, parts.context, parts.question]),
                                                continuation_ids), [])
    pre = prefill_context(model, parts, config, stage_rules(rules, "chunk"), method=method)
    check_laid_out_fits(model, pre.parts, pre.kept_lengths, layout, m)
    if layout.reprefills:
        return ContinuationScore(_plain_row_nll(model, reprefill_ids(pre), continuation_ids), pre.selected_chunks)
    tail = np.concatenate([parts.question, continuation_ids])
    padded = pad_ids(tail, minimum=16)
    tb, q = len(padded), len(parts.question)
    targets = np.zeros(tb, np.int32)
    targets[: len(tail) - 1] = tail[1:]  # logits at tail index i predict tail[i + 1]
    mask = ((np.arange(tb) >= q - 1) & (np.arange(tb) < len(tail) - 1)).astype(np.float32)
    nll = _merged_tail_nll(
        pre.weights, model.config, pre.prefix_keys, pre.prefix_values, pre.selection, jnp.asarray(padded),
        jnp.int32(len(tail)), jnp.int32(q), jnp.asarray(targets), jnp.asarray(mask), stage_rules(rules, "merged"),
        layout, method.stage_eviction(config),
    )
    return ContinuationScore(np.asarray(nll)[q - 1 : len(tail) - 1], pre.selected_chunks)


def text_windows(ids: np.ndarray, prefix_lengths, continuation_len: int, samples: int, seed: int = 0):
    """``{T: [(prefix, continuation)] * samples}`` cut from token ids ``[N]``.

    Each sample's continuation (``continuation_len`` tokens) is chosen once, at a
    seed-chosen, evenly spread place, and every prefix length T takes the T tokens right
    before it: perplexity at different T scores the same tokens, so a curve over T shows
    the effect of the context alone. Raises ``PcompError`` when the text is too short.
    """
    longest = max(prefix_lengths)
    need = longest + continuation_len
    if len(ids) < need:
        raise PcompError(f"the text has {len(ids)} tokens; prefix {longest} + continuation {continuation_len} need {need}")
    rng = np.random.default_rng(seed)
    span = len(ids) - need
    starts = [longest + int(rng.integers(i * span // samples, (i + 1) * span // samples + 1)) for i in range(samples)]
    return {t: [(ids[s - t : s], ids[s : s + continuation_len]) for s in starts] for t in prefix_lengths}
