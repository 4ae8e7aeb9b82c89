"""TorchEngine beyond the shared contract (test_rollout_contract.py): its knobs and its sampler.

Bounded decode batches, dropping finished rows mid-batch, a context set by hand, version counting
and load_weights' name and shape checks, and `sampling.py` (truncation, token frequencies). The
references and the sharpened weights are the contract suite's.
"""

from __future__ import annotations

import pytest
import torch
from test_rollout_contract import PROMPTS, argmax_decode, reference_model, sharpened_state

from minigrpo.rollout import SamplingParams, TorchEngine
from minigrpo.rollout.sampling import sample_tokens, truncate_logits


@pytest.fixture(scope="module")
def setup(tiny_model_dir):
    state = sharpened_state(tiny_model_dir, seed=1)
    engine = TorchEngine(tiny_model_dir)
    engine.load_weights(state.items())
    return engine, reference_model(tiny_model_dir, state)


def test_bounded_batch_gives_the_same_greedy_tokens(setup):
    engine, ref = setup
    out = engine.generate(PROMPTS, 2, SamplingParams(temperature=0, max_new_tokens=12))
    # bounded batch: 2 rows per pass -> one prompt at a time, same tokens
    chunked = TorchEngine(ref, max_batch_rows=2).generate(PROMPTS, 2, SamplingParams(temperature=0, max_new_tokens=12))
    assert [[c.token_ids for c in r] for r in chunked] == [[c.token_ids for c in r] for r in out]


def test_dropping_finished_rows_keeps_everyones_greedy_tokens(setup):
    _, ref = setup
    free = [argmax_decode(ref, p, 20) for p in PROMPTS]
    greedy_stop = (free[0][3], free[2][8])  # rows end at different steps
    greedy = SamplingParams(temperature=0, max_new_tokens=20, stop_token_ids=greedy_stop)
    compacting = TorchEngine(ref, check_every=1).generate(PROMPTS, 2, greedy)
    lengths = set()
    for prompt, row in zip(PROMPTS, compacting):
        assert row[0].token_ids == row[1].token_ids == argmax_decode(ref, prompt, 20, greedy_stop)
        lengths.add(len(row[0].token_ids))
    assert len(lengths) > 1


def test_context_given_by_hand_caps_the_budget(setup):
    _, ref = setup
    # 11-token prompt + at most 4 new tokens in a 15-token context
    short = TorchEngine(ref, max_context=15).generate([PROMPTS[2]], 1, SamplingParams(temperature=0, max_new_tokens=10))
    assert len(short[0][0].token_ids) == 4 and short[0][0].finish_reason == "length"


def test_load_weights_counts_versions_and_checks_names(tiny_model_dir):
    engine = TorchEngine(tiny_model_dir)
    engine.load_weights(sharpened_state(tiny_model_dir, seed=1).items())
    sp = SamplingParams(temperature=0, max_new_tokens=10)
    before = engine.generate(PROMPTS, 1, sp)
    # the names a trainer sends: every parameter plus the tied output weight
    engine.load_weights(sharpened_state(tiny_model_dir, seed=2).items())
    assert engine.version == 2
    after = engine.generate(PROMPTS, 1, sp)
    assert all(r[0].weight_version == 2 for r in after) and all(r[0].weight_version == 1 for r in before)
    with pytest.raises(ValueError, match="not in the model"):
        engine.load_weights([("model.no_such.weight", torch.zeros(1))])
    with pytest.raises(ValueError, match="shape"):
        engine.load_weights([("model.norm.weight", torch.zeros(3))])


def test_truncation_hand_computed():
    logits = torch.tensor([[3.0, 1.0, 2.0, 0.0]])  # probs ~ .64 .09 .24 .03
    assert torch.isinf(truncate_logits(logits, 2, 1.0)).tolist() == [[False, True, False, True]]
    assert torch.isinf(truncate_logits(logits, 0, 0.8)).tolist() == [[False, True, False, True]]
    assert torch.isinf(truncate_logits(logits, 0, 0.5)).tolist() == [[False, True, True, True]]


@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.5, 1.0), (1.0, 0.8)])
def test_sampler_frequencies(temperature, top_p):
    """Empirical token frequencies of 40k draws match softmax(logits / T) (renormalised over top-p)."""
    logits = torch.tensor([3.0, 1.0, 2.0, 0.0, -1.0])
    want = truncate_logits(logits[None] / temperature, 0, top_p).softmax(-1)[0]  # (V,)
    B = 40_000
    tokens, logp = sample_tokens(logits.expand(B, -1), temperature, 0, top_p, torch.Generator().manual_seed(0))
    freq = torch.bincount(tokens, minlength=5).double() / B
    sigma = (want * (1 - want) / B).sqrt()
    assert ((freq - want).abs() <= 5 * sigma + 1e-12).all(), (freq, want)
    assert torch.allclose(logp, want.log()[tokens])


@pytest.mark.parametrize("rows", [None, [0, 2, 3, 5]], ids=["all rows", "finished rows dropped"])
def test_decode_attention_equals_dense_attention_over_prompt_and_completion(rows):
    """A decode step reads each prompt's keys once for its n samples; the result is, row by row, plain softmax
    attention over that prompt's real slots followed by the row's own completion (float64, GQA repeated by hand)."""
    from minigrpo.rollout.kv_cache import PromptKV, decode_attention

    g = torch.Generator().manual_seed(0)
    P, n, H, Hkv, L, t, d = 3, 2, 4, 2, 5, 3, 8
    prompt_lens = [5, 2, 4]  # left-padded to L
    keys_real = torch.arange(L)[None, :] >= (L - torch.tensor(prompt_lens))[:, None]
    live = list(range(P * n)) if rows is None else rows
    b = len(live)
    rand = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64)  # noqa: E731
    query, key, value = rand(b, H, 1, d), rand(b, Hkv, t, d), rand(b, Hkv, t, d)
    prompt_keys, prompt_values = rand(P, Hkv, L, d), rand(P, Hkv, L, d)
    prompts_of = PromptKV(None, keys_real, n, None if rows is None else torch.tensor(rows))
    out = decode_attention(query, key, value, prompt_keys, prompt_values, prompts_of, d**-0.5)
    assert out.shape == (b, 1, H, d)
    for i, r in enumerate(live):
        p = r // n
        for h in range(H):
            kv = h // (H // Hkv)
            keys = torch.cat([prompt_keys[p, kv][keys_real[p]], key[i, kv]])  # (real prompt slots + t, d)
            values = torch.cat([prompt_values[p, kv][keys_real[p]], value[i, kv]])
            want = ((query[i, h, 0] @ keys.T) * d**-0.5).softmax(-1) @ values
            torch.testing.assert_close(out[i, 0, h], want, rtol=1e-12, atol=1e-12)
