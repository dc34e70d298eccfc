"""The evaluation harness on a tiny random model: the baselines, perplexity through every
method, and the runner's files, resume, aggregation and errors."""

import dataclasses
import json
import os

import numpy as np
import pytest
from bounds import assert_within, nll_bound

import pcomp_jax
from pcomp_jax import ParallelCompConfig, answer
from pcomp_jax.chunking import build_rows, encode_parts
from pcomp_jax.config import ConfigError, load_config
from pcomp_jax.decode import forward
from pcomp_jax.eval import EvalConfig, MethodSpec, Runner, SyntheticItem, evaluate, method_metrics, summary_markdown
from pcomp_jax.perplexity import continuation_nll, text_windows
from pcomp_jax.compress import RecentTokens
from pcomp_jax.prefill import PrefillSpec, prefill_group
from pcomp_jax.tasks import GENERATOR_VERSIONS, make_task
from pcomp_jax.errors import PcompError

WORDS = "the cat sat on a mat and then ran in the sun as the other one slept there".split()


def make_text(n_words: int, seed: int = 0) -> str:
    return " ".join(np.random.default_rng(seed).choice(WORDS, n_words))


@pytest.fixture(scope="module")
def model(hf_checkpoints):
    return pcomp_jax.load_model(hf_checkpoints("llama_gqa_untied")[0])


def test_streaming_keeps_the_most_recent_content_tokens(model):
    parts = encode_parts(model.tokenizer, make_text(40), "where?", "Read.", "Answer:", True)
    rows = build_rows(parts, 200, model.config.window, num_rows=1)
    sel = prefill_group(model.params, model.config, rows, PrefillSpec(capacity=10, token_scorer=RecentTokens()))
    p, c = rows.prefix_len, int(rows.chunk_lengths[0])
    kept = np.asarray(sel.kept_positions)  # [L, 1, KVH, 10]
    assert (kept == np.arange(p + c - 10, p + c)).all()


@pytest.mark.slow
def test_snapkv_baseline_is_one_chunk_with_snapkv_eviction(model):
    context, question = make_text(30, seed=3), "what did the cat do?"
    base = ParallelCompConfig(chunk_len=48, capacity=16, obs_window=4)
    snap = answer(model, context, question, dataclasses.replace(base, method="snapkv", kv_budget=20), 8)
    one_chunk = dataclasses.replace(base, method="parallelcomp", chunk_len=512, top_k_chunks=1, capacity=20)
    assert snap.token_ids == answer(model, context, question, one_chunk, 8).token_ids
    assert snap.num_chunks == 1
    # The default budget is what ParallelComp keeps: top_k_chunks (2) x capacity (16).
    default = answer(model, context, question, dataclasses.replace(base, method="snapkv"), 8)
    kept_32 = answer(model, context, question, dataclasses.replace(one_chunk, capacity=32), 8)
    no_eviction = answer(model, context, question, dataclasses.replace(one_chunk, capacity=None), 8)
    assert default.token_ids == kept_32.token_ids != no_eviction.token_ids


@pytest.mark.slow
def test_window_baselines_cut_long_inputs_and_keep_the_budget(model):
    context, question = make_text(400, seed=4), "what did the cat do?"  # longer than the 256-token window
    for method in ("snapkv", "streaming", "truncate"):
        out = answer(model, context, question, ParallelCompConfig(method=method, kv_budget=32), 6)
        assert out.context_tokens > model.config.window and len(out.token_ids) <= 6
    assert ParallelCompConfig(top_k_chunks=3, capacity=100, chunk_len=200).baseline_kv_budget == 300
    with pytest.raises(ConfigError, match="kv_budget must be >= 1"):
        ParallelCompConfig(kv_budget=0)
    with pytest.raises(ConfigError, match="calibration applies to the chunked methods"):
        answer(model, context, question, ParallelCompConfig(method="snapkv", calibration_preset="remove_shallow_sink"))


def reference_nll(model, prefix, continuation) -> np.ndarray:
    """Continuation NLL from plain full-attention logits (log-softmax in NumPy, float64)."""
    ids = np.concatenate([prefix, continuation])
    logits = np.asarray(forward(model, ids[None]), np.float64)[0]
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - logits.max(-1, keepdims=True)
    rows = np.arange(len(prefix) - 1, len(ids) - 1)
    return -logp[rows, continuation]


@pytest.mark.slow
def test_perplexity_methods_agree_where_nothing_is_dropped(model):
    ids = np.asarray(model.tokenizer(make_text(300, seed=5), add_special_tokens=False)["input_ids"], np.int32)
    (prefix, continuation), = text_windows(ids, [120], 20, samples=1)[120]
    ref = reference_nll(model, prefix, continuation)
    for config in (ParallelCompConfig(method="full"), ParallelCompConfig(method="truncate"),
                   ParallelCompConfig(method="parallelcomp", chunk_len=512, top_k_chunks=1)):
        got = continuation_nll(model, prefix, continuation, config, query_len=16)
        assert_within(got.token_nll, ref, nll_bound(model.config, ref, row_len=len(prefix) + len(continuation) + 16),
                      f"token NLL, {config.method}")
    chunked = continuation_nll(model, prefix, continuation, ParallelCompConfig(chunk_len=30, top_k_chunks=2), 16)
    assert len(chunked.selected_chunks) == 2 and np.isfinite(chunked.perplexity)
    assert not np.allclose(chunked.token_nll, ref, atol=1e-3)  # two of four chunks are really dropped


def test_perplexity_refuses_decode_eviction(model):
    ids = np.arange(200, dtype=np.int32) % 100 + 5
    with pytest.raises(ConfigError, match="decode_eviction acts while generating"):
        continuation_nll(model, ids[:150], ids[150:160], ParallelCompConfig(chunk_len=48, decode_eviction=True), 8)


def test_perplexity_bad_inputs(model):
    with pytest.raises(PcompError, match="no tokens to score"):
        continuation_nll(model, np.arange(50), np.zeros(0, np.int32))
    with pytest.raises(PcompError, match="needs at least query_len"):
        continuation_nll(model, np.arange(10), np.arange(5), query_len=16)
    with pytest.raises(PcompError, match="the text has 10 tokens"):
        text_windows(np.arange(10), [4, 8], 4, samples=1)


def test_perplexity_windows_share_the_continuation_across_prefix_lengths():
    ids = np.arange(1000)
    windows = text_windows(ids, [50, 200, 100], 30, samples=3, seed=1)
    for s in range(3):
        continuation = windows[200][s][1]
        assert len(continuation) == 30
        for t in (50, 100, 200):
            prefix, cont = windows[t][s]
            np.testing.assert_array_equal(cont, continuation)
            np.testing.assert_array_equal(prefix, np.arange(continuation[0] - t, continuation[0]))  # right before it
    assert len({int(windows[50][s][1][0]) for s in range(3)}) == 3  # three different places in the text


@pytest.fixture
def eval_config(tmp_path):
    text = tmp_path / "book.txt"
    text.write_text(". ".join(make_text(12, seed=s) for s in range(200)) + ".")
    return EvalConfig(
        output_dir=str(tmp_path / "out"),
        pipeline=ParallelCompConfig(chunk_len=48, obs_window=4, chat=True),
        methods=(MethodSpec.of("full", method="full", max_length=200),
                 MethodSpec.of("pc", method="parallelcomp", capacity=16)),
        tasks=("passkey", "needle"), lengths=(150, 300), depths=(0.2, 0.8), text_file=str(text), max_new_tokens=4,
        perplexity=dataclasses.replace(EvalConfig().perplexity, prefix_lengths=(100,), continuation=8, samples=1,
                                       query_len=8, text_file=str(text)),
    )


def lines(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


@pytest.mark.slow
def test_runner_writes_resumes_and_refuses_changed_settings(model, eval_config, monkeypatch):
    out = eval_config.output_dir
    metrics = evaluate(eval_config, model, progress=False)
    full, pc = lines(f"{out}/full/predictions.jsonl"), lines(f"{out}/pc/predictions.jsonl")
    assert len(pc) == 2 * 2 * 2 + 1  # tasks x lengths x depths + one perplexity window
    assert len(full) == 2 * 1 * 2 + 1  # max_length=200 leaves out the 300-token inputs
    assert {r["kind"] for r in pc} == {"synthetic", "perplexity"} and all("error" not in r for r in pc)
    for name in ("summary.md", "summary.json", "heatmap_passkey.png", "heatmap_needle.png", "perplexity.png",
                 "full/metrics.json", "pc/metrics.json", "pc/settings.json"):
        assert os.path.getsize(f"{out}/{name}") > 0, name
    assert metrics["pc"]["synthetic"]["passkey"]["300"]["n"] == 2
    assert "300" not in metrics["full"]["synthetic"]["passkey"]
    assert np.isfinite(metrics["pc"]["perplexity"]["100"]["perplexity"])

    # Resume: nothing runs again; a line cut short by a kill runs again, once.
    calls = []
    original = Runner.run
    monkeypatch.setattr(Runner, "run", lambda self, item, p: calls.append(item.id) or original(self, item, p))
    evaluate(eval_config, model, progress=False)
    assert calls == []
    with open(f"{out}/pc/predictions.jsonl") as f:
        text = f.read()
    last = text.rstrip("\n").rsplit("\n", 1)[-1]
    with open(f"{out}/pc/predictions.jsonl", "w") as f:
        f.write(text[: len(text) - len(last) // 2 - 1])  # the last record half written
    resumed = evaluate(eval_config, model, progress=False)
    assert calls == [json.loads(last)["id"]]
    assert len(lines(f"{out}/pc/predictions.jsonl")) == len(pc)  # every line whole again, none lost
    assert resumed == metrics  # a run killed mid-line and resumed gives the uninterrupted run's metrics
    evaluate(eval_config, model, progress=False)
    assert calls == [json.loads(last)["id"]]

    # Changed settings for an existing method: refused, files untouched.
    before = open(f"{out}/pc/predictions.jsonl").read()
    changed = dataclasses.replace(eval_config, methods=(MethodSpec.of("pc", method="parallelcomp", capacity=32),))
    with pytest.raises(ConfigError, match="holds results made with other settings.*pipeline"):
        evaluate(changed, model, progress=False)
    assert open(f"{out}/pc/predictions.jsonl").read() == before


@pytest.mark.slow
def test_batched_sweep_predicts_as_one_by_one(model, eval_config, tmp_path, monkeypatch):
    """batch_size > 1 (items of a method answered together: document.answer_parts_batch)
    gives every record the prediction, selection and score of the one-by-one run: a
    one-row method, a chunked one, one whose stage 2 does not batch (reprefill), two that
    share a reading (answered one by one from that reading, as with batch_size 1),
    inputs of two lengths and answers of two lengths (passkey, needle), perplexity items beside them."""
    methods = (*eval_config.methods, MethodSpec.of("pc_seq", method="parallelcomp", capacity=16, merge_layout="sequential"),
               MethodSpec.of("pc_re", method="parallelcomp", merge_layout="reprefill", chunk_len=40),
               MethodSpec.of("pc_b", method="parallelcomp", capacity=16, chunk_len=56))
    runs = {}
    for size in (1, 3):
        config = dataclasses.replace(eval_config, methods=methods, batch_size=size, max_new_tokens=None,
                                     output_dir=str(tmp_path / f"b{size}"))
        evaluate(config, model, progress=False)
        runs[size] = {spec.name: lines(f"{config.output_dir}/{spec.name}/predictions.jsonl") for spec in methods}
    fields = ("id", "prediction", "selected_chunks", "score", "context_tokens", "error")
    for name, one in runs[1].items():
        batched = sorted(runs[3][name], key=lambda r: r["id"])
        assert [tuple(r.get(f) for f in fields) for r in sorted(one, key=lambda r: r["id"])] == \
            [tuple(r.get(f) for f in fields) for r in batched], name
        assert all("batch" not in r for r in one)
        answered = [r for r in batched if r["kind"] == "synthetic"]
        if name in ("pc", "pc_seq"):  # they share one reading per input: each answered from it, not batched
            assert answered and all("batch" not in r for r in answered), name
        else:
            assert answered and max(r["batch"] for r in answered) == 3, name

    # A batch that runs out of memory is answered again one by one: each item gets its own record.
    import jax

    def out_of_memory(*args, **kwargs):
        raise jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 9 GiB.")

    monkeypatch.setattr(pcomp_jax.document, "answer_parts_batch", out_of_memory)
    config = dataclasses.replace(eval_config, methods=methods[1:2], batch_size=3, max_new_tokens=None,  # pc, unshared
                                 output_dir=str(tmp_path / "oom"))
    evaluate(config, model, progress=False)
    again = sorted(lines(f"{config.output_dir}/pc/predictions.jsonl"), key=lambda r: r["id"])
    assert [tuple(r.get(f) for f in fields) for r in again] == \
        [tuple(r.get(f) for f in fields) for r in sorted(runs[1]["pc"], key=lambda r: r["id"])]
    assert all("batch" not in r for r in again)


def test_batches_of_take_turns_between_methods():
    from pcomp_jax.eval.runner import batches_of

    a, b = MethodSpec.of("a", method="parallelcomp"), MethodSpec.of("b", method="truncate")
    items = [SyntheticItem(f"i{n}", {}) for n in range(5)]
    pending = [(spec, item) for item in items for spec in (a, b)]
    got = [(spec.name, [item.id for item in batch]) for spec, batch in batches_of(pending, 2)]
    alone = [(s.name, [i.id for i in batch])
             for s, batch in batches_of(pending[:6], 2, alone=lambda spec, item: item.id == "i1" and spec is b)]
    assert alone == [("a", ["i0", "i1"]), ("b", ["i1"]), ("b", ["i0", "i2"]), ("a", ["i2"])]
    assert got == [("a", ["i0", "i1"]), ("b", ["i0", "i1"]), ("a", ["i2", "i3"]), ("b", ["i2", "i3"]),
                   ("a", ["i4"]), ("b", ["i4"])]
    assert [(s.name, [i.id for i in batch]) for s, batch in batches_of(pending[:3], 1)] == \
        [("a", ["i0"]), ("b", ["i0"]), ("a", ["i1"])]


def test_runner_records_item_errors_and_scores_them_zero(model, eval_config):
    # truncate cannot fit the question with a 250-token answer in the 256-token window
    config = dataclasses.replace(eval_config, methods=(MethodSpec.of("t", method="truncate"),), tasks=("passkey",),
                                 lengths=(150,), depths=(0.5,), max_new_tokens=250,
                                 perplexity=dataclasses.replace(eval_config.perplexity, prefix_lengths=()))
    metrics = evaluate(config, model, progress=False)
    (record,) = lines(f"{config.output_dir}/t/predictions.jsonl")
    assert record["error"].startswith("InputTooLongError") and record["score"] == 0.0
    assert metrics["t"]["errors"] == 1


@pytest.mark.slow
def test_calibrated_method_runs_its_preset(model, eval_config):
    spec = MethodSpec.of("pc_calib", method="parallelcomp", calibration_preset="remove_shallow_middle",
                      calibration_preset_stage="merged")
    config = dataclasses.replace(eval_config, methods=(spec,), tasks=("passkey",), lengths=(150,), depths=(0.5,))
    metrics = evaluate(config, model, progress=False)
    with open(f"{config.output_dir}/pc_calib/settings.json") as f:
        assert json.load(f)["pipeline"]["calibration_preset"] == "remove_shallow_middle"
    synthetic, ppl = lines(f"{config.output_dir}/pc_calib/predictions.jsonl")
    task = make_task("passkey", model.tokenizer, 150, 0.5, 0)
    direct = answer(model, task.context, task.question, spec.pipeline(config.pipeline), config.max_new_tokens)
    assert synthetic["prediction"] == direct.text and synthetic["selected_chunks"] == direct.selected_chunks
    assert np.isfinite(ppl["perplexity"]) and metrics["pc_calib"]["errors"] == 0


@pytest.mark.slow
def test_adding_parts_to_a_sweep_resumes_and_changed_texts_are_refused(model, eval_config, tmp_path):
    out = eval_config.output_dir
    no_ppl = dataclasses.replace(eval_config.perplexity, prefix_lengths=())
    first = dataclasses.replace(eval_config, tasks=("passkey",), lengths=(150,), depths=(0.5,), perplexity=no_ppl)
    evaluate(first, model, progress=False)
    more = dataclasses.replace(first, tasks=("passkey", "needle"), perplexity=eval_config.perplexity)
    evaluate(more, model, progress=False)  # the needle and perplexity join the finished passkey item
    assert [r["id"] for r in lines(f"{out}/pc/predictions.jsonl")] == ["passkey/L150/d0.5/s0", "needle/L150/d0.5/s0",
                                                                      "ppl/T100/s0"]
    with open(f"{out}/pc/settings.json") as f:
        assert {"text_file", "perplexity", "pipeline"} <= set(json.load(f))
    other = tmp_path / "other.txt"
    other.write_text(open(eval_config.text_file).read() + " And then it rained.")
    evaluate(first, model, progress=False)  # leaving the needle out again is fine...
    with pytest.raises(ConfigError, match="other settings \\(text_sha256 differ\\)"):
        evaluate(dataclasses.replace(more, text_file=str(other)), model, progress=False)  # ...another text is not


def test_records_of_an_older_task_generator_run_again(model, eval_config, monkeypatch, capsys):
    from pcomp_jax.eval.runner import summarize

    config = dataclasses.replace(eval_config, methods=(MethodSpec.of("pc", method="parallelcomp", capacity=16),),
                                 tasks=("passkey", "needle"), lengths=(150,), depths=(0.5,), batch_size=1,
                                 perplexity=dataclasses.replace(eval_config.perplexity, prefix_lengths=()))
    evaluate(config, model, progress=False)
    path = f"{config.output_dir}/pc/predictions.jsonl"
    passkey, needle = lines(path)
    assert needle["generator"] == GENERATOR_VERSIONS["needle"] and passkey["generator"] == GENERATOR_VERSIONS["passkey"]
    old = {k: v for k, v in needle.items() if k != "generator"}  # as written before versions: version 1
    old["score"] = 1.0 - needle["score"]  # so that a summary reading it would show
    with open(path, "w") as f:
        f.write(json.dumps(passkey) + "\n" + json.dumps(old) + "\n")
    assert "needle" not in summarize(config)["pc"]["synthetic"]  # an outdated record is not counted
    calls = []
    original = Runner.run
    monkeypatch.setattr(Runner, "run", lambda self, item, p: calls.append(item.id) or original(self, item, p))
    metrics = evaluate(config, model, progress=False)
    assert calls == ["needle/L150/d0.5/s0"] and "1 finished predictions were made with an older" in capsys.readouterr().err
    assert lines(path)[-1] == needle | {"seconds": lines(path)[-1]["seconds"]}  # made again, the same
    assert metrics["pc"]["synthetic"]["needle"]["150"]["accuracy"] == needle["score"]
    evaluate(config, model, progress=False)
    assert calls == ["needle/L150/d0.5/s0"]


def test_foreign_lines_and_out_of_memory_do_not_stop_a_sweep(model, eval_config, monkeypatch, capsys):
    import jax

    config = dataclasses.replace(eval_config, methods=(MethodSpec.of("pc", method="parallelcomp", capacity=16),),
                                 tasks=("passkey",), lengths=(150,), depths=(0.2, 0.8), batch_size=1,
                                 perplexity=dataclasses.replace(eval_config.perplexity, prefix_lengths=()))
    os.makedirs(f"{config.output_dir}/pc")
    with open(f"{config.output_dir}/pc/predictions.jsonl", "w") as f:
        f.write('[1, 2]\n{"no_id": 1}\n')
    original = SyntheticItem.predict

    def out_of_memory_at_depth_02(self, runner, pipeline):
        if self.fields["depth"] == 0.2:
            raise jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 9 GiB.")
        return original(self, runner, pipeline)

    monkeypatch.setattr(SyntheticItem, "predict", out_of_memory_at_depth_02)
    metrics = evaluate(config, model, progress=False)
    assert capsys.readouterr().err.count("is not a complete prediction record") == 2
    oom, fine = lines(f"{config.output_dir}/pc/predictions.jsonl")[2:]
    assert oom["error"].startswith("out of memory: RESOURCE_EXHAUSTED") and oom["score"] == 0.0
    assert "error" not in fine and metrics["pc"]["errors"] == 1
    monkeypatch.setattr(SyntheticItem, "predict",
                        lambda *a: (_ for _ in ()).throw(jax.errors.JaxRuntimeError("INTERNAL: boom")))
    with pytest.raises(jax.errors.JaxRuntimeError, match="boom"):  # other runtime errors are not hidden
        evaluate(dataclasses.replace(config, depths=(0.5,)), model, progress=False)


def test_metrics_and_summary_by_hand():
    records = [
        {"kind": "synthetic", "task": "passkey", "length": 100, "depth": 0.1, "score": 1.0},
        {"kind": "synthetic", "task": "passkey", "length": 100, "depth": 0.9, "score": 0.0},
        {"kind": "synthetic", "task": "passkey", "length": 200, "depth": 0.1, "score": 1.0},
        {"kind": "longbench", "dataset": "hotpotqa", "score": 0.5},
        {"kind": "longbench", "dataset": "hotpotqa", "score": 0.25},
        {"kind": "perplexity", "prefix_len": 64, "mean_nll": 1.0},
        {"kind": "perplexity", "prefix_len": 64, "mean_nll": 3.0},
        {"kind": "perplexity", "prefix_len": 32, "mean_nll": 0.5, "error": "x"},
    ]
    m = method_metrics(records)
    assert m["synthetic"]["passkey"]["100"] == {"by_depth": {"0.1": 1.0, "0.9": 0.0}, "accuracy": 0.5, "n": 2}
    assert m["longbench"]["hotpotqa"] == {"score": 37.5, "n": 2}
    assert m["perplexity"] == {"64": {"mean_nll": 2.0, "perplexity": pytest.approx(np.exp(2.0)), "n": 2}}
    assert m["errors"] == 1
    table = summary_markdown({"a": m})
    assert "| a | 0.50 (1/2) | 1.00 (1/1) |" in table and "| a | 37.5 |" in table and "| a | 7.39 |" in table


def test_settings_problems_stop_before_any_item(model, eval_config):
    config = dataclasses.replace(eval_config, pipeline=dataclasses.replace(
        eval_config.pipeline, calibration_preset="remove_shallow_sink"))  # calibration on method full: refused
    with pytest.raises(ConfigError, match="method 'full': calibration applies to the chunked methods"):
        evaluate(config, model, progress=False)
    assert not os.path.exists(f"{config.output_dir}/full/predictions.jsonl")
    # settings written by the refused run do not block a fixed one (one item per method is enough)
    fixed = dataclasses.replace(eval_config, tasks=("passkey",), lengths=(150,), depths=(0.2,),
                                perplexity=dataclasses.replace(eval_config.perplexity, prefix_lengths=()))
    evaluate(fixed, model, progress=False)
    assert [len(lines(f"{fixed.output_dir}/{spec.name}/predictions.jsonl")) for spec in fixed.methods] == [1, 1]


def test_longbench_prompt_is_the_template_verbatim(model):
    from pcomp_jax.longbench import PROMPT_TEMPLATES, encode_prompt, load_longbench

    fixture = os.path.join(os.path.dirname(__file__), "data", "longbench_fixture.jsonl")
    for ex in load_longbench(fixture):
        parts = encode_prompt(model.tokenizer, ex, chat=False)
        text = model.tokenizer.decode(np.concatenate([parts.prefix, parts.context, parts.question]))
        expected = PROMPT_TEMPLATES[ex.dataset].replace("{context}", ex.context).replace("{input}", ex.input)
        assert text == expected  # e.g. ends in "Answer:", where the model goes on


def test_eval_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="depths has repeated values"):
        EvalConfig(depths=(0.5, 0.5))
    with pytest.raises(ConfigError, match="dtype='bf16' is not allowed"):
        EvalConfig(dtype="bf16")
    with pytest.raises(ConfigError, match="unknown task 'math'"):
        EvalConfig(tasks=("math",))
    with pytest.raises(ConfigError, match="depths must lie in"):
        EvalConfig(depths=(1.5,))
    with pytest.raises(ConfigError, match="batch_size must be >= 1, got 0"):
        EvalConfig(batch_size=0)
    with pytest.raises(ConfigError, match="batch_size"):
        load_config(None, ["batch_size=many"], cls=EvalConfig)
    with pytest.raises(ConfigError, match="distinct names"):
        EvalConfig(methods=(MethodSpec.of("a", method="full"), MethodSpec.of("a", method="pcw")))
    with pytest.raises(ConfigError, match="method 'big': capacity=4096 is larger than chunk_len"):
        EvalConfig(methods=(MethodSpec.of("big", method="parallelcomp", capacity=4096),))
    with pytest.raises(ConfigError, match="method='sparse' is not allowed"):
        EvalConfig(methods=(MethodSpec.of("s", method="sparse"),))
    with pytest.raises(ConfigError, match="nothing to evaluate"):
        evaluate(EvalConfig(tasks=(), output_dir=str(tmp_path / "o")), model=object())
    with pytest.raises(PcompError, match="cannot read the needle task's text_file"):
        evaluate(EvalConfig(tasks=("needle",), text_file=str(tmp_path / "missing.txt")), model=object())
    config = tmp_path / "c.yaml"
    config.write_text("methods:\n  - {name: x, method: pcw, capacity: nope}\n")
    with pytest.raises(ConfigError, match="capacity"):
        load_config(str(config), cls=EvalConfig)


@pytest.mark.slow
def test_runner_on_longbench_format_data(model, eval_config):
    fixture = os.path.join(os.path.dirname(__file__), "data", "longbench_fixture.jsonl")
    config = dataclasses.replace(eval_config, methods=(MethodSpec.of("pc", method="parallelcomp", capacity=16),),
                                 tasks=(), longbench=fixture,
                                 perplexity=dataclasses.replace(eval_config.perplexity, prefix_lengths=()))
    metrics = evaluate(config, model, progress=False)
    records = lines(f"{config.output_dir}/pc/predictions.jsonl")
    datasets = {r["dataset"] for r in records}
    assert set(metrics["pc"]["longbench"]) == datasets and len(datasets) >= 3
    assert all(0.0 <= r["score"] <= 1.0 for r in records)
    # The tiny model's window is 256 tokens: long templates (e.g. passage_count's) do not fit,
    # which is recorded per example; the rest are answered and scored.
    assert all("prediction" in r or r["error"].startswith("InputTooLongError") for r in records)
    assert sum("prediction" in r for r in records) >= 2


def test_cli_reports_bad_configs(tmp_path, capsys):
    from pcomp_jax.eval import main

    assert main(["--set", "depths=[2]", "--output-dir", str(tmp_path / "o")]) == 2
    assert "depths must lie in [0, 1]" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_summary_only_merges_a_sweep_run_in_parts(model, eval_config, tmp_path, capsys):
    """A sweep run length by length (``--set lengths=[...]``) gets one table from its finished
    predictions with --summary-only, which loads no model and runs nothing."""
    from pcomp_jax.eval import main

    part = dataclasses.replace(eval_config, lengths=(150,), perplexity=dataclasses.replace(
        eval_config.perplexity, prefix_lengths=()))
    evaluate(part, model, progress=False)
    config_file = tmp_path / "sweep.yaml"
    config_file.write_text(
        f"model: /nonexistent/model\noutput_dir: {eval_config.output_dir}\ntext_file: {eval_config.text_file}\n"
        "tasks: [passkey, needle]\nlengths: [150, 300]\ndepths: [0.2, 0.8]\nmax_new_tokens: 4\n"
        "pipeline: {chunk_len: 48, obs_window: 4}\n"
        "methods: [{name: full, method: full, max_length: 200}, {name: pc, method: parallelcomp, capacity: 16}]\n")
    pending = open(f"{eval_config.output_dir}/pc/predictions.jsonl").read()
    with open(f"{eval_config.output_dir}/pc/predictions.jsonl", "a") as f:
        f.write('{"id": "passkey/L300/d0.2/s0", "sco')  # a record being written by a running sweep
    assert main(["--config", str(config_file), "--summary-only"]) == 0
    assert "| method | 150 tokens |" in capsys.readouterr().out  # only what has run
    summary = json.load(open(f"{eval_config.output_dir}/summary.json"))
    assert summary["pc"]["synthetic"]["passkey"]["150"]["n"] == 2 and "300" not in summary["pc"]["synthetic"]["passkey"]
    assert open(f"{eval_config.output_dir}/pc/predictions.jsonl").read() == pending + '{"id": "passkey/L300/d0.2/s0", "sco'
    assert main(["--config", str(config_file), "--summary-only", "--set",
                 "methods=[{name: other, method: parallelcomp}]"]) == 2
    assert "no results of method(s) other" in capsys.readouterr().err


@pytest.mark.slow
def test_runner_reads_a_shared_context_once(model, tmp_path):
    """LongBench items with the same context are answered from one reading (document.read_parts)
    per reading settings, with the predictions and selections answer_parts gives each; a
    context asked once is answered by answer_parts as before."""
    from pcomp_jax.eval.items import longbench_items
    from pcomp_jax.longbench import encode_prompt
    from pcomp_jax.pipeline import answer_parts

    shared, other = make_text(60, seed=7), make_text(50, seed=8)
    records = [{"context": c, "input": q, "answers": ["cat"], "all_classes": None, "length": 60,
                "dataset": "samsum", "_id": i}
               for c, q, i in ((shared, "Where is the cat?", "a"), (other, "Who ran?", "b"),
                               (shared, "Where is the sun?", "c"))]
    data = tmp_path / "lb.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    config = EvalConfig(output_dir=str(tmp_path / "out"), tasks=(), longbench=str(data), max_new_tokens=4,
                        pipeline=ParallelCompConfig(chunk_len=48, obs_window=4, chat=False),
                        methods=(MethodSpec.of("pc", method="parallelcomp", capacity=16),),
                        perplexity=dataclasses.replace(EvalConfig().perplexity, prefix_lengths=()))
    items = longbench_items(config)
    runner = Runner(model, config)
    pending = runner.share_readings([(spec, item) for item in items for spec in config.methods], config)
    assert [item.id for _, item in pending] == ["longbench/samsum/" + i for i in "acb"]  # shared context first
    for spec, item in pending:
        pipeline = spec.pipeline(config.pipeline)
        got = runner.run(item, pipeline)
        ex = item.fields["example"]
        want = answer_parts(model, encode_prompt(model.tokenizer, ex, pipeline.chat), pipeline, 4)
        assert "error" not in got and got["prediction"] == want.text, (spec.name, item.id)
        assert got["selected_chunks"] == want.selected_chunks and got["context_tokens"] == want.context_tokens
    assert runner.readings == 1 and runner.document_answers == 2  # b, asked once, is answered as before


@pytest.mark.slow
def test_a_users_file_is_never_replaced_and_other_sweeps_keep_their_summaries(model, tmp_path):
    from pcomp_jax.eval.outputs import MANIFEST

    out = tmp_path / "out"
    small = EvalConfig(output_dir=str(out), pipeline=ParallelCompConfig(chunk_len=48, obs_window=4),
                       methods=(MethodSpec.of("pc", method="parallelcomp", capacity=16),), tasks=("passkey",),
                       lengths=(150,), depths=(0.5,), max_new_tokens=4)
    out.mkdir()
    (out / "summary.md").write_text("my notes")
    calls = []
    original = Runner.run
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Runner, "run", lambda self, item, p: calls.append(item.id) or original(self, item, p))
        with pytest.raises(ConfigError, match=r"summary\.md exists and was not written by the evaluation runner"):
            evaluate(small, model, progress=False)
    assert calls == [] and (out / "summary.md").read_text() == "my notes"  # refused before anything ran
    (out / "summary.md").unlink()

    evaluate(small, model, progress=False)
    first = (out / "summary.md").read_text()
    other = dataclasses.replace(small, methods=(MethodSpec.of("trunc", method="truncate"),))
    evaluate(other, model, progress=False)
    assert (out / "summary.md").read_text() == first  # the first sweep's summary stays
    manifest = json.loads((out / MANIFEST).read_text())
    (stem,) = [s for s in manifest["summaries"] if s != "summary"]
    assert manifest["summaries"] == {"summary": ["pc"], stem: ["trunc"]}
    assert "trunc" in (out / f"{stem}.md").read_text() and (out / f"heatmap_passkey_{stem[8:]}.png").exists()
    evaluate(small, model, progress=False)  # the same methods again: their own summary, rewritten
    assert sorted(json.loads((out / MANIFEST).read_text())["summaries"]) == sorted(["summary", stem])
    (out / MANIFEST).unlink()  # a directory from before the manifest: its method folders make the summary the runner's
    evaluate(small, model, progress=False)
    assert ["pc"] in json.loads((out / MANIFEST).read_text())["summaries"].values()


def test_setup_errors_stop_the_run_before_any_item(model, tmp_path):
    from pcomp_jax.io import read_text
    from pcomp_jax.tasks import count_tokens

    text = tmp_path / "short.txt"
    text.write_text(". ".join(make_text(12, seed=s) for s in range(20)) + ".")
    available = count_tokens(model.tokenizer, read_text(str(text), "t"))
    config = EvalConfig(output_dir=str(tmp_path / "out"), pipeline=ParallelCompConfig(chunk_len=48),
                        methods=(MethodSpec.of("pc", method="parallelcomp"),), tasks=("needle",),
                        lengths=(150, available + 1), depths=(0.5,), text_file=str(text), max_new_tokens=4)
    with pytest.raises(ConfigError, match=rf"needle lengths \[{available + 1}\] exceed the {available} tokens"):
        evaluate(config, model, progress=False)
    assert not os.path.exists(tmp_path / "out" / "pc" / "predictions.jsonl")  # nothing scored
    for bad, message in [(dict(seeds=(-1,)), "seeds must be whole numbers >= 0"),
                         (dict(lengths=(10,)), "lengths must be at least 64 tokens")]:
        with pytest.raises(ConfigError, match=message):
            dataclasses.replace(config, **bad)
    with pytest.raises(ConfigError, match="task.seed must be >= 0"):
        load_config("configs/demo.yaml", ["task.seed=-1"])


def test_perplexity_windows_beyond_the_text_stop_the_run(model, tmp_path):
    text = tmp_path / "short.txt"
    text.write_text(". ".join(make_text(12, seed=s) for s in range(10)) + ".")
    config = EvalConfig(output_dir=str(tmp_path / "out"), pipeline=ParallelCompConfig(chunk_len=48),
                        methods=(MethodSpec.of("full", method="full"),), tasks=(),
                        perplexity=dataclasses.replace(EvalConfig().perplexity, prefix_lengths=(100, 5000),
                                                       continuation=8, samples=1, text_file=str(text)))
    with pytest.raises(ConfigError, match=r"perplexity: the text has \d+ tokens; prefix 5000 \+ continuation 8"):
        evaluate(config, model, progress=False)
    assert not os.path.exists(tmp_path / "out" / "full" / "predictions.jsonl")
