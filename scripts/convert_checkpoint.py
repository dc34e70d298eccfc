"""Convert a Hugging Face checkpoint directory or a GGUF file into an orbax checkpoint.

    python scripts/convert_checkpoint.py path/to/Meta-Llama-3-8B-Instruct llama3_8b_orbax
    python scripts/convert_checkpoint.py model.Q8_0.gguf smollm2_orbax --dtype bfloat16

The output directory (which must not exist) holds the weights as an orbax checkpoint, the
model config and the tokenizer; ``pcomp_jax.load_model(path, mesh=...)`` then restores
the weights straight into a device mesh's shardings, each process reading only its shards
(``--set pipeline.model_parallel=N`` on the command line). A GGUF file is dequantized once.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from pcomp_jax import load_model, save_model
from pcomp_jax.checkpoints import DTYPES
from pcomp_jax.errors import PcompError


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("source", help="a Hugging Face checkpoint directory, a .gguf file, or smollm2-135m-instruct")
    p.add_argument("output", help="the orbax checkpoint directory to create (must not exist)")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="float32", help="weight dtype stored (default float32)")
    args = p.parse_args(argv)
    try:
        if os.path.exists(args.output):
            raise PcompError(f"{args.output!r} already exists; choose a new directory so that nothing is overwritten")
        start = time.perf_counter()
        model = load_model(args.source, dtype=args.dtype)
        save_model(model, args.output)
    except PcompError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    size = sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(args.output) for f in files)
    print(f"wrote {args.output} ({size / 2**20:.1f} MiB, {args.dtype}, tokenizer: "
          f"{'yes' if model.tokenizer is not None else 'no'}) in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
