"""Each prompt computed once per group gives exactly the per-completion computation (float64, CPU).

The shared-prompt layout (rl/layout.py) packs a group as [prompt, c_1, ..., c_G]; sdpa models score
only the needed query-key pairs (minigrpo/attention.py), eager ones take the dense 4D mask. The
per-completion layout gives every completion its own [prompt, c_i] row. Their per-token log-probs,
entropies, losses and parameter gradients must agree to float64 precision, for every aggregation,
for sdpa and eager attention, with groups of different sizes and lengths, empty and one-token
completions, one-token prompts, several groups per micro-batch and a group split over two, and on
2 gloo ranks under FSDP2.

HF's Qwen2 computes RMSNorm and eager attention's softmax in float32 whatever the input dtype; the
`float64_model` fixture (tests/dist/float64.py) removes those two casts, so that both layouts are
compared at float64 precision (with them, the layouts still agree, but only to float32 rounding).
"""

import json
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

sys.path.insert(0, str(Path(__file__).parent / "dist"))
import float64  # noqa: E402
from launch import run  # noqa: E402

from minigrpo import grpo  # noqa: E402
from minigrpo.model import LogprobModel  # noqa: E402
from minigrpo.rl.groups import Group  # noqa: E402
from minigrpo.rl.layout import per_completion_rows, shared_prompt_rows  # noqa: E402
from minigrpo.rl.micro_batches import pack_groups  # noqa: E402
from minigrpo.rl.prompts import Prompt  # noqa: E402
from minigrpo.rollout import Completion  # noqa: E402

PAD = 0


def _groups(vocab: int, seed: int = 0) -> list[Group]:
    """Prompts of 1, 5 and 9 tokens; completions of length 0, 1 and up to 7; group sizes 3, 4, 2."""
    g = torch.Generator().manual_seed(seed)
    ids = lambda n: torch.randint(3, vocab, (n,), generator=g).tolist()  # noqa: E731
    spec = [(1, [0, 1, 4]), (5, [7, 2, 1, 3]), (9, [5, 0])]
    groups = []
    for i, (p, lengths) in enumerate(spec):
        prompt = ids(p)
        completions = [Completion(prompt, ids(n), [-0.5] * n, "stop", 0) for n in lengths]
        rewards = [float(k % 2) for k in range(len(lengths))]
        groups.append(Group(Prompt(f"p{i}", prompt), completions, [""] * len(lengths), rewards, {}, 1.0))
    return groups


@pytest.fixture
def float64_model(monkeypatch):
    for obj, name, value in float64.patches():
        monkeypatch.setattr(obj, name, value)


def _model(tiny_model_dir, attn):
    torch.manual_seed(0)
    lm = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float64, attn_implementation=attn)
    with torch.no_grad():  # non-trivial weights: every position should matter
        for p in lm.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return LogprobModel(lm)


def _scores(model, mb, temperature=0.9):
    rows = mb.rows
    logp, entropy = model(rows.input_ids, rows.targets, rows.attention_mask, rows.position_ids,
                          temperature=temperature, return_entropy=True, score_index=rows.score_index)
    return rows.scatter(logp), rows.scatter(entropy)


def _step(model, groups, micro_batch_size, shared, aggregation):
    """Loss, per-token log-probs and entropies (completion space, concatenated), and gradients."""
    model.zero_grad(set_to_none=True)
    adv = torch.tensor([[0.3, -1.2, 0.9, 0.4], [1.1, -0.7, 0.2, -0.6], [0.8, -0.8, 0.0, 0.0]], dtype=torch.float64)
    mbs, counts = pack_groups(groups, adv, micro_batch_size, PAD, max_completion_tokens=7, shared_prompt=shared)
    aggregate = grpo.AGGREGATIONS[aggregation](counts)
    total, logps, entropies = 0.0, [], []
    for mb in mbs:
        logp, entropy = _scores(model, mb)
        mask = mb.mask.double()
        ref = logp.detach() - 0.1 * mask
        loss = grpo.grpo_loss(logp, logp.detach() + 0.05 * mask, mb.adv.double(), mask, aggregate,
                              ref_logp=ref, beta=0.04, eps_low=0.2, eps_high=0.28)
        loss.backward()
        total += loss.item()
        logps.append(logp[mask.bool()])
        entropies.append(entropy[mask.bool()])
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return total, torch.cat(logps).detach(), torch.cat(entropies).detach(), grads


def _ragged_groups(tiny_model_dir):
    from transformers import AutoConfig

    return _groups(AutoConfig.from_pretrained(tiny_model_dir).vocab_size)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("aggregation", list(grpo.AGGREGATIONS))
@pytest.mark.parametrize("micro_batch_size", [2, 4, 16])  # 2 and 4 split groups; 16: all groups in one
def test_shared_prompt_equals_per_completion(tiny_model_dir, float64_model, attn, aggregation, micro_batch_size):
    model = _model(tiny_model_dir, attn)
    groups = _ragged_groups(tiny_model_dir)
    shared = _step(model, groups, micro_batch_size, True, aggregation)
    alone = _step(model, groups, micro_batch_size, False, aggregation)
    assert shared[0] == pytest.approx(alone[0], rel=1e-12, abs=1e-14)
    torch.testing.assert_close(shared[1], alone[1], rtol=1e-12, atol=1e-12)  # log-probs
    torch.testing.assert_close(shared[2], alone[2], rtol=1e-12, atol=1e-12)  # entropies
    assert shared[3].keys() == alone[3].keys() and len(shared[3]) > 0
    for name, grad in alone[3].items():
        torch.testing.assert_close(shared[3][name], grad, rtol=1e-10, atol=1e-12, msg=lambda m: f"{name}: {m}")


def test_shared_layout_computes_each_prompt_once_per_micro_batch():
    groups = [([5, 6, 7], [[1, 2], [3], []]), ([8], [[4, 4, 4]])]
    rows = shared_prompt_rows(groups, PAD)
    alone = per_completion_rows([(p, c) for p, cs in groups for c in cs], PAD)
    assert rows.input_ids.shape[0] == 2 and rows.input_tokens == 3 + 3 + 1 + 3  # prompts once
    assert alone.input_tokens == 3 * 3 + 3 + (1 + 3)  # prompts once per completion
    assert rows.shape == alone.shape == (4, 3)
    assert torch.equal(rows.targets, alone.targets) and torch.equal(rows.out_index, alone.out_index)
    # row 0: [5 6 7 | 1 2 | 3]; completion tokens continue the prompt's positions
    assert rows.position_ids[0].tolist() == [0, 1, 2, 3, 4, 3]
    # token "3" (index 5) sees the prompt and itself, not the other completion
    assert rows.attention_mask.dense()[0, 0, 5].tolist() == [True, True, True, False, False, True]
    # the first token of every completion is scored from the prompt's last position (index 2)
    assert rows.score_index[:2].tolist() == [2, 3] and rows.score_index[2].item() == 2


def test_lm_head_runs_only_on_scored_rows(tiny_model_dir, float64_model, monkeypatch):
    import minigrpo.model as model_module

    seen = []
    real = model_module.fused_logprobs

    def spy(hidden, weight, targets, **kw):
        seen.append(hidden.shape[0])
        return real(hidden, weight, targets, **kw)

    monkeypatch.setattr(model_module, "fused_logprobs", spy)
    model = _model(tiny_model_dir, "sdpa")
    groups = _ragged_groups(tiny_model_dir)
    mbs, _ = pack_groups(groups, torch.zeros(3, 4, dtype=torch.float64), 16, PAD, 7)
    logp, _ = _scores(model, mbs[0])
    scored = sum(len(c.token_ids) for g in groups for c in g.completions)
    assert seen == [scored]  # not the prompt, padding or unscored rows
    # and it matches the head over every row (full logits, float64)
    rows = mbs[0].rows
    with torch.no_grad():
        hidden = model.lm.model(input_ids=rows.input_ids, attention_mask=rows.attention_mask.dense(),
                                position_ids=rows.position_ids).last_hidden_state
        logits = model.lm.lm_head(hidden).reshape(-1, model.lm.config.vocab_size) / 0.9
        full = torch.log_softmax(logits, -1)[rows.score_index].gather(1, rows.targets[:, None])[:, 0]
    torch.testing.assert_close(logp[mbs[0].mask.bool()].detach(), full, rtol=1e-12, atol=1e-12)


def test_sdpa_scores_only_the_needed_pairs(tiny_model_dir, float64_model, monkeypatch):
    """With sdpa, a shared-prompt row goes through two SDPA calls per layer, (R, P_max) causal and
    (S, L_max) x (P_max + L_max) masked, never over the (T, T) row; the dense mask (eager) gives the
    same outputs."""
    import minigrpo.attention as attention

    model = _model(tiny_model_dir, "sdpa")
    assert model.scores_needed_pairs and model.lm.config._attn_implementation == attention.NAME
    groups = _ragged_groups(tiny_model_dir)
    mbs, _ = pack_groups(groups, torch.zeros(3, 4, dtype=torch.float64), 16, PAD, 7)
    rows = mbs[0].rows
    R, T = rows.input_ids.shape
    shapes = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def recording(query, key, value, **kwargs):
        shapes.append((tuple(query.shape[::2]), key.shape[2], kwargs.get("is_causal", False)))
        return sdpa(query, key, value, **kwargs)

    monkeypatch.setattr(attention.F, "scaled_dot_product_attention", recording)
    logp, entropy = _scores(model, mbs[0])
    S = sum(1 for g in groups for c in g.completions if c.token_ids)  # completions with a token: 7
    layers = model.lm.config.num_hidden_layers
    assert shapes == [((R, 9), 9, True), ((S, 7), 9 + 7, False)] * layers  # prompts 1, 5, 9; completions <= 7
    assert all(q * k < T * T for (_, q), k, _ in shapes)
    dense = _model(tiny_model_dir, "eager")
    dense_logp, dense_entropy = _scores(dense, mbs[0])
    torch.testing.assert_close(logp, dense_logp, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(entropy, dense_entropy, rtol=1e-12, atol=1e-12)


def test_other_masks_take_plain_sdpa(tiny_model_dir):
    """The installed attention is HF's sdpa for a 2D padding mask: the same logits as a model left alone."""
    lm = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32, attn_implementation="sdpa")
    plain = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32, attn_implementation="sdpa")
    LogprobModel(lm)
    ids = torch.tensor([[5, 6, 7, 8], [9, 10, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    with torch.no_grad():
        torch.testing.assert_close(lm(ids, attention_mask=mask).logits, plain(ids, attention_mask=mask).logits)


def test_two_ranks_fsdp_shared_prompt_equals_per_completion(tiny_model_dir, tmp_path):
    """2 gloo ranks holding different groups, FSDP2 with activation checkpointing, micro-batches of 2
    (groups split over them): the same global loss and full gradients with either layout."""
    out = tmp_path / "result.json"
    run(["tests/dist/shared_prompt_ranks.py", str(tiny_model_dir), str(out)], nproc=2)
    results = json.loads(out.read_text())
    assert set(results) == set(grpo.AGGREGATIONS)
    for aggregation, r in results.items():
        shared, alone = r["loss"]
        assert alone != 0.0 and shared == pytest.approx(alone, rel=1e-12, abs=1e-14), aggregation
        assert r["max_grad"] > 1e-3 and r["max_grad_diff"] <= 1e-10 * r["max_grad"], (aggregation, r)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_shared_prompt_attention_matches_per_completion(tiny_model_dir):
    """On the GPU: fp32 shared-prompt rows give the per-completion log-probs and gradients; in bf16 they run
    with SDPA's math backend switched off (the masked completion part repeats the KV heads, see
    attention.sdpa) and stay close to fp32."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    groups = _ragged_groups(tiny_model_dir)
    adv = torch.tensor([[0.3, -1.2, 0.9, 0.4], [1.1, -0.7, 0.2, -0.6], [0.8, -0.8, 0.0, 0.0]])

    def scores(dtype, shared):
        torch.manual_seed(0)
        lm = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=dtype, attn_implementation="sdpa").cuda()
        model = LogprobModel(lm)
        mbs, _ = pack_groups(groups, adv, 16, PAD, max_completion_tokens=7, shared_prompt=shared)
        mb = mbs[0].to(torch.device("cuda"))
        logp, _ = _scores(model, mb)
        (logp * mb.adv.to(logp.dtype)).sum().backward()
        grads = {n: p.grad.float().cpu() for n, p in model.named_parameters() if p.grad is not None}
        return logp[mb.mask.bool()].detach().float().cpu(), grads

    shared, alone = scores(torch.float32, True), scores(torch.float32, False)
    torch.testing.assert_close(shared[0], alone[0], rtol=1e-4, atol=1e-5)
    for name, grad in alone[1].items():
        torch.testing.assert_close(shared[1][name], grad, rtol=1e-3, atol=1e-5)
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION]):
        low = scores(torch.bfloat16, True)
    torch.testing.assert_close(low[0], alone[0], rtol=0.0, atol=0.1)
