"""Where a question on a read document spends its time: the question pass over the chunk
caches (``Document.score_chunks``, waited for with ``block_until_ready``) against selection,
merge and decoding (``pipeline.run_stage2``; its tokens come back to the host, so it is finished).

    python scripts/profile_ask.py --length 8192

Default model, default config, passkey context at depth 0.5, 16 new tokens; the first ask
compiles, the later ones are warm.
"""

from __future__ import annotations

import argparse
import time

import jax

import pcomp_jax
from pcomp_jax import ParallelCompConfig
from pcomp_jax.pipeline import answer_prefilled
from pcomp_jax.plans import plan
from pcomp_jax.tasks import make_task


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--length", type=int, default=8192)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    model = pcomp_jax.load_model()
    task = make_task("passkey", model.tokenizer, args.length, 0.5, 0)
    config = ParallelCompConfig()
    doc = pcomp_jax.read_document(model, task.context, config)
    for i in range(args.repeats):
        parts = doc.question_parts(task.question, config)
        start = time.perf_counter()
        (prefill,) = doc.score_chunks([parts], plan(model, config))
        jax.block_until_ready(prefill.context)
        scored = time.perf_counter()
        result = answer_prefilled(model, plan(model, config), prefill, 16, {}, len(parts.context))
        done = time.perf_counter()
        print(f"{'first (compiling)' if i == 0 else 'warm'}: {doc.num_chunks} chunks, question pass "
              f"{scored - start:.2f} s, selection + merge + decoding {done - scored:.2f} s, {result.text!r}")


if __name__ == "__main__":
    main()
