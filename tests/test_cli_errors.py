"""Issue 15: what a new user runs into gets one line (``error: ...``), a non-zero exit and no
traceback; inputs are checked before the model loads where they can be (the tests name a
model that does not exist to show that it never loaded); Ctrl-C stops a run with exit 130;
the compilation cache; the shipped configs need no file outside the repository."""

import logging
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from pcomp_jax import cli
from pcomp_jax.config import ConfigError, RunConfig, load_config
from pcomp_jax.eval import EvalConfig
from pcomp_jax.eval import main as eval_main
from pcomp_jax.generate import main
from pcomp_jax.io import BUNDLED_TEXT, read_text

pytestmark = pytest.mark.slow  # subprocesses or whole pipelines: the full suite, not the fast tier

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NO_MODEL = ["--model", "/nonexistent/model"]  # an error about anything else shows the model never loaded


def one_error_line(capsys, *needles):
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err and "model source" not in err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def test_set_value_that_is_not_yaml(capsys, tmp_path):
    assert main(["--config", "configs/demo.yaml", "--set", "pipeline.chunk_len=[1,", *NO_MODEL]) == 2
    one_error_line(capsys, "--set pipeline.chunk_len", "not valid YAML")
    assert eval_main(["--config", "configs/eval_retrieval.yaml", "--set", "lengths=[1024,",
                      "--output-dir", str(tmp_path / "o")]) == 2
    one_error_line(capsys, "--set lengths", "not valid YAML")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("extra", [["--set", "max_new_tokens=4"], ["--method", "full"], []])
def test_config_file_that_is_a_list(capsys, tmp_path, extra):
    config = tmp_path / "list.yaml"
    config.write_text("- model: smollm2-135m-instruct\n- dtype: float32\n")
    assert main(["--config", str(config), *extra, *NO_MODEL]) == 2
    one_error_line(capsys, "must be a mapping of fields", "got a list")
    assert eval_main(["--config", str(config), *(extra[:2] if extra[:1] == ["--set"] else [])]) == 2
    one_error_line(capsys, "must be a mapping of fields")


def test_config_file_with_broken_yaml_names_the_line(capsys, tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text("model: x\npipeline: {chunk_len: 512\n")
    assert main(["--config", str(config), *NO_MODEL]) == 2
    one_error_line(capsys, "is not valid YAML at line")


def test_output_json_checked_before_the_run(capsys, tmp_path):
    assert main(["--prompt", "hi", "--output-json", str(tmp_path / "missing_dir" / "r.json"), *NO_MODEL]) == 2
    one_error_line(capsys, "--output-json", "does not exist")
    assert main(["--prompt", "hi", "--output-json", str(tmp_path), *NO_MODEL]) == 2  # a directory
    one_error_line(capsys, "is a directory")
    out = tmp_path / "r.json"
    assert main(["--prompt", "hi", "--output-json", str(out), *NO_MODEL]) == 2  # writable: the model's error
    assert "model source" in capsys.readouterr().err and not out.exists()  # the check leaves no file


def test_output_json_never_replaces_an_input(capsys, tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(open(os.path.join(REPO, "configs", "demo.yaml")).read())
    book = tmp_path / "book.txt"
    book.write_text("The cat sat on the mat. " * 20)
    questions = tmp_path / "q.txt"
    questions.write_text("where did the cat sit?\n")
    alias = tmp_path / "alias.yaml"
    alias.symlink_to(config)
    before = {p: p.read_bytes() for p in (config, book, questions)}
    common = ["--config", str(config), "--context-file", str(book), *NO_MODEL]
    for out, name in [(config, "--config"), (alias, "--config"), (book, "--context-file"),
                      (tmp_path / "." / "book.txt", "--context-file")]:
        assert main([*common, "--question", "where?", "--output-json", str(out)]) == 2
        one_error_line(capsys, "--output-json", f"is the run's {name}", "would replace it")
    assert main([*common, "--questions-file", str(questions), "--output-json", str(questions)]) == 2
    one_error_line(capsys, "is the run's --questions-file")
    assert {p: p.read_bytes() for p in before} == before


@pytest.mark.parametrize("kind,message", [("missing", "No such file"), ("directory", "is a directory"),
                                          ("latin1", "not UTF-8")])
def test_eval_longbench_file_errors(capsys, tmp_path, kind, message):
    path = {"missing": tmp_path / "nonexistent.jsonl", "directory": tmp_path, "latin1": tmp_path / "l.jsonl"}[kind]
    if kind == "latin1":
        path.write_bytes('{"context": "caf\u00e9"}\n'.encode("latin-1"))
    assert eval_main(["--set", f"longbench={path}", "--set", "tasks=[]", "--set", "model=/nonexistent/model",
                      "--output-dir", str(tmp_path / "o")]) == 2
    one_error_line(capsys, "longbench file", message)


def test_context_and_text_files_checked_before_the_model_loads(capsys, tmp_path):
    assert main(["--context-file", str(tmp_path / "none.txt"), "--question", "q", *NO_MODEL]) == 2
    one_error_line(capsys, "cannot read context file", "No such file")
    (tmp_path / "bin.txt").write_bytes(b"\xff\xfe text")
    assert main(["--context-file", str(tmp_path / "bin.txt"), "--question", "q", *NO_MODEL]) == 2
    one_error_line(capsys, "not UTF-8")
    assert main(["--set", "task.kind=needle", "--set", f"task.text_file={tmp_path}", *NO_MODEL]) == 2
    one_error_line(capsys, "the needle task's text_file", "Is a directory")


def test_empty_prompt_refused_before_the_model_loads(capsys):
    assert main(["--prompt", "", *NO_MODEL]) == 2
    one_error_line(capsys, "--prompt is empty")
    assert main(["--prompt", "  \n", *NO_MODEL]) == 2
    one_error_line(capsys, "--prompt is empty")


def test_max_new_tokens_against_the_window(hf_checkpoints, tmp_path, capsys):
    path, _ = hf_checkpoints("llama_gqa_untied")  # window of 256 tokens
    capsys.readouterr()  # the checkpoint writer's progress
    text = tmp_path / "book.txt"
    text.write_text("the cat sat on the mat. " * 40)
    common = ["--model", path, "--context-file", str(text), "--question", "where?", "--set", "pipeline.chunk_len=48"]
    assert main([*common, "--max-new-tokens", "100000"]) == 2
    line = one_error_line(capsys, "max_new_tokens=100000 does not fit", "window of 256 tokens")
    room = int(line.split("at most ")[1].split()[0])
    assert 0 < room < 256
    assert main([*common, "--max-new-tokens", "100000", "--method", "full"]) == 2
    one_error_line(capsys, "max_new_tokens=100000 does not fit", "the prefix and question")
    assert main(["--prompt", "the cat", "--model", path, "--max-new-tokens", "100000"]) == 2
    one_error_line(capsys, "max_new_tokens=100000", "window of 256 tokens")
    assert main([*common, "--max-new-tokens", str(room), "--output-json", str(tmp_path / "r.json")]) == 0
    assert (tmp_path / "r.json").exists()  # the largest allowed value runs
    capsys.readouterr()
    assert eval_main(["--set", f"model={path}", "--set", "max_new_tokens=100000", "--set", "tasks=[passkey]",
                      "--set", "lengths=[150]", "--set", "pipeline.chunk_len=48", "--set", "pipeline.obs_window=4",
                      "--set", "methods=[{name: pc, method: parallelcomp}]", "--output-dir", str(tmp_path / "o")]) == 2
    one_error_line(capsys, "max_new_tokens=100000 does not fit", "window of 256 tokens")


def test_shipped_configs_need_no_file_outside_the_repository():
    assert RunConfig().task.text_file is None and EvalConfig().text_file is None
    assert EvalConfig().perplexity.text_file is None
    for name in sorted(os.listdir(os.path.join(REPO, "configs"))):
        path = os.path.join(REPO, "configs", name)
        text = open(path).read()
        assert "../" not in text, name
        config = load_config(path, cls=EvalConfig if name.startswith("eval") else RunConfig)
        files = [config.text_file, config.perplexity.text_file] if name.startswith("eval") else [config.task.text_file]
        for f in files:
            assert f is None or os.path.isfile(os.path.join(REPO, f)), (name, f)
    assert os.path.abspath(BUNDLED_TEXT).startswith(REPO)
    assert len(read_text(None, "the bundled")) > 150_000  # ~52K SmolLM2 tokens: 32K-token needles and prefixes


def test_cli_drops_only_the_pytorch_notice():
    cli.quiet_transformers()
    logger = logging.getLogger("transformers")
    seen = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())
    logger.addHandler(handler)
    try:
        logger.warning("PyTorch was not found. Models won't be available and only tokenizers, configuration and "
                       "file/data utilities can be used.")
        logger.warning("Some other warning")
    finally:
        logger.removeHandler(handler)
    assert seen == ["Some other warning"]


def test_compilation_cache_flags_and_field(tmp_path):
    assert load_config(None, ["compilation_cache=null"]).compilation_cache is None
    assert RunConfig().compilation_cache == cli.DEFAULT_COMPILATION_CACHE
    assert cli.default_compilation_cache({"HOME": "/h"}).endswith(os.path.join(".cache", "pcomp_jax", "jax"))
    assert cli.default_compilation_cache({"XDG_CACHE_HOME": "/x"}) == os.path.join("/x", "pcomp_jax", "jax")
    assert cli.default_compilation_cache({"PCOMP_JAX_COMPILATION_CACHE": "/c", "XDG_CACHE_HOME": "/x"}) == "/c"
    assert cli.default_compilation_cache({"PCOMP_JAX_COMPILATION_CACHE": ""}) is None  # empty: off
    args = type("A", (), {"no_compilation_cache": False, "compilation_cache": str(tmp_path)})()
    assert load_config(None, cli.cache_overrides(args)).compilation_cache == str(tmp_path)
    args.no_compilation_cache = True
    assert load_config(None, cli.cache_overrides(args)).compilation_cache is None


def _run_generate(args, env=None, **kw):
    env = {**(env or os.environ), "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.Popen([sys.executable, "-m", "pcomp_jax.generate", *args], cwd=REPO, env=env, **kw)


def test_compilation_cache_goes_where_the_flag_says(hf_checkpoints, tmp_path):
    path, _ = hf_checkpoints("llama_gqa_untied")
    default, cache = tmp_path / "default", tmp_path / "cache"
    env = {**os.environ, "PCOMP_JAX_COMPILATION_CACHE": str(default)}  # the default directory, moved by the flag
    run = _run_generate(["--prompt", "the cat", "--model", path, "--max-new-tokens", "2",
                         "--compilation-cache", str(cache)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                        text=True)
    out, err = run.communicate(timeout=300)
    assert run.returncode == 0, err
    assert cache.is_dir() and len(os.listdir(cache)) > 0  # compiled programs kept for the next run
    assert not default.exists()
    assert "PyTorch was not found" not in err


def test_ctrl_c_mid_prefill_exits_130_without_traceback(hf_checkpoints, tmp_path):
    """SIGINT while the chunk groups run: one line, exit 130, soon (one group's time)."""
    path, _ = hf_checkpoints("llama_gqa_untied")
    text = tmp_path / "book.txt"
    text.write_text("the cat sat on the mat and the dog ran in the sun. " * 6000)  # ~1500 chunk groups
    log = tmp_path / "stderr.txt"
    with open(log, "w") as err:
        run = _run_generate(["--model", path, "--context-file", str(text), "--question", "where?",
                             "--set", "pipeline.chunk_len=48", "--set", "pipeline.group_size=1",
                             "--max-new-tokens", "2", "--no-compilation-cache"], stdout=subprocess.DEVNULL, stderr=err)
        deadline = time.time() + 240
        while time.time() < deadline and run.poll() is None:  # wait until some groups have finished
            bar = log.read_text().split("\r")[-1]
            if "chunk groups:" in bar and bar.split("|")[-1].strip().split("/")[0].isdigit() \
                    and int(bar.split("|")[-1].strip().split("/")[0]) >= 3:
                break
            time.sleep(0.2)
        assert run.poll() is None, "the run ended before it could be interrupted: " + log.read_text()[-2000:]
        sent = time.time()
        run.send_signal(signal.SIGINT)
        rc = run.wait(timeout=60)
        stopped_in = time.time() - sent
    stderr = log.read_text()
    assert rc == 130, stderr[-2000:]
    assert "Traceback" not in stderr and stderr.rstrip().endswith("interrupted")
    assert stopped_in < 20, stopped_in


def test_eval_ctrl_c_keeps_finished_predictions_and_resumes(hf_checkpoints, tmp_path):
    path, _ = hf_checkpoints("llama_gqa_untied")
    out = tmp_path / "o"
    config = tmp_path / "e.yaml"
    config.write_text(
        f"model: {path}\noutput_dir: {out}\ntasks: [passkey]\nlengths: [150, 180, 210]\nmax_new_tokens: 2\n"
        f"depths: [{', '.join(str(d / 20) for d in range(21))}]\nseeds: [0, 1, 2, 3, 4, 5, 6, 7]\n"
        "pipeline: {chunk_len: 48, obs_window: 4}\nmethods: [{name: pc, method: parallelcomp}]\n")
    env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
    command = [sys.executable, "-m", "pcomp_jax.eval", "--config", str(config), "--no-progress"]
    predictions = out / "pc" / "predictions.jsonl"
    run = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while time.time() < deadline and run.poll() is None and not (predictions.exists() and predictions.read_text()):
        time.sleep(0.2)
    assert run.poll() is None, "the sweep ended before it could be interrupted"
    run.send_signal(signal.SIGINT)
    _, err = run.communicate(timeout=60)
    assert run.returncode == 130 and "Traceback" not in err and err.rstrip().endswith("interrupted"), err
    done = predictions.read_text().splitlines()
    assert 1 <= len(done) < 3 * 21 * 8 and (out / "summary.md").exists()  # what finished is kept and summed up
    first = ["--set", "lengths=[150]", "--set", "depths=[0.0]", "--set", "seeds=[0]"]  # the first item run
    again = subprocess.run(command + first, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert again.returncode == 0, again.stderr
    assert "resuming: 1 finished predictions kept, 0 to run" in again.stderr


DROPPED_INTERRUPT = """
import signal, sys
sys.argv[:1] = ["-m"]  # as `python -m pcomp_jax.<command>` imports the package
from pcomp_jax import _startup
from pcomp_jax.prefill import for_each_group

class InterruptedWhileCollected:
    def __del__(self):  # Python cannot raise from here: it prints "Exception ignored" and drops it
        signal.raise_signal(signal.SIGINT)

InterruptedWhileCollected()  # collected at once: the Ctrl-C arrives and is dropped
print("still running", flush=True)
try:
    for_each_group([1, 2, 3], lambda group: print("group", group, flush=True) or group)
except KeyboardInterrupt:
    print("interrupted at a group", flush=True)
"""


def test_a_ctrl_c_python_drops_is_raised_at_the_next_unit_of_work():
    """A Ctrl-C that lands where Python cannot raise it (a finalizer, a garbage-collection
    callback) is remembered: the next chunk group (or evaluation item) raises it, quietly."""
    run = subprocess.run([sys.executable, "-c", DROPPED_INTERRUPT], cwd=REPO, capture_output=True, text=True,
                         timeout=120)
    assert run.stdout.split("\n")[:4] == ["still running", "group 1", "group 2", "interrupted at a group"], run
    assert "Exception ignored" not in run.stderr and "Traceback" not in run.stderr, run.stderr


def test_chunk_group_bar_advances_when_the_group_is_done(hf_checkpoints, monkeypatch):
    """Each step of the bar reports a group whose result is computed (not just dispatched)."""
    import jax
    import tqdm.auto

    import pcomp_jax
    from pcomp_jax import prefill

    model = pcomp_jax.load_model(hf_checkpoints("llama_gqa_untied")[0])
    states, steps = [], []
    real_keep = prefill.keep_best_chunks

    def keep(*args, **kw):  # the real function; its results recorded in group order
        states.append(real_keep(*args, **kw))
        return states[-1]

    class Bar(tqdm.auto.tqdm):
        def update(self, n=1):
            group = len(steps)
            steps.append(all(leaf.is_ready() for leaf in jax.tree.leaves(states[group])))
            return super().update(n)

    monkeypatch.setattr(prefill, "keep_best_chunks", keep)
    monkeypatch.setattr(prefill, "tqdm", Bar)
    config = pcomp_jax.ParallelCompConfig(chunk_len=48, group_size=1, obs_window=4, num_devices=1)
    result = pcomp_jax.answer(model, "the cat sat on the mat. " * 60, "where?", config, 2, progress=True)
    assert result.num_chunks >= 4 and len(steps) == len(states) == result.num_chunks  # group_size 1: a chunk each
    assert all(steps)


def test_config_files_that_are_not_utf8_or_empty(capsys, tmp_path):
    config = tmp_path / "c.yaml"
    config.write_bytes(open(os.path.join(REPO, "configs", "demo.yaml"), "rb").read() + b"# caf\xe9\n")
    assert main(["--config", str(config), *NO_MODEL]) == 2
    one_error_line(capsys, "is not UTF-8 text", "save it as UTF-8")
    assert eval_main(["--config", str(config)]) == 2
    one_error_line(capsys, "is not UTF-8 text")
    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing but a comment\n")
    assert main(["--config", str(empty), *NO_MODEL]) == 2
    one_error_line(capsys, "is empty", "leave --config out to run the defaults")
    assert eval_main(["--config", str(empty)]) == 2
    one_error_line(capsys, "is empty")


@pytest.mark.parametrize("record, message", [
    ({"context": "The cat sat.", "question": 42}, "'question' must be a string, got int"),
    ({"context": "The cat sat.", "question": "who?", "answer": {"a": 1}}, "'answer' must be a string, a number"),
])
def test_jsonl_fields_of_the_wrong_type(capsys, tmp_path, record, message):
    path = tmp_path / "c.jsonl"
    path.write_text(json.dumps(record) + "\n")
    assert main(["--context-file", str(path), *NO_MODEL]) == 2
    one_error_line(capsys, message)


def test_record_applies_to_jsonl_only(capsys, tmp_path):
    path = tmp_path / "c.txt"
    path.write_text("The cat sat on the mat.")
    assert main(["--context-file", str(path), "--question", "who?", "--record", "3", *NO_MODEL]) == 2
    one_error_line(capsys, "--record 3 applies to .jsonl files")


def test_a_prediction_line_that_is_not_utf8_runs_again(tmp_path, capsys):
    from pcomp_jax.eval.runner import read_predictions

    path = tmp_path / "predictions.jsonl"
    path.write_bytes(json.dumps({"id": "a", "prediction": "x"}).encode() + b"\n{\"id\": \"b\xff\"}\n")
    assert list(read_predictions(str(path))) == ["a"]
    assert "is not a complete prediction record" in capsys.readouterr().err


def test_an_empty_context_file_is_refused_before_the_model_loads(capsys, tmp_path):
    path = tmp_path / "empty.txt"
    path.write_text("  \n")
    assert main(["--context-file", str(path), "--question", "who?", *NO_MODEL]) == 2
    one_error_line(capsys, "is empty")


def test_an_unwritable_compilation_cache(tmp_path, monkeypatch, capsys):
    import jax

    blocker = tmp_path / "a_file"
    blocker.write_text("")
    unwritable = str(blocker / "cache")
    before = jax.config.jax_compilation_cache_dir
    with pytest.raises(ConfigError, match="cannot be written"):  # chosen by the user: an error
        cli.use_compilation_cache(unwritable)
    monkeypatch.setattr(cli, "DEFAULT_COMPILATION_CACHE", unwritable)  # the default: one warning, run without it
    cli.use_compilation_cache(unwritable)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("warning: the compilation cache") and "running without it" in err[0]
    assert jax.config.jax_compilation_cache_dir == before


@pytest.mark.parametrize("after_s", [0.3, 0.8])
def test_ctrl_c_while_the_package_imports_is_one_line(tmp_path, after_s):
    """SIGINT at any moment of the start-up (the imports take about two seconds): one line, exit 130."""
    log = tmp_path / "stderr.txt"
    with open(log, "w") as err:
        run = _run_generate(["--prompt", "hi", *NO_MODEL], stdout=subprocess.DEVNULL, stderr=err)
        time.sleep(after_s)
        run.send_signal(signal.SIGINT)
        rc = run.wait(timeout=60)
    stderr = log.read_text()
    if rc == 2 or "error: model source" in stderr:  # the start-up was faster than the signal: nothing to check
        pytest.skip("the command had finished its start-up before the signal")
    assert rc == 130, stderr[-2000:]
    assert "Traceback" not in stderr and stderr.strip() == "interrupted", stderr[-2000:]


BAD_INPUTS = {  # name -> (command module, arguments, files to write {name: bytes}, words of the one error line)
    "config not UTF-8": ("generate", ["--config", "{c.yaml}"], {"c.yaml": b"model: x\n# caf\xe9\n"}, "not UTF-8"),
    "empty config": ("eval", ["--config", "{e.yaml}"], {"e.yaml": b""}, "is empty"),
    "negative task seed": ("generate", ["--set", "task.seed=-1"], {}, "task.seed must be >= 0"),
    "negative eval seed": ("eval", ["--set", "seeds=[-1]"], {}, "seeds must be whole numbers >= 0"),
    "eval length under the minimum": ("eval", ["--set", "lengths=[10]"], {}, "at least 64 tokens"),
    "output is the config": ("generate", ["--config", "{c.yaml}", "--output-json", "{c.yaml}", "--question", "q",
                                          "--context-file", "{b.txt}"],
                             {"c.yaml": b"max_new_tokens: 4\n", "b.txt": b"The cat sat."}, "is the run's --config"),
    "record on a text file": ("generate", ["--context-file", "{b.txt}", "--question", "q", "--record", "2"],
                              {"b.txt": b"The cat sat."}, "applies to .jsonl files"),
    "question that is a number": ("generate", ["--context-file", "{r.jsonl}"],
                                  {"r.jsonl": b'{"context": "The cat sat.", "question": 7}\n'}, "must be a string"),
    "empty context file": ("generate", ["--context-file", "{b.txt}", "--question", "q"], {"b.txt": b"\n"}, "is empty"),
}


# Cases run as their own process (as a user meets them: the `python -m` entry, one per
# command); the others call the same command's main() in this process (the same code after
# the imports), which costs no interpreter start-up.
OWN_PROCESS = {"config not UTF-8", "empty config"}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_through_the_command_line_is_one_line(case, tmp_path, capsys):
    """Each case: exit 2, one 'error:' line, no traceback, the model never loads (it does not
    exist), the input files untouched."""
    command, args, files, words = BAD_INPUTS[case]
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    args = [str(tmp_path / a[1:-1]) if a.startswith("{") else a for a in args]
    extra = ["--model", "/nonexistent/model"] if command == "generate" else ["--output-dir", str(tmp_path / "out")]
    if case in OWN_PROCESS:
        env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
        done = subprocess.run([sys.executable, "-m", f"pcomp_jax.{command}", *args, *extra], cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=120)
        rc, stderr = done.returncode, done.stderr
    else:
        rc = (main if command == "generate" else eval_main)([*args, *extra])
        stderr = capsys.readouterr().err
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("error: "), stderr[-2000:]
    assert words in lines[0] and "Traceback" not in stderr
    for name, data in files.items():
        assert (tmp_path / name).read_bytes() == data  # inputs untouched
