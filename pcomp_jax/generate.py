"""Command line: answer a question about a long input, or a plain prompt.

    python -m pcomp_jax.generate --config configs/128k.yaml
    python -m pcomp_jax.generate --config configs/demo.yaml --context-file book.txt --question "..."
    python -m pcomp_jax.generate --context-file book.txt --question "Q1" --question "Q2"   # read once, ask each
    python -m pcomp_jax.generate --prompt "What is the capital of France?" --method full

With ``--config`` (or without ``--prompt``) the input is ``--context-file`` (plain text,
or JSONL with ``context`` and ``question`` fields) or, by default, the config's synthetic
task; it prints the answer, whether it is right when known, the selected chunks and
the time of each stage. Several questions (``--question`` repeated, or
``--questions-file`` with one a line) read the context once (``read_document``) and ask
each; every answer is printed and ``--output-json`` writes the list of records. A
``--questions-file`` ending in ``.jsonl`` holds requests, one JSON object a line:
``{"question": ...}`` about the common context, or with a context of its own,
``{"context": ..., "question": ...}`` or ``{"context_file": path, "question": ...}`` (a
relative path from the questions file's folder); they are answered as one batch
(``answer_batch``: each distinct context read once, stage 2 and decoding batched).
``--prompt`` runs one prompt with full attention.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from ._startup import raise_if_interrupted
from .checkpoints import load_model
from .config import DTYPE_CHOICES
from .cli import (add_cache_flags, cache_overrides, exit_interrupted, finish, quiet_transformers,
                  use_compilation_cache)
from .config import RunConfig, load_config, to_dict
from .decode import generate_full
from .distributed import add_distributed_flags, distributed_overrides, initialize, is_main
from .errors import InputTooLongError, PcompError
from .methods import WholeInput, method_names
from .plans import check_settings, method_of
from .io import check_writable, read_context_file, read_text
from .memory import estimate_batch_memory, estimate_memory
from .pipeline import answer_parts
from .chunking import encode_parts
from .document import answer_batch, read_document
from .document.batch import request_batches
from .sharding import make_mesh
from .tasks import Task, make_task


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pcomp_jax.generate", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", metavar="YAML", help="run config (model, pipeline, task); see configs/")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE",
                   help="override a config field, e.g. --set pipeline.chunk_len=1024 (repeatable)")
    p.add_argument("--context-file", metavar="PATH", help="plain text, or .jsonl with context and question fields")
    p.add_argument("--record", type=int, default=0, help="which JSONL record to answer (default: 0)")
    p.add_argument("--question", action="append", metavar="TEXT",
                   help="the question (required with a plain-text context file); repeat it to ask several "
                        "questions about one reading of the context")
    p.add_argument("--questions-file", metavar="PATH",
                   help="ask each non-empty line of PATH about one reading of the context (not with --question); a "
                        ".jsonl file: one request a line, {\"question\": ...} with an optional \"context\" or "
                        "\"context_file\" of its own, answered as one batch")
    p.add_argument("--batch-size", type=int, metavar="N",
                   help="with a .jsonl --questions-file: answer at most N requests at once (memory grows with N; "
                        "--dry-run estimates the largest batch); default: all of them")
    p.add_argument("--prompt", help="answer this prompt alone with full attention instead")
    p.add_argument("--method", choices=method_names(), help="shorthand for --set pipeline.method=...")
    p.add_argument("--model", help="shorthand for --set model=... (HF dir, .gguf, or the default name)")
    p.add_argument("--dtype", choices=DTYPE_CHOICES, help="shorthand for --set dtype=... (auto: bfloat16 on GPU/TPU and on CPUs with bfloat16 dot units, else float32)")
    p.add_argument("--max-new-tokens", type=int, help="shorthand for --set max_new_tokens=...")
    p.add_argument("--no-chat", action="store_true", help="do not use the model's chat template")
    p.add_argument("--output-json", metavar="PATH", help="also write the result as JSON to PATH")
    p.add_argument("--dry-run", action="store_true",
                   help="run nothing: print the estimated peak device memory (compiled, not run) and whether it fits")
    add_cache_flags(p)
    add_distributed_flags(p)
    return p


def _overrides(args) -> list[str]:
    extra = list(args.overrides)
    for flag, field in [("method", "pipeline.method"), ("model", "model"), ("dtype", "dtype"),
                        ("max_new_tokens", "max_new_tokens")]:
        value = getattr(args, flag)
        if value is not None:
            extra.append(f"{field}={json.dumps(value) if isinstance(value, str) else value}")
    if args.no_chat:
        extra.append("pipeline.chat=false")
    extra += distributed_overrides(args) + cache_overrides(args)
    if args.prompt is not None and args.method is None:
        extra.append("pipeline.method=full")  # a lone prompt runs with full attention (the registry's name)
    return extra


def check_new_tokens_fit(model, parts, config, max_new_tokens: int) -> None:
    """Refuses (``InputTooLongError``, with the numbers) ``max_new_tokens`` that cannot fit in
    the model's window next to what the answering row always holds: P and Q for one-row
    methods; P, one chunk's positions and Q for the chunked methods' merged row."""
    method = method_of(config)
    window = model.config.window
    fixed, what = len(parts.prefix) + len(parts.question), "the prefix and question"
    if not method.plain_row:
        fixed += min(method.chunk_len(config, parts), len(parts.context))
        what = "the prefix, one chunk and the question"
    if fixed + max_new_tokens > window:
        raise InputTooLongError(
            f"max_new_tokens={max_new_tokens} does not fit: {what} take {fixed} of the model's window of {window} "
            f"tokens, which leaves room for at most {max(window - fixed, 0)} new tokens")


def read_requests(path: str) -> list[tuple[str | None, str]]:
    """The requests of a ``.jsonl`` questions file: ``(context or None, question)`` per
    non-empty line (None: the common context); a ``context_file`` is read (relative paths
    from the file's folder). Errors name the line and what is wrong."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = [(n, line) for n, line in enumerate(f.read().splitlines(), 1) if line.strip()]
    except (OSError, UnicodeDecodeError) as err:
        raise PcompError(f"cannot read --questions-file {path!r}: {err}") from err
    if not lines:
        raise PcompError(f"--questions-file {path!r} has no requests (one JSON object a line)")
    requests, texts = [], {}
    for n, line in lines:
        where = f"--questions-file {path!r} line {n}"
        try:
            item = json.loads(line)
        except json.JSONDecodeError as err:
            raise PcompError(f"{where} is not valid JSON: {err.msg}") from None
        if not isinstance(item, dict) or not isinstance(item.get("question"), str) or not item["question"].strip():
            raise PcompError(f"{where} needs a non-empty string field 'question' (and optionally 'context' or "
                             "'context_file')")
        unknown = sorted(set(item) - {"question", "context", "context_file"})
        if unknown:
            raise PcompError(f"{where}: unknown field {unknown[0]!r}; allowed: question, context, context_file")
        if "context" in item and "context_file" in item:
            raise PcompError(f"{where} gives both 'context' and 'context_file'; give one")
        context = item.get("context")
        if "context_file" in item:
            name = item["context_file"]
            if not isinstance(name, str) or not name:
                raise PcompError(f"{where}: 'context_file' must be a path (a string)")
            name = os.path.join(os.path.dirname(os.path.abspath(path)), name)
            if name not in texts:
                texts[name] = read_context_file(name, 0, item["question"]).context
            context = texts[name]
        if context is not None and (not isinstance(context, str) or not context.strip()):
            raise PcompError(f"{where}: 'context' must be a non-empty string")
        requests.append((context, item["question"]))
    return requests


def read_questions(args) -> list[str] | None:
    """The questions of ``--question`` (repeatable) or ``--questions-file``; None when neither is given."""
    if args.question is not None and args.questions_file is not None:
        raise PcompError("give the questions with --question or with --questions-file, not both")
    if args.questions_file is not None and args.questions_file.endswith(".jsonl"):
        return read_requests(args.questions_file)
    if args.questions_file is not None:
        try:
            with open(args.questions_file, encoding="utf-8") as f:
                text = f.read()
        except (OSError, UnicodeDecodeError) as err:
            raise PcompError(f"cannot read --questions-file {args.questions_file!r}: {err}") from err
        questions = [line.strip() for line in text.splitlines() if line.strip()]
        if not questions:
            raise PcompError(f"--questions-file {args.questions_file!r} has no questions (one per line)")
        return questions
    if args.question is not None and not all(q.strip() for q in args.question):
        raise PcompError("--question must not be empty")
    return args.question


def run(args) -> dict | list[dict]:
    """Runs the command; returns the JSON record (a list of them for several questions).
    Everything that can be checked without the model (the config, the output path, the input
    files, the questions) is checked before it loads."""
    questions = read_questions(args)
    requests = None
    if questions and isinstance(questions[0], tuple):  # a .jsonl questions file: requests, answered as one batch
        requests, questions = questions, [q for _, q in questions]
    several = questions is not None and (len(questions) > 1 or args.questions_file is not None)
    if several and (args.prompt is not None or (args.dry_run and requests is None)):
        raise PcompError("several questions (--question repeated, --questions-file) are asked about a long input, "
                         "without --prompt (and --dry-run only with a .jsonl --questions-file); give a single "
                         "--question there")
    if args.batch_size is not None and requests is None:
        raise PcompError("--batch-size applies to a .jsonl --questions-file (requests answered in batches)")
    if args.batch_size is not None and args.batch_size < 1:
        raise PcompError(f"--batch-size must be a whole number >= 1, got {args.batch_size}")
    args.question = questions[0] if questions else None  # one question: the single-question path
    config: RunConfig = load_config(args.config, _overrides(args))
    check_settings(config.pipeline)
    if args.prompt is not None:
        if args.dry_run:
            raise PcompError("--dry-run estimates a run on a long input (--config, --context-file); not with --prompt")
        method = method_of(config.pipeline)
        if not (method.plain_row and method.fit == WholeInput()):
            raise PcompError("--prompt runs with full attention only; use --context-file/--question for other methods")
        if not args.prompt.strip():
            raise PcompError("--prompt is empty; give the text to answer")
        task = None
    elif args.context_file:
        task = read_context_file(args.context_file, args.record, args.question)
    else:
        text = read_text(config.task.text_file, "the needle task's") if config.task.kind == "needle" else None
    initialize(config.distributed)  # before any other JAX call (is_main() is one)
    if args.output_json and is_main():
        check_writable(args.output_json, "--output-json", {
            "--config": args.config, "--context-file": args.context_file, "--questions-file": args.questions_file,
            "needle text (task.text_file)": config.task.text_file})
    use_compilation_cache(config.compilation_cache)
    start = time.perf_counter()
    mesh = make_mesh(config.pipeline.num_devices, config.pipeline.model_parallel)
    model = load_model(config.model, dtype=config.dtype, mesh=mesh)  # an orbax directory: restored onto the mesh
    load_s = time.perf_counter() - start
    if args.prompt is not None:
        t = time.perf_counter()
        result = generate_full(model, args.prompt, max_new_tokens=config.max_new_tokens, chat=config.pipeline.chat)
        return {"method": method.name, "answer": result.text, "token_ids": result.token_ids,
                "prompt_tokens": result.prompt_length, "timings_s": {"load": load_s, "generate": time.perf_counter() - t}}
    if model.tokenizer is None:
        raise PcompError(f"{model.source!r} has no tokenizer; the command line needs one to read text")
    if not args.context_file:
        task = make_task(config.task.kind, model.tokenizer, config.task.length, config.task.depth, config.task.seed, text)
        if args.question:
            task = Task(task.context, args.question, "")
    t = time.perf_counter()
    parts = encode_parts(model.tokenizer, task.context, task.question, config.pipeline.instruction,
                         config.pipeline.answer_prefix, config.pipeline.chat)
    tokenize_s = time.perf_counter() - t
    check_new_tokens_fit(model, parts, config.pipeline, config.max_new_tokens)
    if requests is not None:
        pairs = [(task.context if context is None else context, q) for context, q in requests]
    if args.dry_run:
        if requests is None:
            estimate = estimate_memory(model, parts, config.pipeline, config.max_new_tokens)
        else:  # the largest of the batches the run would make
            asked = [encode_parts(model.tokenizer, c, q, config.pipeline.instruction, config.pipeline.answer_prefix,
                                  config.pipeline.chat) for c, q in pairs]
            estimate = max((estimate_batch_memory(model, [asked[i] for i in batch], config.pipeline,
                                                  config.max_new_tokens)
                            for batch in request_batches(asked, args.batch_size or len(asked))), key=lambda e: e.peak)
        if is_main():
            print(estimate.table())
        estimate.check(config.pipeline)  # refused (exit 2) when it cannot fit
        return {"dry_run": True, "peak_bytes": estimate.peak, "checked_bytes": estimate.checked,
                "weights_bytes": estimate.weights, "selection_bytes": estimate.selection,
                "phase_bytes": estimate.phase_totals, "device_limit_bytes": estimate.device_limit,
                "timings_s": {"load": load_s}}
    if requests is not None:
        results = answer_batch(model, pairs, config.pipeline, config.max_new_tokens, progress=is_main(),
                               batch_size=args.batch_size)
        return [record(config, Task(context, q, ""), r, {"load": load_s, **r.timings})
                for (context, q), r in zip(pairs, results)]
    if several:
        t = time.perf_counter()
        doc = read_document(model, task.context, config.pipeline, progress=is_main())
        read_s = time.perf_counter() - t
        results = doc.ask_many(questions, config.max_new_tokens, progress=is_main())
        return [record(config, Task(task.context, q, ""), r,
                       {"load": load_s, **({"read_document": read_s} if i == 0 else {}), **r.timings})
                for i, (q, r) in enumerate(zip(questions, results))]
    result = answer_parts(model, parts, config.pipeline, config.max_new_tokens, progress=is_main(),
                          timings={"tokenize": tokenize_s})
    return record(config, task, result, {"load": load_s, **result.timings})


def record(config: RunConfig, task: Task, result, timings: dict) -> dict:
    """The JSON record of one answered question."""
    return {
        "method": result.method,
        "question": task.question,
        "answer": result.text,
        "expected": task.answer or None,
        "correct": task.is_correct(result.text) if task.answer else None,
        "selected_chunks": result.selected_chunks,
        "chunk_scores": result.chunk_scores,
        "num_chunks": result.num_chunks,
        "context_tokens": result.context_tokens,
        "token_ids": result.token_ids,
        "timings_s": timings,
        "config": to_dict(config),
    }


def main(argv: list[str] | None = None) -> int:
    quiet_transformers()
    args = build_parser().parse_args(argv)
    try:
        result = run(args)
        raise_if_interrupted()  # a Ctrl-C that Python dropped still ends the command as interrupted
    except PcompError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C: one line, exit 130
        return exit_interrupted()
    if not is_main():  # every process has the same answer; process 0 reports it
        return 0
    if isinstance(result, list):  # several questions: each answer under its question
        for i, one in enumerate(result):
            print(f"question {i + 1}: {one['question']}")
            print_record(one)
    elif result.get("dry_run"):  # the estimate's table is printed already; --output-json gets it as JSON
        pass
    else:
        print_record(result)
    if args.output_json:
        try:
            with open(args.output_json, "w") as f:
                json.dump(result, f, indent=2)
        except OSError as err:  # checked before the run; the path changed since
            print(f"error: cannot write --output-json {args.output_json!r}: {err.strerror}; the result:\n"
                  + json.dumps(result), file=sys.stderr)
            return 1
    return 0


def print_record(record: dict) -> None:
    """Prints one answered question: the answer, whether it is right when known, the chunks, the timings."""
    print(record["answer"].strip())
    if "selected_chunks" in record:
        verdict = {True: "right", False: "wrong", None: "unknown"}[record["correct"]]
        print(f"correct: {verdict} (expected {record['expected']!r})" if record["expected"] else "correct: unknown")
        print(f"context: {record['context_tokens']} tokens in {record['num_chunks']} chunks; "
              f"selected chunks: {record['selected_chunks']}")
    print("timings: " + ", ".join(f"{k} {v:.2f}s" for k, v in record["timings_s"].items()))


if __name__ == "__main__":
    finish(main())
