"""Records what every method answers on the default model, for comparing two versions of the code bit for bit.

    PYTHONPATH=<checkout A> python scripts/record_outputs.py a.json
    PYTHONPATH=<checkout B> python scripts/record_outputs.py b.json
    python -c "import json; a, b = (json.load(open(f)) for f in (\"a.json\", \"b.json\")); print([k for k in a if a[k] != b[k]])"

Passkey inputs of 3000 and 9000 tokens through every built-in method, eviction in the chunks,
stage eviction, decode eviction, both calibration stages and the three merge layouts (token
ids, chunk scores as float hex, selections), a document's ``ask`` under three of those configs,
and the perplexity NLLs of eight configs: two recordings made before and after a change show
whether any output moved.
"""
import json, sys, dataclasses
import numpy as np
import pcomp_jax
from pcomp_jax import ParallelCompConfig, answer
from pcomp_jax.tasks import make_task
from pcomp_jax.perplexity import continuation_nll
print(pcomp_jax.__file__, file=sys.stderr)
model = pcomp_jax.load_model()
out = {}
base = ParallelCompConfig(chunk_len=512, top_k_chunks=2)
variants = {
  "parallelcomp": base, "evict": dataclasses.replace(base, capacity=128), "pcw": dataclasses.replace(base, method="pcw"),
  "full": dataclasses.replace(base, method="full"), "truncate": dataclasses.replace(base, method="truncate"),
  "snapkv": dataclasses.replace(base, method="snapkv"), "streaming": dataclasses.replace(base, method="streaming"),
  "calib_chunk": dataclasses.replace(base, calibration_preset="remove_shallow_middle", calibration_preset_stage="chunk"),
  "calib_merged": dataclasses.replace(base, capacity=64, calibration_preset="remove_shallow_middle"),
  "sequential": dataclasses.replace(base, merge_layout="sequential", capacity=128),
  "reprefill": dataclasses.replace(base, merge_layout="reprefill"),
  "stage_evict": dataclasses.replace(base, capacity=96, stage_eviction=True, obs_window=6),
  "decode_evict": dataclasses.replace(base, capacity=96, decode_eviction=True, pool_kernel=5),
  "both_evict": dataclasses.replace(base, capacity=96, stage_eviction=True, decode_eviction=True,
                                    merge_layout="sequential", calibration_preset="remove_shallow_middle"),
}
for length, depth in [(3000, 0.3), (9000, 0.7)]:
    task = make_task("passkey", model.tokenizer, length, depth, 0)
    for name, cfg in variants.items():
        if name == "full" and length > 8000: continue
        r = answer(model, task.context, task.question, cfg, 12)
        out[f"{name}/{length}"] = dict(tokens=r.token_ids, scores=[float(s).hex() for s in r.chunk_scores], sel=r.selected_chunks)
    doc = pcomp_jax.read_document(model, task.context, base)
    for name in ["evict", "stage_evict", "both_evict"]:
        r = doc.ask(task.question, 12, config=variants[name])
        out[f"ask/{name}/{length}"] = dict(tokens=r.token_ids, scores=[float(s).hex() for s in r.chunk_scores], sel=r.selected_chunks)
ids = np.asarray(model.tokenizer(make_task("passkey", model.tokenizer, 3000, 0.5, 1).context)["input_ids"], np.int32)
for name in ["parallelcomp", "evict", "full", "truncate", "snapkv", "calib_merged", "sequential", "stage_evict"]:
    s = continuation_nll(model, ids[:2000], ids[2000:2040], variants[name], query_len=32)
    out[f"ppl/{name}"] = [float(x).hex() for x in s.token_nll]
json.dump(out, open(sys.argv[1], "w"), indent=0)
print("ok", len(out))
