"""A method's token scorer owns its knobs, and every eviction ranks with it: the chunk
eviction of stage 1b, the stage eviction over the merged cache and the decode eviction."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pcomp_jax
from pcomp_jax import ParallelCompConfig, answer, methods
from pcomp_jax.cache import KVCache
from pcomp_jax.compress import ConfigSnapKV, SnapKV, TokenScorer
from pcomp_jax.decode import DecodeEviction, StageEviction, pad_ids
from pcomp_jax.merge import ContextCache, MergeSpec, question_prefill
from pcomp_jax.pipeline import run_stage1
from pcomp_jax.plans import plan
from pcomp_jax.prefill import merge_selection
from test_pipeline import make_context


@dataclasses.dataclass(frozen=True)
class KeyNorm(TokenScorer):
    """Keeps the keys of smallest L2 norm (the docs' example scorer)."""

    def __call__(self, q, k, row_lengths, content):
        norms = jnp.linalg.norm(k.astype(jnp.float32), axis=-1)  # [B, T, KVH]
        return jnp.where(content[:, None, :], -jnp.swapaxes(norms, 1, 2), -jnp.inf)


@pytest.fixture(scope="module")
def model(hf_checkpoints):
    return pcomp_jax.load_model(hf_checkpoints("llama_gqa_untied")[0])


@pytest.fixture
def registered():
    added = []

    def register(method):
        added.append(pcomp_jax.register_method(method, replace=True).name)
        return method

    yield register
    for name in added:
        methods.unregister_method(name)


@pytest.mark.slow
def test_a_registered_scorer_keeps_its_own_fields(model, registered):
    registered(pcomp_jax.Method("snap32", token_scorer=SnapKV(obs_window=32, pool_kernel=3)))
    config = ParallelCompConfig(method="snap32", chunk_len=48, capacity=40, obs_window=4, pool_kernel=7,
                                stage_eviction=False, decode_eviction=True)
    p = plan(model, config)
    assert p.prefill.token_scorer == SnapKV(32, 3)  # not the config's 4 and 7
    assert p.merge.decode_eviction == DecodeEviction(SnapKV(32, 3))
    stage = plan(model, dataclasses.replace(config, stage_eviction=True, decode_eviction=False))
    assert stage.merge.eviction == StageEviction(40 * 2, SnapKV(32, 3))
    # The built-in method takes the config's knobs.
    builtin = plan(model, dataclasses.replace(config, method="parallelcomp"))
    assert methods.get_method("parallelcomp").token_scorer == ConfigSnapKV()
    assert builtin.prefill.token_scorer == SnapKV(4, 7) and builtin.merge.decode_eviction == DecodeEviction(SnapKV(4, 7))
    # And it acts: the registered method answers as the built-in one does with the config set to 32 and 3.
    context, question = make_context(150, seed=3), "where did the cat sit?"
    ours = answer(model, context, question, dataclasses.replace(config, decode_eviction=False), 6)
    same = answer(model, context, question, dataclasses.replace(config, method="parallelcomp", obs_window=32,
                                                                 pool_kernel=3, decode_eviction=False), 6)
    assert ours.token_ids == same.token_ids and ours.chunk_scores == same.chunk_scores
    assert ours.selected_chunks == same.selected_chunks


def test_stage_eviction_with_key_norm_keeps_the_smallest_norm_keys_of_the_merged_cache(model, registered):
    registered(pcomp_jax.Method("keynorm", token_scorer=KeyNorm()))
    config = ParallelCompConfig(method="keynorm", chunk_len=40, capacity=10, stage_eviction=True, obs_window=4)
    p = plan(model, config)
    assert p.merge.eviction == StageEviction(20, KeyNorm()) and p.prefill.capacity is None
    context, question = make_context(150, seed=5), "where did the cat sit?"
    parts = pcomp_jax.chunking.encode_parts(model.tokenizer, context, question, config.instruction,
                                            config.answer_prefix, config.chat)
    pre = run_stage1(model, p, parts)
    question_ids = pad_ids(parts.question, minimum=16)
    merged, _ = merge_selection(pre.context.prefix_keys, pre.context.prefix_values, pre.context.selection,
                                len(question_ids) + 16, p.merge.layout, model.config)
    state = question_prefill(pre.weights, model.config, pre.context, jnp.asarray(question_ids),
                             jnp.int32(len(parts.question)), p.merge, num_steps=16)
    before, after = np.asarray(merged.valid[:, 0]), np.asarray(state.cache.valid[:, 0])  # [L, S, KVH]
    norms = np.linalg.norm(np.asarray(merged.keys[:, 0], np.float32), axis=-1)  # [L, S, KVH]
    prefix_len = pre.context.prefix_len
    checked = 0
    for layer in range(before.shape[0]):
        for head in range(before.shape[2]):
            chunk = np.flatnonzero(before[layer, :, head] & (np.arange(before.shape[1]) >= prefix_len))
            kept = [s for s in chunk if after[layer, s, head]]
            dropped = [s for s in chunk if not after[layer, s, head]]
            assert len(kept) == 20 and dropped, (layer, head)
            assert norms[layer, kept, head].max() <= norms[layer, dropped, head].min() + 1e-5, (layer, head)
            checked += 1
    assert checked == model.config.num_layers * model.config.num_kv_heads
    # answer() runs the same plan end to end (the question's own keys and P stay).
    assert answer(model, context, question, config, 4).selected_chunks == pre.selected_chunks


def test_decode_eviction_with_key_norm_drops_the_largest_norm_key():
    """One decode step: the held entry (but the newest) of largest key norm leaves each layer,
    row and KV head."""
    rng = np.random.default_rng(0)
    layers, slots, kvh, dim = 2, 9, 2, 4
    keys = rng.normal(size=(layers, 1, slots, kvh, dim)).astype(np.float32)
    valid = rng.random((layers, 1, slots, kvh)) < 0.8
    valid[:, :, -1] = True
    cache = KVCache(keys=jnp.asarray(keys), values=jnp.asarray(keys), valid=jnp.asarray(valid),
                    end=jnp.array([slots], jnp.int32))
    after = np.asarray(DecodeEviction(KeyNorm()).evict_one(cache).valid)
    norms = np.linalg.norm(keys, axis=-1)
    for layer in range(layers):
        for head in range(kvh):
            held = np.flatnonzero(valid[layer, 0, :, head])[:-1]  # the newest entry stays
            dropped = np.flatnonzero(valid[layer, 0, :, head] & ~after[layer, 0, :, head])
            assert dropped.tolist() == [held[np.argmax(norms[layer, 0, held, head])]]
