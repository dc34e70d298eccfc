import itertools, time, sys
import pcomp_jax
from pcomp_jax.config import ParallelCompConfig
from pcomp_jax.tasks import passkey_task
m = pcomp_jax.load_model()
for length in [4000]:
  for C, k in [(256,1),(256,2),(512,1),(512,2),(512,3),(1024,1)]:
    right = 0
    for depth in [0.1, 0.5, 0.9]:
        t = passkey_task(m.tokenizer, length, depth, seed=int(depth*10))
        a = pcomp_jax.answer(m, t.context, t.question, ParallelCompConfig(chunk_len=C, top_k_chunks=k), max_new_tokens=12)
        right += t.is_correct(a.text)
        print(length, C, k, depth, t.answer, repr(a.text), a.selected_chunks, flush=True)
    print("==", length, C, k, right, "/3", flush=True)
