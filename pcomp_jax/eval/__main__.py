"""The command line: ``python -m pcomp_jax.eval --config configs/eval_retrieval.yaml``.

See the package docstring (``pcomp_jax.eval``) for what a run writes.
"""

from __future__ import annotations

import argparse
import sys

from .._startup import raise_if_interrupted
from ..cli import (add_cache_flags, cache_overrides, exit_interrupted, finish, quiet_transformers,
                  use_compilation_cache)
from ..distributed import add_distributed_flags, distributed_overrides, initialize, is_main
from ..errors import PcompError
from . import __doc__ as PACKAGE_DOC
from .config import load_eval_config
from .outputs import summary_names
from .runner import evaluate, summarize
from .summary import summary_markdown


def main(argv=None) -> int:
    quiet_transformers()
    p = argparse.ArgumentParser(prog="python -m pcomp_jax.eval", description=PACKAGE_DOC.split("\n\n")[0])
    p.add_argument("--config", metavar="YAML", help="eval config; see configs/eval_*.yaml")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE",
                   help="override a field, e.g. --set lengths=[8192] --set pipeline.chunk_len=1024 (repeatable)")
    p.add_argument("--output-dir", help="shorthand for --set output_dir=...")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--summary-only", action="store_true",
                   help="run nothing: rewrite the summary, metrics and plots from the finished predictions")
    add_cache_flags(p)
    add_distributed_flags(p)
    args = p.parse_args(argv)
    overrides = list(args.overrides) + ([f"output_dir={args.output_dir}"] if args.output_dir else [])
    overrides += distributed_overrides(args) + cache_overrides(args)
    try:
        config = load_eval_config(args.config, overrides)
        if args.summary_only:
            metrics = summarize(config)
        else:
            initialize(config.distributed)  # before any other JAX call; every process runs the same sweep
            use_compilation_cache(config.compilation_cache)
            metrics = evaluate(config, progress=not args.no_progress)
        raise_if_interrupted()  # a Ctrl-C that Python dropped still ends the command as interrupted
    except PcompError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C: the finished predictions and their summary are written; a rerun resumes
        return exit_interrupted()
    if not is_main():  # process 0 writes and prints the results
        return 0
    print(summary_markdown(metrics))
    names = summary_names(config.output_dir, [spec.name for spec in config.methods])
    print(f"results in {config.output_dir}/ ({names.stem}.md, {names.stem}.json, <method>/predictions.jsonl, "
          "metrics.json, PNGs)")
    return 0


if __name__ == "__main__":
    finish(main())
