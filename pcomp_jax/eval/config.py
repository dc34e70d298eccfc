"""What an evaluation run sweeps: ``EvalConfig`` (YAML keys = its fields) and its parts."""

from __future__ import annotations

import dataclasses

from ..cli import DEFAULT_COMPILATION_CACHE
from ..config import MIN_TASK_LENGTH, ConfigError, DistributedConfig, ParallelCompConfig, check_field_types
from ..ruler import DEFAULT_SEED, GENERATED_TASKS, RULER_TASKS
from ..tasks import SYNTHETIC_TASKS
from .columns import DEFAULT_METHODS, MethodSpec

ANSWER_TOKENS = {"passkey": 16, "number_string": 24, "kv_retrieval": 64, "needle": 16}


@dataclasses.dataclass(frozen=True)
class PerplexityConfig:
    """Perplexity of ``continuation`` tokens after prefixes of ``prefix_lengths`` tokens of
    ``text_file`` (null: the bundled text, ``io.BUNDLED_TEXT``), ``samples`` windows per length; ``query_len``: see ``pcomp_jax.perplexity``."""

    prefix_lengths: tuple[int, ...] = ()
    continuation: int = 256
    samples: int = 2
    query_len: int = 64
    text_file: str | None = None

    def __post_init__(self):
        check_field_types(self)
        for name in ("continuation", "samples", "query_len"):
            if getattr(self, name) < 1:
                raise ConfigError(f"perplexity.{name} must be >= 1, got {getattr(self, name)}")
        if any(t <= self.query_len + 1 for t in self.prefix_lengths):
            raise ConfigError(f"perplexity.prefix_lengths must all exceed query_len + 1 = {self.query_len + 1}")


@dataclasses.dataclass(frozen=True)
class RulerConfig:
    """RULER's tasks (``pcomp_jax.ruler``): ``samples`` samples of each of ``tasks`` (generated;
    ``ruler.GENERATED_TASKS``) at each of ``lengths`` (tokens: input plus the task's answer
    length), drawn for the run seed ``seed``; ``samples`` is one count for every length or a
    list of counts, one per length in the order of ``lengths``; ``text_file``: the essay of the essay-haystack
    tasks (null: the bundled text, ``io.BUNDLED_TEXT``). ``data``: RULER's own data files
    (``prepare.py`` output: files, or directories searched for ``<task>/*.jsonl``), every
    task of them, qa_1 and qa_2 included; ``data_limit``: samples read per file."""

    tasks: tuple[str, ...] = ()
    lengths: tuple[int, ...] = ()
    samples: int | tuple[int, ...] = 5
    seed: int = DEFAULT_SEED
    text_file: str | None = None
    data: tuple[str, ...] = ()
    data_limit: int | None = None

    def __post_init__(self):
        check_field_types(self)
        for name in ("tasks", "lengths", "data"):
            values = getattr(self, name)
            if len(set(values)) != len(values):
                raise ConfigError(f"ruler.{name} has repeated values: {list(values)}")
        for task in self.tasks:
            if task not in GENERATED_TASKS:
                qa = " (qa_1 and qa_2 need SQuAD/HotpotQA data: give RULER's files of them in ruler.data)" \
                    if task in RULER_TASKS else ""
                raise ConfigError(f"ruler.tasks: unknown task {task!r}; choose from: {', '.join(GENERATED_TASKS)}{qa}")
        if bool(self.tasks) != bool(self.lengths):
            raise ConfigError("ruler.tasks and ruler.lengths go together: give both or neither, got "
                              f"tasks={list(self.tasks)}, lengths={list(self.lengths)}")
        if any(n < MIN_TASK_LENGTH for n in self.lengths):
            raise ConfigError(f"ruler.lengths must be at least {MIN_TASK_LENGTH} tokens, got {list(self.lengths)}")
        counts = (self.samples,) if isinstance(self.samples, int) else self.samples
        if isinstance(self.samples, tuple) and len(self.samples) != len(self.lengths):
            raise ConfigError(f"ruler.samples gives {len(self.samples)} counts for {len(self.lengths)} lengths: give "
                              f"one count for every length, or one per length, got {list(self.samples)}")
        if any(n < 1 for n in counts):
            raise ConfigError(f"ruler.samples must be >= 1, got {list(counts) if len(counts) > 1 else counts[0]}")
        if self.seed < 0:
            raise ConfigError(f"ruler.seed must be a whole number >= 0, got {self.seed}")
        if self.data_limit is not None and self.data_limit < 1:
            raise ConfigError(f"ruler.data_limit must be >= 1, got {self.data_limit}")

    def samples_at(self, length: int) -> int:
        """Samples of each task at ``length`` (one of ``lengths``)."""
        if isinstance(self.samples, int):
            return self.samples
        return self.samples[self.lengths.index(length)]


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """What ``python -m pcomp_jax.eval`` runs (YAML keys = these fields).

    tasks, lengths (context tokens), depths (0 = start, 1 = end), seeds: the synthetic grid
    (``tasks.SYNTHETIC_TASKS``); text_file: the haystack of ``needle`` (null: the
    bundled text, ``io.BUNDLED_TEXT``). longbench: a
    LongBench-format JSONL file (optional), longbench_limit: examples read from it.
    max_new_tokens: answer length (null: per task, LongBench's per dataset, RULER's per task).
    ruler: RULER's tasks, generated or read from RULER's files (``RulerConfig``).
    compilation_cache: JAX's persistent compilation cache directory (null: off; ``pcomp_jax.cli``).
    batch_size: items of one method answered together (``document.answer_parts_batch``:
    stage 1 in shared groups, one question prefill and one decoding loop for the batch; the
    same predictions as one by one); 1: one at a time.
    methods: ``MethodSpec``s; mappings (as read from YAML: ``{name: ..., max_length: ...,
    <pipeline field>: value}``) become ``MethodSpec``s (``MethodSpec.from_mapping``).
    """

    model: str = "smollm2-135m-instruct"
    dtype: str = "float32"
    output_dir: str = "runs/eval"
    pipeline: ParallelCompConfig = dataclasses.field(default_factory=ParallelCompConfig)
    methods: tuple[MethodSpec | dict, ...] = DEFAULT_METHODS  # dicts become MethodSpecs in __post_init__
    tasks: tuple[str, ...] = ("passkey", "needle")
    lengths: tuple[int, ...] = (8192, 16384, 32768)
    depths: tuple[float, ...] = (0.1, 0.5, 0.9)
    seeds: tuple[int, ...] = (0,)
    text_file: str | None = None
    longbench: str | None = None
    longbench_limit: int | None = None
    max_new_tokens: int | None = None
    perplexity: PerplexityConfig = dataclasses.field(default_factory=PerplexityConfig)
    ruler: RulerConfig = dataclasses.field(default_factory=RulerConfig)
    distributed: DistributedConfig = dataclasses.field(default_factory=DistributedConfig)
    compilation_cache: str | None = DEFAULT_COMPILATION_CACHE
    batch_size: int = 8

    def __post_init__(self):
        if isinstance(self.methods, (list, tuple)):  # mappings (YAML, Python) become MethodSpecs
            object.__setattr__(self, "methods", tuple(
                MethodSpec.from_mapping(m) if isinstance(m, dict) else m for m in self.methods))
        check_field_types(self)
        if self.dtype not in ("float32", "bfloat16", "auto"):
            raise ConfigError(f"dtype={self.dtype!r} is not allowed; choose one of: float32, bfloat16, auto")
        for name in ("tasks", "lengths", "depths", "seeds"):
            values = getattr(self, name)
            if len(set(values)) != len(values):
                raise ConfigError(f"{name} has repeated values: {list(values)}")
        for task in self.tasks:
            if task not in SYNTHETIC_TASKS:
                raise ConfigError(f"unknown task {task!r} in tasks; choose from: {', '.join(SYNTHETIC_TASKS)}")
        if any(n < MIN_TASK_LENGTH for n in self.lengths):
            raise ConfigError(f"lengths must be at least {MIN_TASK_LENGTH} tokens (a task's own template is longer "
                              f"below that), got {list(self.lengths)}")
        if any(s < 0 for s in self.seeds):
            raise ConfigError(f"seeds must be whole numbers >= 0, got {list(self.seeds)}")
        if any(not 0.0 <= d <= 1.0 for d in self.depths):
            raise ConfigError(f"depths must lie in [0, 1], got {list(self.depths)}")
        names = [m.name for m in self.methods]
        if not names or len(set(names)) != len(names):
            raise ConfigError(f"methods need distinct names, got {names}")
        for spec in self.methods:  # every method's pipeline must validate before anything runs
            try:
                spec.pipeline(self.pipeline)
            except ConfigError as err:
                raise ConfigError(f"method {spec.name!r}: {err}") from None
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.longbench_limit is not None and self.longbench_limit < 1:
            raise ConfigError(f"longbench_limit must be >= 1, got {self.longbench_limit}")


def load_eval_config(path: str | None, overrides=()) -> EvalConfig:
    """YAML at ``path`` (or the defaults) with ``--set`` overrides, validated."""
    from ..config import load_config

    return load_config(path, overrides, cls=EvalConfig)
