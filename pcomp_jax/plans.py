"""A config resolved against a model once: ``plan(model, config) -> Plan``.

The ``Plan`` is what every entry point runs (``pipeline.answer``, ``Document.ask``,
``perplexity.continuation_nll``, the memory estimate, the evaluation runner): the
registered method, how the input is fitted and chunked, how many chunks are kept, the
static ``prefill.PrefillSpec`` of stage 1 and the static ``merge.MergeSpec`` of stage 2.
Every check that involves more than one setting, or a setting and the model, is made
here, before any input is read. A plan is frozen and hashable.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from .calibrate import check_rules_fit, preset_rules
from .checkpoints import Model
from .chunking import PromptParts, Rows, build_rows, chunk_bounds
from .config import ConfigError, ParallelCompConfig
from .errors import InputTooLongError
from .merge import MergeSpec
from .methods import Method, get_method
from .prefill import PrefillSpec, rope_shift_is_exact
from .sharding import check_model_fits_mesh, make_mesh


@dataclasses.dataclass(frozen=True)
class Plan:
    """What a ``ParallelCompConfig`` means for one model.

    config: the config; method: its registered ``methods.Method``; window: the model's
    trained window; prefill: stage 1's static settings (capacity, token and chunk scorers,
    attention backend, stage-``chunk`` calibration rules); merge: stage 2's (layout,
    stage-``merged`` calibration rules, stage and decode eviction).
    """

    config: ParallelCompConfig
    method: Method
    window: int
    prefill: PrefillSpec
    merge: MergeSpec

    @property
    def plain_row(self) -> bool:
        """The input is read as one full-attention row, with no chunk prefill."""
        return self.method.plain_row

    @property
    def lays_end_to_end(self) -> bool:
        """The kept chunks are laid one after another (sequential) or read again (reprefill):
        P + kept chunks + Q + the answer must then fit in the window."""
        return self.merge.layout.moves_keys or self.merge.layout.reprefills

    def fit(self, parts: PromptParts, room: int) -> PromptParts:
        """``parts`` fitted to the window with ``room`` new tokens (``Method.fit``)."""
        return self.method.fit(parts, self.window, room)

    def chunk_bounds(self, parts: PromptParts) -> list[tuple[int, int]]:
        """``(start, end)`` of every chunk of ``parts.context`` (``chunking.chunk_bounds``)."""
        breaks = parts.breaks if self.config.sentence_chunks else None
        return chunk_bounds(len(parts.context), self.method.chunk_len(self.config, parts), breaks,
                            self.method.chunk_overlap(self.config))

    def rows(self, parts: PromptParts) -> Rows:
        """The chunk rows ``P + chunk + Q`` of ``parts`` (``chunking.build_rows``)."""
        if not self.config.sentence_chunks:
            parts = dataclasses.replace(parts, breaks=None)
        return build_rows(parts, self.method.chunk_len(self.config, parts), self.window,
                          score_last_tokens=self.config.score_last_tokens,
                          overlap=self.method.chunk_overlap(self.config))

    def top_k(self, num_chunks: int) -> int:
        """Chunks kept of ``num_chunks`` (``Method.kept_chunks``)."""
        return self.method.kept_chunks(self.config, num_chunks)

    def mesh(self):
        """The ``(chunk, model)`` device mesh (``sharding.make_mesh``)."""
        return make_mesh(self.config.num_devices, self.config.model_parallel)

    @property
    def stage1_key(self) -> tuple:
        """Equal for plans whose stage 1 computes the same (the merge and what follows may
        differ): a key for keeping one chunk prefill for several plans."""
        c = self.config
        return (self.method.name, self.prefill, c.chunk_len, c.sentence_chunks, c.chunk_overlap, c.top_k_chunks,
                c.score_last_tokens, c.group_size, c.num_devices, c.model_parallel, c.instruction, c.answer_prefix,
                c.chat)

    def check_fits(self, parts: PromptParts, kept_lengths, room: int, fewest: bool = False) -> None:
        """Laid end to end (sequential, reprefill), P + the kept chunks (``kept_lengths``,
        their token counts) + Q + ``room`` new tokens must fit in the window. ``fewest``:
        the lengths are the shortest chunks any selection could keep (checked before the
        prefill). Raises ``InputTooLongError``."""
        if not self.lays_end_to_end:
            return
        kept = int(sum(kept_lengths))
        need = len(parts.prefix) + kept + len(parts.question) + room
        if need > self.window:
            which = f"even the {len(kept_lengths)} shortest chunks" if fewest else "the kept chunks"
            raise InputTooLongError(
                f"{which} laid end to end ({kept} tokens, with P, Q and {room} new tokens: {need}) do not fit "
                f"in the model's window of {self.window} tokens; lower top_k_chunks or chunk_len, or use "
                "merge_layout=parallel (the paper's presets, ParallelCompConfig.preset, do)"
            )

    def check_fewest_fit(self, parts: PromptParts, room: int) -> None:
        """``check_fits`` before any prefill, for the shortest chunks a selection could keep."""
        if self.lays_end_to_end:
            lengths = sorted(e - s for s, e in self.chunk_bounds(parts))
            self.check_fits(parts, lengths[: self.top_k(len(lengths))], room, fewest=True)


def method_of(config: ParallelCompConfig) -> Method:
    """The registered ``methods.Method`` that ``config.method`` names (before any model is
    loaded; ``plan`` resolves everything else)."""
    return get_method(config.method)


def check_config(config) -> ParallelCompConfig:
    """``config`` if it is a ``ParallelCompConfig``; else ``ConfigError``."""
    if not isinstance(config, ParallelCompConfig):
        raise ConfigError(f"config must be a pcomp_jax.ParallelCompConfig, got {type(config).__name__}")
    return config


def calibration_rules(config: ParallelCompConfig, num_layers: int, method: Method) -> tuple:
    """The config's explicit rules plus its preset (scaled to the depth), checked against the
    model's depth and ``method``."""
    rules = tuple(config.calibration)
    if config.calibration_preset is not None:
        rules += preset_rules(config.calibration_preset, num_layers, config.calibration_preset_stage)
    check_rules_fit(rules, num_layers)
    method.check_calibration(rules)
    return rules


def stage_rules(rules, stage: str) -> tuple:
    """The calibration rules of one stage (``chunk`` or ``merged``)."""
    return tuple(r for r in rules if r.stage == stage)


def check_settings(config: ParallelCompConfig) -> Method:
    """The checks of ``config`` against its method that need no model (made by ``plan``, and
    by the command lines before a model loads): a token scorer that reads the last w
    queries of a row must not keep fewer than w tokens (``capacity``; the built-in methods'
    w is ``obs_window``, a registered scorer's its own). Returns the method."""
    method = method_of(config)
    scorer = method.token_scorer_for(config)
    reads = None if scorer is None else scorer.queries_read()
    capacity = config.capacity if method.chunked and scorer is not None else None
    if capacity is not None and reads is not None and capacity < reads:
        raise ConfigError(f"capacity={capacity} is smaller than obs_window={reads} (the queries method "
                          f"{config.method!r}'s token scorer reads); capacity must be >= obs_window")
    return method


def check_chat(model: Model, config: ParallelCompConfig) -> None:
    """``chat: true`` needs a chat template: a base model's tokenizer has none (Gemma 3
    270M), and its prompts are plain text (``chat: false``). Raises ``ConfigError``."""
    tok = model.tokenizer
    if config.chat and tok is not None and not getattr(tok, "chat_template", None):
        raise ConfigError(f"{model.source!r} has no chat template (a base model); set chat: false "
                          "(ParallelCompConfig(chat=False), --no-chat) to read plain-text prompts")


def plan(model: Model, config: ParallelCompConfig | None = None) -> Plan:
    """``config`` (default: ParallelComp's defaults) resolved for ``model``: its method, the
    calibration rules per stage (checked against the method and the model's depth), the
    merge layout (refused where moving keys is not exact for the model's rope), the device
    mesh (its ``model`` axis must divide the heads, MLP width and vocabulary), the
    attention backend on this platform (one that takes sliding windows for a model with
    local layers) and, with ``chat``, the tokenizer's chat template. Raises ``ConfigError``."""
    config = check_config(ParallelCompConfig() if config is None else config)
    cfg = model.config
    method = check_settings(config)
    rules = calibration_rules(config, cfg.num_layers, method)
    layout = method.merge_layout(config)
    if layout.moves_keys and not rope_shift_is_exact(cfg):
        raise ConfigError(f"merge_layout={config.merge_layout!r} rotates cached keys to new positions, which is "
                          f"not exact with {cfg.rope.type!r} rope; use parallel or reprefill")
    check_model_fits_mesh(cfg, make_mesh(config.num_devices, config.model_parallel))
    prefill = method.prefill_spec(config, stage_rules(rules, "chunk"))
    prefill.attention_fn(model.dtype, cfg.has_sliding_layers)  # the backend exists here for this dtype and model
    check_chat(model, config)
    merge = MergeSpec(layout, stage_rules(rules, "merged"), method.stage_eviction(config),
                      method.decode_eviction(config), method.arrangement(config))
    return Plan(config, method, cfg.window, prefill, merge)


def one_row_ids(plan_: Plan, parts: PromptParts, kept_bounds=None) -> np.ndarray | None:
    """The ids of the one full-attention row the plan reads instead of a merged cache, or
    None: a plain-row method reads P + the (fitted) context + Q; ``merge_layout=reprefill``
    reads P + the kept chunks (``kept_bounds``, in laying order) + Q."""
    if plan_.plain_row:
        return np.concatenate([parts.prefix, parts.context, parts.question])
    if plan_.merge.layout.reprefills and kept_bounds is not None:
        return np.concatenate([parts.prefix, *(parts.context[s:e] for s, e in kept_bounds), parts.question])
    return None
