"""TorchEngine against plain references: argmax loops, the trainer's log-probs, weight reloads.

The helpers at the top are shared with test_rollout_vllm.py and tests/dist/rollout_sync.py.
The tiny preset is random-initialised with std 0.02 and tied embeddings, so every layer is close to
the identity and greedy decoding just repeats the last prompt token. `sharpened_state` redraws the
matrices with a larger std: next-token distributions become peaked and input-dependent (entropy
~5 nats of 6.2), which makes the greedy, stop-token and weight-sync checks meaningful.
"""

from __future__ import annotations

import pytest
import torch

from minigrpo.model import LogprobModel, load_model, shift_targets
from minigrpo.rollout import RolloutEngine, SamplingParams, TorchEngine
from minigrpo.rollout.sampling import sample_tokens, truncate_logits


def sharpened_state(model_dir, seed: int, std: float = 0.25) -> dict[str, torch.Tensor]:
    """An HF state dict for the model at `model_dir` with every matrix redrawn ~ N(0, std)."""
    lm = load_model(model_dir)
    g = torch.Generator().manual_seed(seed)
    state = {}
    for name, t in lm.state_dict().items():  # includes lm_head.weight (tied: same tensor as embed)
        state[name] = torch.randn(t.shape, generator=g) * std if t.dim() == 2 else t.clone()
    state["lm_head.weight"] = state["model.embed_tokens.weight"]
    return state


def reference_model(model_dir, state: dict[str, torch.Tensor], dtype: str = "float32"):
    lm = load_model(model_dir, dtype=dtype).eval()
    lm.load_state_dict(state)
    return lm


@torch.no_grad()
def argmax_decode(lm, prompt: list[int], steps: int, stop: tuple[int, ...] = ()) -> list[int]:
    """Greedy decoding by full forwards (no cache, no padding): the plainest possible reference."""
    ids = list(prompt)
    for _ in range(steps):
        nxt = int(lm(torch.tensor([ids])).logits[0, -1].argmax())
        ids.append(nxt)
        if nxt in stop:
            break
    return ids[len(prompt) :]


@torch.no_grad()
def trainer_logprobs(lm, pairs: list[tuple[list[int], list[int]]], temperature: float) -> list[torch.Tensor]:
    """Log-probs of each completion given its prompt as the trainer computes them (LogprobModel).

    pairs: (prompt, completion) token lists; one right-padded forward for all of them.
    Returns one (len(completion),) tensor per pair.
    """
    T = max(len(p) + len(c) for p, c in pairs)
    ids = torch.zeros(len(pairs), T, dtype=torch.long)  # (B, T)
    attn, loss_mask = torch.zeros_like(ids), torch.zeros_like(ids)
    for b, (p, c) in enumerate(pairs):
        ids[b, : len(p) + len(c)] = torch.tensor(p + c)
        attn[b, : len(p) + len(c)] = 1
        loss_mask[b, len(p) : len(p) + len(c)] = 1
    logp, _ = LogprobModel(lm)(ids, shift_targets(ids, loss_mask), attention_mask=attn, temperature=temperature)  # (B, T)
    return [logp[b, len(p) - 1 : len(p) + len(c) - 1] for b, (p, c) in enumerate(pairs)]


def max_logprob_diff(lm, completions, temperature: float) -> float:
    """Largest |sampler - trainer| log-prob difference over all tokens of all completions."""
    flat = [c for row in completions for c in row]
    refs = trainer_logprobs(lm, [(c.prompt_ids, c.token_ids) for c in flat], temperature)
    worst = 0.0
    for c, ref in zip(flat, refs):
        got = torch.tensor(c.logprobs)
        assert got.shape == ref.shape, (got.shape, ref.shape)
        worst = max(worst, (got - ref).abs().max().item())
    return worst


PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [100, 37], [300, 301, 302, 303, 304, 305, 306, 307, 308, 309, 310], [42]]

# fp32 model, same weights: the engine's cached, left-padded, batched forward differs from the trainer's
# unpadded full forward only by float summation order.
LOGPROB_TOL = 1e-4


# ----------------------------------------------------------------------------- tests


@pytest.fixture(scope="module")
def setup(tiny_model_dir):
    state = sharpened_state(tiny_model_dir, seed=1)
    engine = TorchEngine(tiny_model_dir)
    engine.load_weights(state.items())
    return engine, reference_model(tiny_model_dir, state), tiny_model_dir


def test_greedy_matches_argmax_loop(setup):
    engine, ref, _ = setup
    assert isinstance(engine, RolloutEngine)
    out = engine.generate(PROMPTS, 2, SamplingParams(temperature=0, max_new_tokens=12))
    for prompt, row in zip(PROMPTS, out):
        want = argmax_decode(ref, prompt, 12)
        assert len(set(want)) > 1, "degenerate reference: the test would not catch position bugs"
        for c in row:
            assert c.token_ids == want and c.finish_reason == "length" and c.prompt_ids == prompt
    # greedy log-probs are those of the untempered distribution
    assert max_logprob_diff(ref, out, temperature=1.0) < LOGPROB_TOL
    # bounded batch: 2 rows per pass -> one prompt at a time, same tokens
    chunked = TorchEngine(ref, max_batch_rows=2).generate(PROMPTS, 2, SamplingParams(temperature=0, max_new_tokens=12))
    assert [[c.token_ids for c in r] for r in chunked] == [[c.token_ids for c in r] for r in out]


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_sampled_logprobs_match_trainer(setup, temperature):
    engine, ref, _ = setup
    out = engine.generate(PROMPTS, 3, SamplingParams(temperature=temperature, max_new_tokens=16, seed=0))
    diff = max_logprob_diff(ref, out, temperature)
    print(f"torch engine, T={temperature}: max |sampler - trainer| logprob = {diff:.2e}")
    assert diff < LOGPROB_TOL
    # a wrong temperature would not pass: the check can fail
    assert max_logprob_diff(ref, out, temperature * 1.5) > 100 * LOGPROB_TOL


def test_load_weights_follows_new_weights(tiny_model_dir):
    old, new = sharpened_state(tiny_model_dir, seed=1), sharpened_state(tiny_model_dir, seed=2)
    engine = TorchEngine(tiny_model_dir)
    engine.load_weights(old.items())
    sp = SamplingParams(temperature=0, max_new_tokens=10)
    before = engine.generate(PROMPTS, 1, sp)
    # the names a trainer sends: every parameter plus the tied output weight
    engine.load_weights(new.items())
    assert engine.version == 2
    after = engine.generate(PROMPTS, 1, sp)
    new_ref = reference_model(tiny_model_dir, new)
    assert all(r[0].weight_version == 2 for r in after) and all(r[0].weight_version == 1 for r in before)
    assert [r[0].token_ids for r in after] == [argmax_decode(new_ref, p, 10) for p in PROMPTS]
    assert [r[0].token_ids for r in after] != [r[0].token_ids for r in before]
    sampled = engine.generate(PROMPTS, 2, SamplingParams(temperature=1.0, max_new_tokens=10, seed=3))
    assert max_logprob_diff(new_ref, sampled, 1.0) < LOGPROB_TOL
    with pytest.raises(ValueError, match="not in the model"):
        engine.load_weights([("model.no_such.weight", torch.zeros(1))])
    with pytest.raises(ValueError, match="shape"):
        engine.load_weights([("model.norm.weight", torch.zeros(3))])


def test_stop_tokens_and_lengths(setup):
    engine, ref, model_dir = setup
    stop = tuple(range(0, 512, 20))  # 1 token in 20: about 1 - 0.95**20 = 64% of samples stop
    sp = SamplingParams(temperature=1.0, max_new_tokens=20, stop_token_ids=stop, seed=4)
    out = engine.generate(PROMPTS, 8, sp)
    reasons = [c.finish_reason for row in out for c in row]
    assert "stop" in reasons and "length" in reasons
    for c in (c for row in out for c in row):
        body = c.token_ids[:-1] if c.finish_reason == "stop" else c.token_ids
        assert not set(body) & set(stop), "generation continued past a stop token"
        if c.finish_reason == "stop":
            assert c.token_ids[-1] in stop and len(c.token_ids) <= 20
        else:
            assert len(c.token_ids) == 20
        assert len(c.logprobs) == len(c.token_ids)
    assert max_logprob_diff(ref, out, 1.0) < LOGPROB_TOL  # rows dropped mid-batch keep their log-probs
    # greedy with stops: dropping finished rows from the batch must not change anyone's tokens
    free = [argmax_decode(ref, p, 20) for p in PROMPTS]
    greedy_stop = (free[0][3], free[2][8])  # rows end at different steps
    greedy = SamplingParams(temperature=0, max_new_tokens=20, stop_token_ids=greedy_stop)
    compacting = TorchEngine(ref, check_every=1).generate(PROMPTS, 2, greedy)
    lengths = set()
    for prompt, row in zip(PROMPTS, compacting):
        assert row[0].token_ids == row[1].token_ids == argmax_decode(ref, prompt, 20, greedy_stop)
        lengths.add(len(row[0].token_ids))
    assert len(lengths) > 1
    # the context caps the budget: 11-token prompt + at most 4 new tokens in a 15-token context
    short = TorchEngine(ref, max_context=15).generate([PROMPTS[2]], 1, SamplingParams(temperature=0, max_new_tokens=10))
    assert len(short[0][0].token_ids) == 4 and short[0][0].finish_reason == "length"


def test_seeded_reproducible_and_distinct(setup):
    engine, _, _ = setup
    sp = SamplingParams(temperature=1.0, max_new_tokens=12, seed=7)
    rng = torch.get_rng_state()
    a, b = engine.generate(PROMPTS, 4, sp), engine.generate(PROMPTS, 4, sp)
    assert torch.equal(rng, torch.get_rng_state()), "generate() must not touch the global RNG"
    assert [[c.token_ids for c in r] for r in a] == [[c.token_ids for c in r] for r in b]
    for row in a:
        assert len({tuple(c.token_ids) for c in row}) == 4, "n samples of one prompt should differ at T=1"
    c = engine.generate(PROMPTS, 4, SamplingParams(temperature=1.0, max_new_tokens=12, seed=8))
    assert [[x.token_ids for x in r] for r in a] != [[x.token_ids for x in r] for r in c]


def test_truncation_hand_computed():
    logits = torch.tensor([[3.0, 1.0, 2.0, 0.0]])  # probs ~ .64 .09 .24 .03
    assert torch.isinf(truncate_logits(logits, 2, 1.0)).tolist() == [[False, True, False, True]]
    assert torch.isinf(truncate_logits(logits, 0, 0.8)).tolist() == [[False, True, False, True]]
    assert torch.isinf(truncate_logits(logits, 0, 0.5)).tolist() == [[False, True, True, True]]


def check_truncated_sampling(engine, ref, top_k: int, top_p: float) -> None:
    """Every sampled token lies in the top-k / top-p set of the reference model, and its log-prob is
    the one renormalised over that set (T=0.8). Shared with the vLLM tests."""
    out = engine.generate(PROMPTS, 4, SamplingParams(temperature=0.8, top_k=top_k, top_p=top_p, max_new_tokens=8, seed=0))
    for c in (c for row in out for c in row):
        with torch.no_grad():
            logits = ref(torch.tensor([c.prompt_ids + c.token_ids])).logits[0, len(c.prompt_ids) - 1 : -1]  # (n_new, V)
        logp = truncate_logits(logits.float() / 0.8, top_k, top_p).log_softmax(-1)  # -inf outside the kept set
        want = logp.gather(-1, torch.tensor(c.token_ids)[:, None]).squeeze(-1)
        assert torch.isfinite(want).all(), "sampled a token outside the top-k / top-p set"
        assert torch.allclose(torch.tensor(c.logprobs), want, atol=1e-3)


@pytest.mark.parametrize("top_k,top_p", [(3, 1.0), (0, 0.6), (5, 0.6)])
def test_top_k_top_p(setup, top_k, top_p):
    engine, ref, _ = setup
    check_truncated_sampling(engine, ref, top_k, top_p)


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


def test_bad_input(setup):
    engine, _, _ = setup
    sp = SamplingParams(max_new_tokens=4)
    with pytest.raises(ValueError, match="empty"):
        engine.generate([], 1, sp)
    with pytest.raises(ValueError, match="n .*got 0"):
        engine.generate(PROMPTS, 0, sp)
    with pytest.raises(ValueError, match="prompt 1 has 2048 tokens"):
        engine.generate([[1, 2], [3] * 2048], 1, sp)
    with pytest.raises(ValueError, match="prompt 0 is empty"):
        engine.generate([[]], 1, sp)
    with pytest.raises(ValueError, match="prompt 0 has token id 512"):
        engine.generate([[1, 512]], 1, sp)
    for bad in (dict(temperature=-1), dict(top_p=0), dict(top_k=-1), dict(max_new_tokens=0)):
        with pytest.raises(ValueError, match=next(iter(bad))):
            SamplingParams(**bad)
