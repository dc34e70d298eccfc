"""Methods as small objects, and the registry that maps the config's ``method`` names to them.

A ``Method`` says how an input is read: how it is fitted to the window (``WholeInput``,
``MiddleCut``, ``RecentTail``), whether the context is cut into chunks or read as one
row, how chunks are scored and whether the best ``top_k_chunks`` are kept or all of them,
how tokens are scored for eviction (or none evicted), and whether calibration applies.
``pipeline.answer`` and ``perplexity.continuation_nll`` run any method from these fields;
no other module tests a method's name.

    @dataclasses.dataclass(frozen=True)
    class KeyNorm(compress.TokenScorer): ...
    register_method(Method("parallelcomp_keynorm", token_scorer=KeyNorm()))
    answer(model, text, question, ParallelCompConfig(method="parallelcomp_keynorm", capacity=128))
"""

from __future__ import annotations

import dataclasses

from .buckets import bucket_length
from .chunking import PromptParts, context_budget, truncate_middle
from .compress import ChunkScorer, ConfigSnapKV, QueryNLL, RecentTokens, TokenScorer
from .errors import ConfigError
from .decode import DecodeEviction, StageEviction
from .prefill import MERGE_LAYOUTS, ChunkArrangement, MergeLayout, ParallelLayout, PrefillSpec
from .registry import REGISTRY, method_names  # noqa: F401  (method_names: re-exported)


class InputFit:
    """How an input is fitted to the model's window before it is read:
    ``__call__(parts, window, room) -> PromptParts`` (room: new tokens to leave free)."""

    def __call__(self, parts: PromptParts, window: int, room: int) -> PromptParts:
        raise NotImplementedError


@dataclasses.dataclass(frozen=True)
class WholeInput(InputFit):
    """The whole context, however long (chunked methods, full attention)."""

    def __call__(self, parts, window, room):
        return parts


@dataclasses.dataclass(frozen=True)
class MiddleCut(InputFit):
    """The first and last halves of what fits (``chunking.truncate_middle``)."""

    def __call__(self, parts, window, room):
        cut = lambda a: None if a is None else truncate_middle(a, context_budget(parts, window, room))
        return dataclasses.replace(parts, context=cut(parts.context), breaks=cut(parts.breaks))


@dataclasses.dataclass(frozen=True)
class RecentTail(InputFit):
    """The most recent tokens that fit."""

    def __call__(self, parts, window, room):
        cut = lambda a: None if a is None else a[-context_budget(parts, window, room):]
        return dataclasses.replace(parts, context=cut(parts.context), breaks=cut(parts.breaks))


@dataclasses.dataclass(frozen=True)
class Method:
    """One way of reading a long input.

    name: the config's ``method`` value. fit: how the input is fitted to the window.
    chunked: cut the context into ``chunk_len`` chunks (else one row holds it all).
    chunk_scorer: ranks chunks (``compress.QueryNLL``). top_k: keep the ``top_k_chunks``
    best chunks (else every chunk is merged). token_scorer: ranks tokens for eviction
    (``compress.SnapKV``, ``compress.RecentTokens``, your own ``compress.TokenScorer``;
    the default ``compress.ConfigSnapKV`` is SnapKV with the config's ``obs_window`` and
    ``pool_kernel``, a scorer given here keeps its own fields), or None to evict nothing.
    The same scorer ranks what the stage and decode evictions drop. A chunked method evicts to the config's ``capacity`` (None: keep
    all) inside each chunk, or, with the config's ``stage_eviction``, to ``capacity x
    top_k_chunks`` over the merged cache, and with ``decode_eviction`` holds the cache at a
    fixed size while decoding; its kept chunks are merged in the config's ``merge_layout``
    (every chunk kept: always the parallel layout); a one-row method with a token scorer compresses
    its row to ``kv_budget``; a one-row method without one generates with plain full
    attention. Methods without a token scorer ignore ``capacity`` and ``stage_eviction``;
    ``decode_eviction`` acts only for chunked methods with a token scorer.
    calibration: whether stage-1c rules may be used with it.
    """

    name: str
    fit: InputFit = WholeInput()
    chunked: bool = True
    chunk_scorer: ChunkScorer = QueryNLL()
    top_k: bool = True
    token_scorer: TokenScorer | None = ConfigSnapKV()
    calibration: bool = True

    @property
    def plain_row(self) -> bool:
        """One row with full attention and nothing compressed (no chunk prefill at all)."""
        return not self.chunked and self.token_scorer is None

    def chunk_len(self, config, parts: PromptParts) -> int:
        """Most context tokens per chunk: the config's, or the whole (fitted) context."""
        return config.chunk_len if self.chunked else len(parts.context)

    def chunk_overlap(self, config) -> int:
        """Tokens a chunk repeats from before its start (one-row methods have one chunk)."""
        return config.chunk_overlap if self.chunked else 0

    def capacity(self, config) -> int | None:
        """Tokens kept per chunk, layer and KV head before the row-length clamp (None: all)."""
        if self.token_scorer is None:
            return None
        if not self.chunked:
            return config.baseline_kv_budget
        return None if config.stage_eviction else config.capacity  # stage eviction: after the merge

    def token_scorer_for(self, config) -> TokenScorer | None:
        """The token scorer that acts under ``config`` (``TokenScorer.for_config``), or None."""
        return None if self.token_scorer is None else self.token_scorer.for_config(config)

    def stage_eviction(self, config):
        """The merged cache's eviction (``decode.StageEviction``, by this method's token
        scorer) under ``config``, or None."""
        if not (config.stage_eviction and self.chunked and self.token_scorer is not None):
            return None
        return StageEviction(config.capacity * config.top_k_chunks, self.token_scorer_for(config))

    def merge_layout(self, config) -> MergeLayout:
        """Where the kept chunks sit for the question: the config's ``merge_layout`` for a
        method that keeps its top-k chunks; a method that keeps every chunk (pcw) lays them
        at their own positions whatever the config says (laid end to end, every chunk would
        be the whole input)."""
        return MERGE_LAYOUTS[config.merge_layout] if self.top_k else ParallelLayout()

    def arrangement(self, config) -> ChunkArrangement:
        """Which kept chunks stage 2 reads and in what order (``prefill.ChunkArrangement``):
        the config's ``chunk_order``, ``chunk_score_margin`` and ``chunk_answers`` for a method
        that keeps its top-k chunks; a method that keeps every chunk (pcw) reads them all
        together, in document order."""
        if not self.top_k:
            return ChunkArrangement()
        return ChunkArrangement(config.chunk_order, config.chunk_score_margin, config.chunk_answers)

    def decode_eviction(self, config):
        """The decode-time eviction (``decode.DecodeEviction``) under ``config``, or None."""
        if not (config.decode_eviction and self.chunked and self.token_scorer is not None):
            return None
        return DecodeEviction(self.token_scorer_for(config))

    def kept_chunks(self, config, num_chunks: int) -> int:
        """Chunks kept: ``top_k_chunks``, or every chunk (as a bucket, so shapes stay few)."""
        return config.top_k_chunks if self.top_k else bucket_length(num_chunks, minimum=1)

    def prefill_spec(self, config, chunk_rules: tuple = ()) -> PrefillSpec:
        """The static settings of this method's chunk prefill under ``config``."""
        # Without eviction every scorer keeps the same tokens; SnapKV's keeps the compiled
        # prefill the one of the evicting methods (so the chunk scores agree to the bit).
        scorer = ConfigSnapKV() if self.token_scorer is None else self.token_scorer
        # Split over model_parallel devices, the prefill needs a backend XLA can partition.
        attention = "blockwise" if config.model_parallel > 1 and config.attention == "auto" else config.attention
        return PrefillSpec(capacity=self.capacity(config), token_scorer=scorer.for_config(config),
                           chunk_scorer=self.chunk_scorer, attention=attention, chunk_rules=tuple(chunk_rules))

    def check_calibration(self, rules) -> None:
        """Refuses calibration rules for a method that does not take them."""
        if rules and not self.calibration:
            takers = ", ".join(m.name for m in REGISTRY.values() if m.calibration)
            raise ConfigError(f"calibration applies to the chunked methods ({takers}), not {self.name!r}")


def register_method(method: Method, replace: bool = False) -> Method:
    """Makes ``method`` available as ``ParallelCompConfig(method=method.name)``."""
    if not isinstance(method, Method):
        raise ConfigError(f"register_method takes a pcomp_jax.Method, got {type(method).__name__}")
    if method.name in REGISTRY and not replace:
        raise ConfigError(f"a method named {method.name!r} is registered already; pass replace=True to replace it")
    REGISTRY[method.name] = method
    return method


def unregister_method(name: str) -> None:
    """Removes a method registered with ``register_method``."""
    REGISTRY.pop(name, None)


def get_method(name: str) -> Method:
    """The registered method called ``name``."""
    if name not in REGISTRY:
        raise ConfigError(f"method={name!r} is not allowed; choose one of: {', '.join(REGISTRY)}")
    return REGISTRY[name]


for _method in (
    # docs/algorithm.md: chunks, the top_k_chunks best by query NLL, SnapKV eviction to `capacity`.
    Method("parallelcomp"),
    # Parallel context windows: every chunk merged, nothing evicted.
    Method("pcw", top_k=False, token_scorer=None),
    # The whole input as one row with full attention (positions past the window if longer).
    Method("full", chunked=False, top_k=False, token_scorer=None, calibration=False),
    # The first and last halves of the window, full attention.
    Method("truncate", fit=MiddleCut(), chunked=False, top_k=False, token_scorer=None, calibration=False),
    # SnapKV on the truncated input: kv_budget context tokens per layer and KV head.
    Method("snapkv", fit=MiddleCut(), chunked=False, top_k=False, calibration=False),
    # StreamingLLM: P as attention sinks plus the kv_budget most recent tokens.
    Method("streaming", fit=RecentTail(), chunked=False, top_k=False, token_scorer=RecentTokens(), calibration=False),
):
    register_method(_method)
