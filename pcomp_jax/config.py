"""The typed config tree: ParallelComp settings and a run of the command line.

``load_config(path, overrides)`` reads YAML, applies ``--set a.b=value`` overrides and
validates everything up front; errors name the field, the value and what is allowed.
"""

from __future__ import annotations

import dataclasses
import re

from .cli import DEFAULT_COMPILATION_CACHE
from .errors import ConfigError
from .registry import method_names
from .typed import apply_override, check_field_types, from_dict, read_yaml_mapping, to_dict  # noqa: F401  (re-exported)

# The names the settings take. The modules that implement them key their tables by these
# (``attention.CAUSAL_BACKENDS``, ``prefill.MERGE_LAYOUTS``, ``prefill.CHUNK_ORDERS``, ``checkpoints.DTYPES``), and a
# test checks that the two agree.
CAUSAL_BACKEND_NAMES = ("dense", "blockwise", "pallas", "cudnn", "splash", "mosaic_gpu")
ATTENTION_BACKENDS = ("auto", *CAUSAL_BACKEND_NAMES)
SINGLE_DEVICE_KERNELS = ("pallas", "cudnn", "splash", "mosaic_gpu")  # one kernel per device: not split over model_parallel
MERGE_LAYOUT_NAMES = ("parallel", "sequential", "reprefill")
CHUNK_ORDER_NAMES = ("document", "relevance")  # prefill.CHUNK_ORDERS
CHUNK_ANSWER_NAMES = ("together", "each")  # prefill.CHUNK_ANSWERS
REPREFILL = "reprefill"  # the layout that reads the kept chunks again instead of merging caches
DTYPE_NAMES = ("float32", "bfloat16")
DTYPE_CHOICES = (*DTYPE_NAMES, "auto")


REGIONS = ("sink", "recent", "middle", "all")
STAGES = ("chunk", "merged")


@dataclasses.dataclass(frozen=True)
class CalibrationRule:
    """Remove over-attended tokens of ``region`` in layers ``layers = [first, last]`` (0-based, inclusive).

    region: ``sink`` (first ``region_size`` tokens), ``recent`` (last ``region_size``),
    ``middle`` (between them) or ``all``. threshold: mean attention above which a token is
    removed. last_queries: how many final query tokens are averaged. stage: ``chunk`` or ``merged``.
    """

    layers: tuple[int, int]
    region: str = "middle"
    region_size: int = 100
    threshold: float = 0.1
    last_queries: int = 1
    stage: str = "merged"

    def __post_init__(self):
        layers = tuple(self.layers)
        if len(layers) != 2 or not all(isinstance(x, int) and not isinstance(x, bool) for x in layers):
            raise ConfigError(f"layers must be [first, last] (two integers), got {list(self.layers)}")
        object.__setattr__(self, "layers", layers)
        if not 0 <= layers[0] <= layers[1]:
            raise ConfigError(f"layers {list(layers)} must satisfy 0 <= first <= last")
        if self.region not in REGIONS:
            raise ConfigError(f"region {self.region!r} is not allowed; choose one of: {', '.join(REGIONS)}")
        if self.stage not in STAGES:
            raise ConfigError(f"stage {self.stage!r} is not allowed; choose one of: {', '.join(STAGES)}")
        if self.threshold < 0:
            raise ConfigError(f"threshold must be >= 0, got {self.threshold}")
        if self.region_size < 1:
            raise ConfigError(f"region_size must be >= 1, got {self.region_size}")
        if self.last_queries < 1:
            raise ConfigError(f"last_queries must be >= 1, got {self.last_queries}")


# The paper's layer findings for 32-layer Llama-class models, as (first, last) of 32
# layers, region; scaled to the model's depth by ``preset_rules``.
PRESETS: dict[str, tuple[tuple[int, int, str], ...]] = {
    # Removing the middle bias in shallow layers helps understanding.
    "remove_shallow_middle": ((1, 8, "middle"),),
    # Removing the sink bias in shallow layers hurts retrieval (for ablations).
    "remove_shallow_sink": ((1, 8, "sink"),),
    # Removing the recent bias in layers 9-16 hurts code and math reasoning (for ablations).
    "remove_deep_recent": ((9, 16, "recent"),),
    # Removing the middle bias in deep layers hurts multiple-choice reading (for ablations).
    "remove_deep_middle": ((24, 31, "middle"),),
    # The recent bias in early layers matters for in-context learning (for ablations).
    "remove_early_recent": ((1, 8, "recent"),),
}


@dataclasses.dataclass(frozen=True)
class DistributedConfig:
    """How this process joins a multi-process run.

    coordinator: ``host:port`` of process 0's coordinator service; num_processes: how many
    processes the run has; process_id: this one's index (0 = the main process). Give all
    three, or none to rely on JAX's cluster detection (one process outside a cluster).
    timeout_s: how long to wait for every process to join before giving up.
    """

    coordinator: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    timeout_s: int = 300

    def __post_init__(self):
        check_field_types(self, "distributed.")
        given = {"coordinator": self.coordinator, "num_processes": self.num_processes, "process_id": self.process_id}
        missing = [name for name, value in given.items() if value is None]
        if 0 < len(missing) < 3:
            raise ConfigError(f"distributed.{missing[0]} is missing: give coordinator, num_processes and process_id "
                              "together, or none of them to use JAX's cluster detection")
        if self.coordinator is not None and not re.fullmatch(r"\[?[\w.:-]+\]?:\d+", self.coordinator):
            raise ConfigError(f"distributed.coordinator must be host:port (e.g. 10.0.0.1:1234), got {self.coordinator!r}")
        if self.num_processes is not None and self.num_processes < 1:
            raise ConfigError(f"distributed.num_processes must be >= 1, got {self.num_processes}")
        if self.process_id is not None and not 0 <= self.process_id < self.num_processes:
            raise ConfigError(f"distributed.process_id must be in [0, {self.num_processes - 1}] "
                              f"(num_processes={self.num_processes}), got {self.process_id}")
        if self.timeout_s < 1:
            raise ConfigError(f"distributed.timeout_s must be >= 1, got {self.timeout_s}")

    @property
    def explicit(self) -> bool:
        return self.coordinator is not None


def _check_choice(name, value, allowed):
    if value not in allowed:
        raise ConfigError(f"{name}={value!r} is not allowed; choose one of: {', '.join(allowed)}")


def _check_min(name, value, minimum):
    if value < minimum:
        raise ConfigError(f"{name} must be >= {minimum}, got {value}")


@dataclasses.dataclass(frozen=True)
class ParallelCompConfig:
    """How a long input is answered (see docs/algorithm.md for the stages).

    method: the name of a registered ``methods.Method``: ``parallelcomp`` (chunks, top-k
      chunk selection, optional KV eviction), ``pcw`` (every chunk kept, no eviction),
      ``full`` (the whole input, full attention), ``truncate`` (the first and last halves
      of the window); two KV-compression baselines on the truncated input, prefilled as one
      row with full attention: ``snapkv`` (SnapKV keeps ``kv_budget`` context tokens per
      layer and KV head) and ``streaming`` (StreamingLLM: the prefix P as attention sinks +
      the ``kv_budget`` most recent context tokens); or one of your own
      (``methods.register_method``).
    chunk_len: most context tokens per chunk (C). top_k_chunks: chunks kept (k).
    sentence_chunks: end chunks at sentence ends near the near-equal targets (else line
      ends, else token counts; ``chunking.chunk_bounds``); False: at token counts alone.
    chunk_overlap: tokens each chunk repeats from before its start (0: none).
    merge_layout: where the kept chunks sit for the question (``MERGE_LAYOUT_NAMES``; ``prefill.MERGE_LAYOUTS``):
      ``parallel`` (the default and the paper's: every chunk at its own row positions; it
      works for any k and chunk length), ``sequential`` (one after another, keys rotated
      on; not with ``dynamic`` rope; P + the kept chunks + Q + the answer must fit in the
      window; the retrieval sweep's choice for the default model, in its configs) or
      ``reprefill`` (the kept chunks run again as one row with full attention).
    chunk_order: how the kept chunks are laid for the question (``prefill.CHUNK_ORDERS``):
      ``document`` (the paper's) or ``relevance`` (the best-scoring chunk last, nearest the
      question); only the sequential and reprefill layouts see it.
    chunk_score_margin: read a kept chunk only when its score is within this margin of the
      best kept chunk's (query NLL, nats per question token); None (the paper's) reads all
      ``top_k_chunks``.
    chunk_answers: ``together`` (the paper's: one stage 2 reads every chunk read) or
      ``each`` (a stage 2 per read chunk, P + that chunk alone + Q, and of their greedy
      answers the one with the lowest mean NLL per answer token on its own chunk's cache;
      an empty answer ranks last). It costs one decode and one scoring pass per read chunk,
      and answers only (perplexity refuses it).
    stage_eviction: evict after the merge instead of inside each chunk: the chunks keep
      every token through stage 1, and the merged cache's chunk entries are cut to
      ``capacity x top_k_chunks`` per layer and KV head, ranked by the method's token
      scorer (SnapKV: the question's last ``obs_window`` queries; ``decode.StageEviction``);
      needs ``capacity``.
    decode_eviction: while decoding, hold each layer's cache at the size the question
      prefill left it: after each new token the lowest-ranked entry leaves it (SnapKV: the
      one least attended by the last ``obs_window`` queries; ``decode.DecodeEviction``; the
      reference's ``kv_cache_dynamic``).
    capacity: tokens kept per chunk, layer and KV head by the method's token scorer; None
      keeps all.
    obs_window: observation queries (w) of the built-in methods' SnapKV scores
      (``compress.ConfigSnapKV``); pool_kernel: their max-pool width. A method registered
      with a scorer of its own keeps that scorer's fields.
    group_size: chunk rows prefilled at once; memory grows with it, results do not change.
    chat: wrap the question in the model's chat template. instruction: header text in the
      prefix P. answer_prefix: text the answer starts from (part of the question part Q).
    score_last_tokens: score chunks by only the last m question tokens (None: all).
    calibration: stage-1c rules (``CalibrationRule``; YAML: a list of mappings).
    calibration_preset: a named preset (``calibrate.PRESETS``) added to the rules, with layer
      ranges scaled to the model's depth, applied at ``calibration_preset_stage``.
    attention: causal prefill backend: ``auto`` (GPU: cuDNN for bfloat16 without chunk-stage
      calibration, else Pallas; TPU: splash without chunk-stage calibration, else blockwise;
      CPU: blockwise), ``dense``, ``blockwise``, ``pallas``, ``cudnn``, ``splash`` or
      ``mosaic_gpu`` (Hopper, 16-bit). num_devices: devices used (None: all, of every
      process). model_parallel: devices of the ``model`` mesh axis (tensor parallelism: query
      and KV heads, MLP width and vocabulary split over them; must divide each); the other
      factor of num_devices is the ``chunk`` axis (chunk rows split over it).
    kv_budget: context tokens the snapkv and streaming baselines keep (None: as many as
      ParallelComp keeps, ``top_k_chunks x (capacity or chunk_len)``).
    """

    method: str = "parallelcomp"
    chunk_len: int = 512
    sentence_chunks: bool = True
    chunk_overlap: int = 0
    merge_layout: str = "parallel"
    chunk_order: str = "document"
    chunk_score_margin: float | None = None
    chunk_answers: str = "together"
    stage_eviction: bool = False
    decode_eviction: bool = False
    top_k_chunks: int = 2
    capacity: int | None = None
    obs_window: int = 8
    pool_kernel: int = 7
    group_size: int = 4
    chat: bool = True
    instruction: str = "Read the following text and answer the question briefly."
    answer_prefix: str = "Answer:"
    score_last_tokens: int | None = None
    calibration: tuple[CalibrationRule, ...] = ()
    calibration_preset: str | None = None
    calibration_preset_stage: str = "merged"
    attention: str = "auto"
    num_devices: int | None = None
    model_parallel: int = 1
    kv_budget: int | None = None

    def __post_init__(self):
        rules = self.calibration if isinstance(self.calibration, (list, tuple)) else None
        if rules is not None:  # mappings from Python code become rules, as from YAML
            rules = tuple(from_dict(CalibrationRule, r, f"calibration[{i}].") if isinstance(r, dict) else r
                          for i, r in enumerate(rules))
            object.__setattr__(self, "calibration", rules)
        check_field_types(self)
        _check_choice("method", self.method, method_names())
        _check_choice("attention", self.attention, ATTENTION_BACKENDS)
        _check_choice("merge_layout", self.merge_layout, MERGE_LAYOUT_NAMES)
        _check_choice("chunk_order", self.chunk_order, CHUNK_ORDER_NAMES)
        _check_choice("chunk_answers", self.chunk_answers, CHUNK_ANSWER_NAMES)
        if self.chunk_score_margin is not None and not self.chunk_score_margin >= 0:
            raise ConfigError(f"chunk_score_margin={self.chunk_score_margin} must be >= 0 (or null: no margin)")
        if self.stage_eviction and self.capacity is None:
            raise ConfigError("stage_eviction keeps capacity x top_k_chunks tokens of the merged cache; set capacity")
        merged_rules = any(r.stage == "merged" for r in self.calibration) or (
            self.calibration_preset is not None and self.calibration_preset_stage == "merged")
        if self.merge_layout == REPREFILL:
            acting = [name for name, on in (("merged-stage calibration", merged_rules),
                                            ("stage_eviction", self.stage_eviction),
                                            ("decode_eviction", self.decode_eviction)) if on]
            if acting:
                raise ConfigError(f"{acting[0]} acts on the merged cache, which merge_layout=reprefill does not "
                                  "build; use merge_layout parallel or sequential")
        _check_min("chunk_len", self.chunk_len, 1)
        _check_min("top_k_chunks", self.top_k_chunks, 1)
        _check_min("chunk_overlap", self.chunk_overlap, 0)
        if self.chunk_overlap >= self.chunk_len:
            raise ConfigError(f"chunk_overlap={self.chunk_overlap} must be smaller than chunk_len={self.chunk_len}")
        _check_min("obs_window", self.obs_window, 1)
        _check_min("group_size", self.group_size, 1)
        _check_min("pool_kernel", self.pool_kernel, 1)
        if self.pool_kernel % 2 == 0:
            raise ConfigError(f"pool_kernel must be odd (same padding), got {self.pool_kernel}")
        if self.score_last_tokens is not None:
            _check_min("score_last_tokens", self.score_last_tokens, 1)
        if self.num_devices is not None:
            _check_min("num_devices", self.num_devices, 1)
        _check_min("model_parallel", self.model_parallel, 1)
        if self.num_devices is not None and self.num_devices % self.model_parallel:
            raise ConfigError(f"model_parallel={self.model_parallel} must divide num_devices={self.num_devices}")
        if self.model_parallel > 1 and self.attention in SINGLE_DEVICE_KERNELS:
            raise ConfigError(f"attention={self.attention!r} is one kernel per device and cannot be split over "
                              "model_parallel devices; use attention: blockwise or dense")
        if self.kv_budget is not None:
            _check_min("kv_budget", self.kv_budget, 1)
        if self.calibration_preset is not None:
            _check_choice("calibration_preset", self.calibration_preset, tuple(PRESETS))
        _check_choice("calibration_preset_stage", self.calibration_preset_stage, STAGES)
        if self.capacity is not None:
            if self.capacity > self.chunk_len:
                raise ConfigError(
                    f"capacity={self.capacity} is larger than chunk_len={self.chunk_len}; "
                    "use capacity <= chunk_len, or capacity: null to keep every token"
                )


    @classmethod
    def mapping_presets(cls) -> dict:
        """The named presets a YAML pipeline section may start from (``preset: name``)."""
        return PIPELINE_PRESETS

    @classmethod
    def preset(cls, name: str, **changes) -> ParallelCompConfig:
        """A named preset (``PIPELINE_PRESETS``) with ``changes`` on top:
        ``ParallelCompConfig.preset("paper_llama3", capacity=512)``. In YAML: ``preset: name``
        in a pipeline section, the section's other fields on top."""
        if name not in PIPELINE_PRESETS:
            raise ConfigError(f"preset={name!r} is not allowed; allowed: {', '.join(PIPELINE_PRESETS)}")
        return cls(**{**PIPELINE_PRESETS[name], **changes})

    @property
    def baseline_kv_budget(self) -> int:
        """Context tokens kept by the snapkv and streaming baselines."""
        if self.kv_budget is not None:
            return self.kv_budget
        return self.top_k_chunks * (self.capacity if self.capacity is not None else self.chunk_len)


# The authors' quick-start settings (docs/algorithm.md, "Reference defaults"), for the large
# models they were chosen for: chunks at token counts, the parallel layout, k = 3, no
# eviction (their eviction setting is capacity 512 on top), chunk length per model family.
# The library's own defaults were chosen for the default model by the retrieval sweep.
_PAPER = {"sentence_chunks": False, "merge_layout": "parallel", "top_k_chunks": 3, "capacity": None,
          "obs_window": 8, "pool_kernel": 7, "stage_eviction": False, "decode_eviction": False}
PIPELINE_PRESETS = {
    "paper_llama2": {**_PAPER, "chunk_len": 3600},
    "paper_llama3": {**_PAPER, "chunk_len": 7600},
    "paper_llama3_1": {**_PAPER, "chunk_len": 6000},
    "paper_qwen2": {**_PAPER, "chunk_len": 6000},
}

TASK_KINDS = ("passkey", "number_string", "kv_retrieval", "needle")  # pcomp_jax.tasks


MIN_TASK_LENGTH = 64  # tokens: below it a task's own template is longer than the length asked for


@dataclasses.dataclass(frozen=True)
class TaskConfig:
    """The built-in input when no context file is given: a synthetic task (``pcomp_jax.tasks``).

    kind: passkey, number_string, kv_retrieval or needle; length: context length in tokens;
    depth: where the hidden item sits (0 = start, 1 = end); text_file: the needle's haystack, a
    plain-text UTF-8 file (null: the text bundled with the package, ``io.BUNDLED_TEXT``).
    """

    kind: str = "passkey"
    length: int = 16384
    depth: float = 0.5
    seed: int = 0
    text_file: str | None = None

    def __post_init__(self):
        check_field_types(self, "task.")
        _check_choice("task.kind", self.kind, TASK_KINDS)
        _check_min("task.length", self.length, MIN_TASK_LENGTH)
        _check_min("task.seed", self.seed, 0)
        if not 0.0 <= self.depth <= 1.0:
            raise ConfigError(f"task.depth must be between 0 and 1, got {self.depth}")


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """A run of ``python -m pcomp_jax.generate --config ...``.

    compilation_cache: JAX's persistent compilation cache directory (null: off; ``pcomp_jax.cli``).
    """

    model: str = "smollm2-135m-instruct"
    dtype: str = "float32"
    max_new_tokens: int = 16
    pipeline: ParallelCompConfig = dataclasses.field(default_factory=ParallelCompConfig)
    task: TaskConfig = dataclasses.field(default_factory=TaskConfig)
    distributed: DistributedConfig = dataclasses.field(default_factory=DistributedConfig)
    compilation_cache: str | None = DEFAULT_COMPILATION_CACHE

    def __post_init__(self):
        check_field_types(self)
        _check_choice("dtype", self.dtype, DTYPE_CHOICES)
        _check_min("max_new_tokens", self.max_new_tokens, 1)


def load_config(path: str | None = None, overrides: list[str] = (), cls=RunConfig):
    """Reads YAML at ``path`` (or the defaults), applies overrides, validates."""
    data = {} if path is None else read_yaml_mapping(path)
    for assignment in overrides:
        data = apply_override(data, assignment)
    return from_dict(cls, data)
