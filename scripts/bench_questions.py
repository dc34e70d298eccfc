"""Reading a document once vs answer() per question, and answer_batch vs answer() calls.

    python scripts/bench_questions.py --lengths 16384 32768 --questions 3 --output docs/bench/questions_cpu.md

For each length: a passkey context with the default model (``pcomp_jax.load_model()``,
float32) and the default ``ParallelCompConfig``; ``--questions`` different questions about
it. Timed, after warm-up calls that compile every function at these shapes (reported
apart, as "first call"): ``answer(model, context, q, config)`` per question; one
``read_document``; ``doc.ask(q)`` per question. Each ask's tokens and selected chunks are
asserted equal to answer()'s. The document's stored caches are measured in bytes (the
arrays of its chunk groups and P's cache) for float32 and for bfloat16 (a bfloat16 model
reads the same context; its read time is reported too). Then ``answer_batch`` of
``--batch`` requests (``--batch-contexts`` contexts of ``--batch-length`` tokens, the
questions spread over them) against the same requests answered by ``answer()`` one by
one, outputs asserted equal. An Answer's tokens are on the host, so a returned call is
finished work (JAX dispatches asynchronously; nothing unfinished is timed).

``--warmup-length N`` runs the warm-up calls on an N-token context instead (e.g. 32K
before a 128K run, whose functions have the same shapes: only the number of chunk groups
differs). The report counts the XLA compilations (``jax.monitoring``'s backend-compile
events) during the timed calls and their seconds: what of the timed calls was compiling.

Prints a markdown table (and writes it to ``--output`` when given).
"""

from __future__ import annotations

import argparse
import datetime
import platform
import subprocess
import time

import jax
import numpy as np

import pcomp_jax
from pcomp_jax.tasks import make_task

COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
COMPILES: list[float] = []
jax.monitoring.register_event_duration_secs_listener(
    lambda event, seconds, **kw: COMPILES.append(seconds) if event == COMPILE_EVENT else None)

QUESTIONS = (
    "What is the pass key? The pass key is",
    "Which number is the pass key mentioned in the text?",
    "Repeat the pass key from the text.",
    "What number should be remembered?",
    "What is the secret number in the text?",
    "Tell me the pass key.",
    "What is the key?",
    "Which number was hidden in the text?",
)


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def cache_bytes(doc) -> int:
    """Bytes of the arrays a Document keeps for its questions (chunk caches and P's cache)."""
    leaves = jax.tree.leaves(doc.groups) + [doc.prefix_keys, doc.prefix_values]
    return int(sum(x.nbytes for x in leaves))  # jax.Array and np.ndarray both have nbytes


def same(a, b) -> bool:
    return list(a.token_ids) == list(b.token_ids) and list(a.selected_chunks) == list(b.selected_chunks)


def bench_length(model, model_bf16, length: int, n: int, config, warmup_length: int | None = None) -> dict:
    task = make_task("passkey", model.tokenizer, length, 0.5, 0)
    questions = [task.question, *QUESTIONS[: n - 1]]
    new = 16
    # warm-up (compiles): answer, read_document and ask at these shapes
    warm = task if warmup_length is None else make_task("passkey", model.tokenizer, warmup_length, 0.5, 0)
    _, first_answer = timed(lambda: pcomp_jax.answer(model, warm.context, questions[0], config, new))
    warm_doc, first_read = timed(lambda: pcomp_jax.read_document(model, warm.context, config))
    _, first_ask = timed(lambda: warm_doc.ask(questions[0], new))
    del warm_doc
    compiled_before = len(COMPILES)
    answers, answer_s = [], []
    for q in questions:
        a, s = timed(lambda: pcomp_jax.answer(model, task.context, q, config, new))
        answers.append(a)
        answer_s.append(s)
    doc, read_s = timed(lambda: pcomp_jax.read_document(model, task.context, config))
    asks, ask_s = [], []
    for q in questions:
        a, s = timed(lambda: doc.ask(q, new))
        asks.append(a)
        ask_s.append(s)
    for q, a, b in zip(questions, answers, asks):
        assert same(a, b), f"ask differs from answer() for {q!r}: {a.token_ids} {a.selected_chunks} vs " \
                           f"{b.token_ids} {b.selected_chunks}"
    bytes32 = cache_bytes(doc)
    del doc
    row = {"length": length, "context_tokens": answers[0].context_tokens, "chunks": answers[0].num_chunks,
           "warmup_length": warmup_length or length, "timed_compiles": len(COMPILES) - compiled_before,
           "timed_compile_s": sum(COMPILES[compiled_before:]),
           "first_answer": first_answer, "first_read": first_read, "first_ask": first_ask,
           "answer_s": answer_s, "read_s": read_s, "ask_s": ask_s, "bytes_f32": bytes32,
           "answer_text": answers[0].text.strip(), "expected": task.answer}
    if model_bf16 is not None:
        doc16, first16 = timed(lambda: pcomp_jax.read_document(model_bf16, task.context, config))
        row["bytes_bf16"], row["read_bf16_first"] = cache_bytes(doc16), first16
        del doc16
    return row


def bench_batch(model, length: int, contexts: int, n: int, config) -> dict:
    tasks = [make_task("passkey", model.tokenizer, length, 0.5, seed) for seed in range(contexts)]
    requests = [(tasks[i % contexts].context, QUESTIONS[i % len(QUESTIONS)]) for i in range(n)]
    new = 16
    # warm-up: one of each call at these shapes
    _, first_batch = timed(lambda: pcomp_jax.answer_batch(model, requests[:contexts + 1], config, new))
    _, first_answer = timed(lambda: pcomp_jax.answer(model, requests[0][0], requests[0][1], config, new))
    one_by_one, calls_s = timed(lambda: [pcomp_jax.answer(model, c, q, config, new) for c, q in requests])
    batch, batch_s = timed(lambda: pcomp_jax.answer_batch(model, requests, config, new))
    for (c, q), a, b in zip(requests, one_by_one, batch):
        assert same(a, b), f"answer_batch differs from answer() for {q!r}"
    return {"length": length, "contexts": contexts, "requests": n, "calls_s": calls_s, "batch_s": batch_s,
            "first_batch": first_batch, "first_answer": first_answer}


def machine() -> list[str]:
    try:
        return subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines()[:10]
    except OSError:
        return [platform.processor()]


def table(rows, batches) -> str:
    mib = 2 ** 20
    out = ["| context tokens | chunks | answer() per question (s) | read_document (s) | ask per question (s) "
           "| answer / ask | caches float32 (MiB) | caches bfloat16 (MiB) | same tokens and chunks |",
           "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        a, q = float(np.median(r["answer_s"])), float(np.median(r["ask_s"]))
        b16 = f"{r['bytes_bf16'] / mib:.1f}" if "bytes_bf16" in r else "-"
        out.append(f"| {r['context_tokens']} | {r['chunks']} | {a:.2f} | {r['read_s']:.2f} | {q:.2f} | "
                   f"{a / q:.1f}x | {r['bytes_f32'] / mib:.1f} | {b16} | yes ({len(r['ask_s'])} questions) |")
    out += ["", "Each question's time (s), in order:", ""]
    for r in rows:
        out.append(f"- {r['context_tokens']} tokens: answer() {', '.join(f'{s:.2f}' for s in r['answer_s'])}; "
                   f"ask {', '.join(f'{s:.2f}' for s in r['ask_s'])}; first answer {r['answer_text']!r} "
                   f"(expected {r['expected']!r})")
    out += ["", "Warm-up (first call at these shapes, compiling; not in the table above):", ""]
    for r in rows:
        extra = f", bfloat16 read_document {r['read_bf16_first']:.2f}" if "read_bf16_first" in r else ""
        out.append(f"- {r['context_tokens']} tokens (warm-up on {r['warmup_length']} tokens): answer() "
                   f"{r['first_answer']:.2f}, read_document {r['first_read']:.2f}, ask {r['first_ask']:.2f}{extra} s; "
                   f"XLA compilations during the timed calls: {r['timed_compiles']} ({r['timed_compile_s']:.2f} s)")
    if batches:
        out += ["", "| requests | contexts x tokens | answer() one by one (s) | answer_batch (s) | speed-up "
                "| same outputs |", "|---|---|---|---|---|---|"]
        for b in batches:
            out.append(f"| {b['requests']} | {b['contexts']} x {b['length']} | {b['calls_s']:.2f} | "
                       f"{b['batch_s']:.2f} | {b['calls_s'] / b['batch_s']:.2f}x | yes |")
        for b in batches:
            out.append(f"\nWarm-up: answer_batch of {b['contexts'] + 1} {b['first_batch']:.2f} s, answer() "
                       f"{b['first_answer']:.2f} s.")
    return "\n".join(out)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[16384, 32768])
    p.add_argument("--questions", type=int, default=3)
    p.add_argument("--no-bf16", action="store_true", help="skip the bfloat16 reading (memory column '-')")
    p.add_argument("--batch", type=int, default=8, help="requests for answer_batch (0: skip)")
    p.add_argument("--batch-contexts", type=int, default=2)
    p.add_argument("--batch-length", type=int, default=4096)
    p.add_argument("--warmup-length", type=int, help="warm up on a context of this many tokens (default: each length)")
    p.add_argument("--output", help="also write the markdown here")
    args = p.parse_args()
    config = pcomp_jax.ParallelCompConfig()
    model = pcomp_jax.load_model()
    model_bf16 = None if args.no_bf16 else pcomp_jax.load_model(dtype="bfloat16")
    rows = []
    for length in args.lengths:
        rows.append(bench_length(model, model_bf16, length, args.questions, config, args.warmup_length))
        print(table(rows, []), flush=True)
    batches = [bench_batch(model, args.batch_length, args.batch_contexts, args.batch, config)] if args.batch else []
    text = (f"Run {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, jax {jax.__version__}, "
            f"{jax.devices()[0].platform}, model {model.source} float32, config {config}\n\n"
            + "```\n" + "\n".join(machine()) + "\n```\n\n" + table(rows, batches))
    print(text)
    if args.output:
        with open(args.output, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
