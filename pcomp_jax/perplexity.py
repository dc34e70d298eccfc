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
  2 then runs query + continuation on the merged cache (``merge.merged_forward``, in the
  config's ``merge_layout``; ``reprefill``: P + the kept chunks + query + continuation as
  one row), and the continuation's logits are scored.
"""

from __future__ import annotations

import dataclasses
import functools

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

from .checkpoints import Model
from .chunking import PromptParts
from .config import ConfigError, ParallelCompConfig
from .axes import axes_field
from .decode import pad_ids, row_forward
from .errors import PcompError
from .merge import ContextCache, MergeSpec, merged_forward
from .model.config import ModelConfig
from .model.llama import Weights
from .pipeline import run_plan
from .plans import plan


@dataclasses.dataclass
class ContinuationScore:
    """token_nll: ``[M]`` NLL (nats) of each continuation token; selected_chunks: the kept
    chunks (chunked methods; empty for one-row methods)."""

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


@flax.struct.dataclass
class ScoredTail:
    """Tokens run on the merged cache whose next-token NLL is scored.

    tokens: ``[Tb]`` the query and the continuation, padded (real up to ``length``);
    query_len: ``[]`` the query's length (the calibration and stage eviction observe it);
    targets: ``[Tb]`` the token each position's logits predict; mask: ``[Tb]`` float32,
    1 where that NLL counts.
    """

    tokens: jax.Array = axes_field("tokens")
    length: jax.Array = axes_field()
    query_len: jax.Array = axes_field()
    targets: jax.Array = axes_field("tokens")
    mask: jax.Array = axes_field("tokens")

    @classmethod
    def of(cls, query_ids: np.ndarray, continuation_ids: np.ndarray) -> "ScoredTail":
        """The tail ``query + continuation`` scoring the continuation's tokens."""
        tail = np.concatenate([query_ids, continuation_ids]).astype(np.int32)
        padded = pad_ids(tail, minimum=16)
        tb, q = len(padded), len(query_ids)
        targets = np.zeros(tb, np.int32)
        targets[: len(tail) - 1] = tail[1:]  # logits at tail index i predict tail[i + 1]
        mask = ((np.arange(tb) >= q - 1) & (np.arange(tb) < len(tail) - 1)).astype(np.float32)
        return cls(jnp.asarray(padded), jnp.int32(len(tail)), jnp.int32(q), jnp.asarray(targets), jnp.asarray(mask))


@functools.partial(jax.jit, static_argnames=("cfg", "spec"))
def merged_tail_nll(weights: Weights, cfg: ModelConfig, context: ContextCache, tail: ScoredTail,
                    spec: MergeSpec) -> jax.Array:
    """Stage 2 with a scored tail instead of decoding: ``tail.tokens`` run on the merged
    cache (``merged_forward``; calibration and stage eviction observe the query). Returns
    the NLL ``[Tb]`` of each position's target (0 where ``tail.mask`` is)."""
    logits, _, _ = merged_forward(weights, cfg, context, tail.tokens, tail.length, spec, room=tail.tokens.shape[0],
                                  rule_queries=tail.query_len)
    return token_nll(logits, tail.targets, tail.mask)


def _plain_row_nll(model: Model, prompt_ids: np.ndarray, continuation_ids: np.ndarray) -> np.ndarray:
    """NLL ``[M]`` of the continuation after ``prompt_ids`` as one full-attention row."""
    ids = np.concatenate([prompt_ids, continuation_ids])
    m = len(continuation_ids)
    predict_at = np.arange(len(ids) - m - 1, len(ids) - 1, dtype=np.int32)
    nll = _row_nll(model.params, model.config, jnp.asarray(pad_ids(ids))[None], jnp.int32(len(ids)),
                   jnp.asarray(predict_at), jnp.asarray(continuation_ids), jnp.ones(m, jnp.float32))
    return np.asarray(nll)


def check_split(prefix_ids: np.ndarray, continuation_ids: np.ndarray, query_len: int) -> None:
    """Refuses (``PcompError``) an empty continuation, ``query_len < 1``, or a prefix too short
    for a sink token, some context and the query."""
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
    plan_ = plan(model, config)
    if plan_.merge.decode_eviction is not None:
        raise ConfigError("decode_eviction acts while generating; perplexity scores the continuation in one pass "
                          "on the merged cache, so it cannot apply: turn it off for perplexity")
    parts = PromptParts(prefix=prefix_ids[:1], context=prefix_ids[1:-query_len], question=prefix_ids[-query_len:])
    token_nll, pre = run_plan(model, plan_, parts, ScoreContinuation(continuation_ids))
    return ContinuationScore(token_nll, [] if pre is None else pre.read_chunks(plan_.merge.arrangement))


@dataclasses.dataclass(frozen=True, eq=False)
class ScoreContinuation:
    """What stage 2 ends in for perplexity (a ``pipeline.run_plan`` task, like
    ``pipeline.Decode``): the continuation ``[M]`` scored after the query, on one
    full-attention row (``on_row``) or on the merged cache (``on_merged``); ``room``: M.
    Both return the NLL ``[M]`` of each continuation token."""

    continuation: np.ndarray

    @property
    def room(self) -> int:
        return len(self.continuation)

    def on_row(self, model: Model, ids: np.ndarray) -> np.ndarray:
        return _plain_row_nll(model, ids, self.continuation)

    def on_merged(self, model: Model, plan_, pre, timings: dict) -> np.ndarray:
        q, m = len(pre.parts.question), len(self.continuation)
        nll = merged_tail_nll(pre.weights, model.config, pre.context, ScoredTail.of(pre.parts.question,
                                                                                      self.continuation), plan_.merge)
        return np.asarray(nll)[q - 1 : q + m - 1]


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
