"""Evaluation runner: every method side by side on synthetic tasks, LongBench data and perplexity.

    python -m pcomp_jax.eval --config configs/eval_retrieval.yaml
    python -m pcomp_jax.eval --config configs/eval_perplexity.yaml --set perplexity.prefix_lengths=[8192]

One run sweeps methods x (tasks x lengths x depths x seeds, the LongBench examples, RULER's
samples, the perplexity windows). Per method it writes ``<output_dir>/<method>/predictions.jsonl``
(one line per finished item, flushed as soon as it is done) and ``metrics.json``; then
``summary.md`` (also printed), ``summary.json``, ``heatmap_<task>.png`` (accuracy by depth x
length per method), ``heatmap_ruler.png`` (RULER's scores by task x length per method) and
``perplexity.png`` (perplexity against prefix length per method), named in
``pcomp_eval_manifest.json``; a sweep over other methods in the same directory writes its
summary under a name of its own, and a file the runner did not write is never replaced
(``outputs``).
Run it again with the same output directory to resume: finished items are skipped, and a
method whose settings changed since is refused rather than mixed.

Modules: ``config`` (``EvalConfig``: what a run sweeps), ``columns`` (``MethodSpec``: a
method's name and the pipeline fields it changes), ``items`` (what one prediction is about,
by kind), ``runner`` (``evaluate``, the resumable files, documents shared by the items of one
context), ``outputs`` (the files it may write), ``summary`` (metrics and the markdown tables), ``plots`` (the figures),
``__main__`` (the command line).
"""

from .config import ANSWER_TOKENS, EvalConfig, PerplexityConfig, RulerConfig, load_eval_config
from .columns import DEFAULT_METHODS, MethodSpec
from .items import Item, LongBenchItem, PerplexityItem, RulerItem, SyntheticItem
from .runner import Runner, evaluate
from .summary import method_metrics, summary_markdown

__all__ = [
    "ANSWER_TOKENS",
    "DEFAULT_METHODS",
    "EvalConfig",
    "Item",
    "LongBenchItem",
    "PerplexityItem",
    "RulerItem",
    "SyntheticItem",
    "MethodSpec",
    "PerplexityConfig",
    "RulerConfig",
    "Runner",
    "evaluate",
    "load_eval_config",
    "main",
    "method_metrics",
    "summary_markdown",
]


def __getattr__(name: str):
    # ``main`` lives in __main__.py; imported on first use, so that ``python -m pcomp_jax.eval``
    # does not find pcomp_jax.eval.__main__ already imported (runpy warns about that).
    if name == "main":
        from .__main__ import main

        return main
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
