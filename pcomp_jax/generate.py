"""Command line: answer a prompt with a Llama-family model.

    python -m pcomp_jax.generate --prompt "What is the capital of France?" --method full

``--method full`` runs the whole prompt with full attention (``generate_full``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from .checkpoints import DEFAULT_MODEL, DTYPES, load_model
from .decode import generate_full
from .errors import PcompError

METHODS = ("full",)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pcomp_jax.generate", description=__doc__.split("\n\n")[0])
    p.add_argument("--prompt", required=True, help="the prompt (a question, or text to continue with --no-chat)")
    p.add_argument("--method", choices=METHODS, default="full", help="inference method (default: full)")
    p.add_argument("--model", default=DEFAULT_MODEL, help="HF checkpoint dir, .gguf file, or the default model name")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="float32", help="weight dtype (default: float32)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="most tokens to generate (default: 64)")
    p.add_argument("--no-chat", action="store_true", help="do not wrap the prompt in the model's chat template")
    p.add_argument("--output-json", metavar="PATH", help="also write the result as JSON to PATH")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        start = time.perf_counter()
        model = load_model(args.model, dtype=args.dtype)
        loaded = time.perf_counter()
        result = generate_full(model, args.prompt, max_new_tokens=args.max_new_tokens, chat=not args.no_chat)
        done = time.perf_counter()
    except PcompError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(result.text)
    print(
        f"[{args.method}] prompt {result.prompt_length} tokens, {len(result.token_ids)} new tokens; "
        f"load {loaded - start:.1f}s, generate {done - loaded:.1f}s",
        file=sys.stderr,
    )
    if args.output_json:
        record = {
            "method": args.method,
            "prompt": args.prompt,
            "answer": result.text,
            "token_ids": result.token_ids,
            "prompt_tokens": result.prompt_length,
            "timings_s": {"load": loaded - start, "generate": done - loaded},
        }
        with open(args.output_json, "w") as f:
            json.dump(record, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
