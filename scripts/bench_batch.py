"""Requests on distinct contexts: one ``answer_batch`` against ``answer()`` one by one.

    python scripts/bench_batch.py --lengths 2048 4096 --requests 8 --output docs/bench/batch_cpu.md

For each length: ``--requests`` passkey contexts of that many tokens (seeds 0, 1, ...,
depths spread over 0.1-0.9), each asked its own question, with the default model
(``pcomp_jax.load_model()``, float32) and ``--config``'s pipeline (default: the shipped
``configs/demo.yaml``). Side by side in one process, after warm-up calls that compile
every function at these shapes (the table counts the compilations while timed): the requests answered by ``answer()`` one after another,
then all of them by one ``answer_batch`` (stage 1 per request, stage 2 and decoding as one
batch). Every request's tokens and selected chunks are asserted equal in both. An
Answer's tokens are on the host, so a returned call is finished work. Prints a markdown
table (and writes it to ``--output`` when given), with the seconds of stage 1 and of the
batched stage 2 + decoding from the answers' timings.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import time

import jax

import pcomp_jax
from pcomp_jax.tasks import make_task

COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"  # one XLA compilation (jax.monitoring)


def requests(model, length: int, count: int) -> list[tuple[str, str, str]]:
    """``count`` passkey tasks of ``length`` tokens: (context, question, answer)."""
    tasks = [make_task("passkey", model.tokenizer, length, 0.1 + 0.8 * i / max(count - 1, 1), i) for i in range(count)]
    return [(t.context, t.question, t.answer) for t in tasks]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096])
    p.add_argument("--requests", type=int, default=8)
    p.add_argument("--config", default="configs/demo.yaml", help="a RunConfig YAML whose pipeline is used")
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--output", help="also write the markdown here")
    args = p.parse_args()
    compiles = []
    jax.monitoring.register_event_duration_secs_listener(
        lambda event, seconds, **kw: compiles.append(seconds) if event == COMPILE_EVENT else None)
    model = pcomp_jax.load_model()
    config = pcomp_jax.load_config(args.config).pipeline
    rows = []
    for length in args.lengths:
        batch = requests(model, length, args.requests)
        pairs = [(c, q) for c, q, _ in batch]
        pcomp_jax.answer_batch(model, pairs, config, args.max_new_tokens)  # warm-up: compiles every shape
        pcomp_jax.answer(model, *pairs[0], config, args.max_new_tokens)  # the requests share answer()'s shapes
        warm = len(compiles)
        t = time.perf_counter()
        one = [pcomp_jax.answer(model, c, q, config, args.max_new_tokens) for c, q in pairs]
        one_s = time.perf_counter() - t
        t = time.perf_counter()
        together = pcomp_jax.answer_batch(model, pairs, config, args.max_new_tokens)
        batch_s = time.perf_counter() - t
        for a, b in zip(one, together):
            assert a.token_ids == b.token_ids and a.selected_chunks == b.selected_chunks, (length, a.text, b.text)
        stage1 = sum(a.timings.get("prefill", 0.0) for a in together)
        stage2 = sum(a.timings.get("question_prefill", 0.0) + a.timings.get("decode", 0.0) for a in together)
        single_stage2 = sum(a.timings.get("question_prefill", 0.0) + a.timings.get("decode", 0.0) for a in one)
        right = sum(answer in a.text for a, (_, _, answer) in zip(together, batch))
        rows.append((length, len(pairs), one_s, batch_s, stage1, single_stage2, stage2, right, len(compiles) - warm))
        print(f"{length}: one by one {one_s:.1f} s, batch {batch_s:.1f} s ({one_s / batch_s:.2f}x)", flush=True)
    lines = [
        f"{datetime.date.today()}, {platform.processor() or platform.machine()}, {jax.device_count()} "
        f"{jax.default_backend()} device(s), JAX {jax.__version__}; pipeline of {args.config}; "
        f"max_new_tokens={args.max_new_tokens}",
        "",
        "| context tokens | requests | answer() one by one (s) | answer_batch (s) | speed-up | batch: stage 1 (s) | "
        "stage 2 + decoding: one by one / batched (s) | passkeys right | compilations while timed |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for length, n, one_s, batch_s, stage1, single2, stage2, right, compiled in rows:
        lines.append(f"| {length} | {n} | {one_s:.1f} | {batch_s:.1f} | {one_s / batch_s:.2f}x | {stage1:.1f} | "
                     f"{single2:.1f} / {stage2:.1f} | {right}/{n} | {compiled} |")
    report("\n".join(lines), args.output)


def report(text: str, output: str | None) -> None:
    """Prints the markdown ``text``; also writes it to ``output`` when given."""
    print(text)
    if output:
        with open(output, "w", encoding="utf-8") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
