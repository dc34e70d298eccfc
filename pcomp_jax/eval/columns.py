"""The columns of a comparison: a method's name and the pipeline settings it changes.

Python::

    MethodSpec.of("parallelcomp_evict", method="parallelcomp", capacity=128, max_length=16384)
    MethodSpec.of("no_preset", calibration_preset=None)   # None is a value: the preset is turned off

YAML (a flat mapping per method; ``preset: paper_llama3`` takes a named pipeline preset's
fields; every other key besides ``name``, ``max_length`` and ``min_length`` is a
``ParallelCompConfig`` field, and ``null`` sets that field to None)::

    methods:
      - {name: parallelcomp_evict, method: parallelcomp, capacity: 128, max_length: 16384}
      - {name: parallelcomp_keep_all, method: parallelcomp, capacity: null}
      - {name: truncate, method: truncate, min_length: 65536}   # only where truncating cuts
"""

from __future__ import annotations

import dataclasses
import typing

from ..config import PIPELINE_PRESETS, ConfigError, ParallelCompConfig, check_field_types, from_dict

PIPELINE_FIELDS = tuple(f.name for f in dataclasses.fields(ParallelCompConfig))


def _normal_value(key: str, value):
    """``value`` for pipeline field ``key`` as ``from_dict`` reads it from YAML: lists as
    tuples, mappings in a list of rules as rules (so that a spec is hashable)."""
    hint = typing.get_type_hints(ParallelCompConfig)[key]
    if typing.get_origin(hint) is tuple and isinstance(value, (list, tuple)):
        item = typing.get_args(hint)[0]
        if dataclasses.is_dataclass(item):
            return tuple(from_dict(item, v, f"{key}[{i}].") if isinstance(v, dict) else v for i, v in enumerate(value))
        return tuple(value)
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


@dataclasses.dataclass(frozen=True)
class MethodSpec:
    """One column of the comparison: a name and the pipeline fields it changes.

    changes: ``(field, value)`` pairs of ``ParallelCompConfig`` fields, sorted by field
    (a mapping is accepted and sorted); any field can be set, None included (e.g.
    ``capacity=None`` turns eviction off); fields not named keep the run's ``pipeline``
    value. Build one with ``MethodSpec.of(name, max_length=..., **changes)`` or, from a
    YAML entry, ``MethodSpec.from_mapping``. max_length: synthetic inputs and perplexity
    prefixes longer than this many tokens are not run for this method (e.g. full attention
    at lengths where it is known to fail or too slow); min_length: nor those shorter than
    this (e.g. truncation where the input fits and it equals full attention). Either shows
    as "-" in the summary.
    """

    name: str
    max_length: int | None = None
    changes: tuple[tuple, ...] = ()  # ((field, value), ...): check_field_types reads one type per tuple
    min_length: int | None = None

    def __post_init__(self):
        changes = self.changes.items() if isinstance(self.changes, dict) else self.changes
        try:
            pairs = [(key, value) for key, value in changes]
        except (TypeError, ValueError):
            raise ConfigError(f"method {self.name!r}: changes must be (field, value) pairs, "
                              f"got {self.changes!r}") from None
        preset = [value for key, value in pairs if key == "preset"]
        if preset:  # a named pipeline preset's fields, the entry's own on top
            if not isinstance(preset[0], str) or preset[0] not in PIPELINE_PRESETS:
                raise ConfigError(f"method {self.name!r}: preset={preset[0]!r} is not allowed; allowed: "
                                  + ", ".join(PIPELINE_PRESETS))
            own = [(key, value) for key, value in pairs if key != "preset"]
            pairs = [kv for kv in PIPELINE_PRESETS[preset[0]].items() if kv[0] not in dict(own)] + own
        for key, _ in pairs:
            if key not in PIPELINE_FIELDS:
                raise ConfigError(f"method {self.name!r}: unknown field {key!r}; allowed fields: name, max_length, min_length, "
                                  + ", ".join(PIPELINE_FIELDS))
        keys = [key for key, _ in pairs]
        if len(set(keys)) != len(keys):
            raise ConfigError(f"method {self.name!r}: a field is set twice in {keys}")
        try:
            pairs = sorted(((key, _normal_value(key, value)) for key, value in pairs), key=lambda kv: kv[0])
        except ConfigError as err:
            raise ConfigError(f"method {self.name!r}: {err}") from None
        object.__setattr__(self, "changes", tuple(pairs))
        check_field_types(self)
        if not self.name or "/" in self.name or self.name.startswith("."):
            raise ConfigError(f"method name {self.name!r} must be a non-empty directory name without '/'")
        if self.min_length is not None and self.max_length is not None and self.min_length > self.max_length:
            raise ConfigError(f"method {self.name!r}: min_length={self.min_length} is above max_length="
                              f"{self.max_length}; give min_length <= max_length")

    @classmethod
    def of(cls, name: str, *, max_length: int | None = None, min_length: int | None = None, **changes) -> MethodSpec:
        """``MethodSpec.of("pc_evict", method="parallelcomp", capacity=128, max_length=200)``."""
        return cls(name, max_length, tuple(changes.items()), min_length)

    @classmethod
    def from_mapping(cls, data: dict) -> MethodSpec:
        """A flat YAML entry: ``{name: ..., max_length: ..., min_length: ..., <pipeline field>: value, ...}``."""
        if not isinstance(data, dict):
            raise ConfigError(f"a method must be a mapping with a name, got {data!r}")
        if "name" not in data:
            raise ConfigError(f"a method needs a name, got {data!r}")
        rest = {k: v for k, v in data.items() if k not in ("name", "max_length", "min_length")}
        return cls(data["name"], data.get("max_length"), tuple(rest.items()), data.get("min_length"))

    def runs(self, item) -> bool:
        """Whether this method runs ``item`` (an ``items.Item``; see max_length, min_length)."""
        length = item.fields.get("length", item.fields.get("prefix_len"))
        if length is None:
            return True
        return ((self.max_length is None or length <= self.max_length)
                and (self.min_length is None or length >= self.min_length))

    def pipeline(self, base: ParallelCompConfig) -> ParallelCompConfig:
        """``base`` with this method's changes applied (validated)."""
        return dataclasses.replace(base, **dict(self.changes))


DEFAULT_METHODS = (
    MethodSpec.of("full", method="full"),
    MethodSpec.of("truncate", method="truncate"),
    MethodSpec.of("pcw", method="pcw"),
    MethodSpec.of("parallelcomp", method="parallelcomp"),
    MethodSpec.of("parallelcomp_evict", method="parallelcomp", capacity=128),
    MethodSpec.of("streaming", method="streaming"),
    MethodSpec.of("snapkv", method="snapkv"),
)
