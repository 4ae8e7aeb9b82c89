"""The trainer held to a recorded run: the first steps of the digits example on CPU.

test_trainer.py re-derives one step in float64; this test holds whole runs (sampling, rewards,
advantages, reference and old log-probs, clipping, KL, the optimizer, weight sync and the step
statistics) to tests/assets/digits_cpu_trace.json, recorded by tests/assets/make_golden_trace.py
(the file names its command, commit, torch version and date). First recorded at c159ecf, before the
code-shape refactor of issue 10; re-recorded only for a change meant to alter the numbers. A
refactor meant to change nothing must reproduce it.

Tolerances, per metric (relative, absolute). Changing only `parallel.micro_batch_size` (1, 2, 3 or
16 instead of 4), which leaves the math as it is and reorders float32 sums, moved loss and
grad_norm by up to 4.0e-6 relative and everything else by less (OMP_NUM_THREADS=2 moved nothing):
- reward_mean, completion_len_mean: same tokens. Sampling is seeded and deterministic on CPU and a
  float32 wobble of the weights does not flip a sampled token, so the rewards and lengths are those
  recorded; abs 1e-9 only lets the float64 order of the mean change (one other token moves them by
  far more).
- clip_low_frac, clip_high_frac: the same clipped-token count (one token moves them by 1/400 or more).
- loss, kl_mean, grad_norm, entropy, sampler_logp_diff, ratio_mean: rel 5e-5, about 12 times the
  drift above. Where the exact value is zero the relative test has nothing to hold to, so an
  absolute floor covers the float32 noise: the on-policy first step's loss (sum of advantages = 0,
  recorded 2e-10) and KL (policy = reference) get 1e-8; sampler_logp_diff, which is float32 noise
  between engine and trainer on on-policy steps (~2e-7), gets 1e-6 (a real mismatch is >= 1e-3).
"""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest

ASSETS = Path(__file__).resolve().parent / "assets"
TRACE = json.loads((ASSETS / "digits_cpu_trace.json").read_text())

SAME_TOKENS = (0.0, 1e-9)
SAME_COUNT = (0.0, 1e-6)
FLOAT32 = 5e-5
TOLERANCE = {  # metric -> (rel, abs)
    "reward_mean": SAME_TOKENS,
    "completion_len_mean": SAME_TOKENS,
    "clip_low_frac": SAME_COUNT,
    "clip_high_frac": SAME_COUNT,
    "loss": (FLOAT32, 1e-8),
    "kl_mean": (FLOAT32, 1e-8),
    "grad_norm": (FLOAT32, 0.0),
    "entropy": (FLOAT32, 0.0),
    "sampler_logp_diff": (FLOAT32, 1e-6),
    "ratio_mean": (FLOAT32, 0.0),
}


def load_generator():
    """tests/assets/make_golden_trace.py as a module: the run and the model fingerprint it recorded with."""
    spec = importlib.util.spec_from_file_location("make_golden_trace", ASSETS / "make_golden_trace.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_traced_metric_has_a_tolerance():
    assert sorted(TRACE["keys"]) == sorted(TOLERANCE)


def test_trace_exercises_kl_ratio_and_clipping():
    """The recorded run is one where these parts of the step can be wrong: KL, ratios and clipping act."""
    off_policy = TRACE["variants"]["k3_two_updates"]["steps"]
    assert "--grpo.updates_per_batch=2" in TRACE["variants"]["k3_two_updates"]["overrides"]
    assert all(step["ratio_mean"] != 1.0 for step in off_policy)
    assert all(step["clip_low_frac"] > 0 and step["clip_high_frac"] > 0 for step in off_policy)
    for variant in TRACE["variants"].values():
        assert all(step["kl_mean"] > 1e-3 for step in variant["steps"][1:])
        assert len({step["reward_mean"] for step in variant["steps"]}) > 1


@pytest.mark.parametrize("variant", sorted(TRACE["variants"]))
def test_run_reproduces_recorded_trace(tiny_model_dir, tmp_path, variant):
    generator = load_generator()
    assert generator.model_fingerprint(tiny_model_dir) == TRACE["model_fingerprint"], (
        "the tiny model is not the one the trace was recorded with (build_tiny, the tokenizer corpus or the"
        " tokenizers / transformers version changed): the trace cannot judge the trainer; re-record it on purpose"
    )
    recorded = TRACE["variants"][variant]
    got = generator.run_variant(tiny_model_dir, tmp_path / variant, recorded["overrides"])
    assert len(got) == len(recorded["steps"])
    mismatches = []
    for i, (step, want) in enumerate(zip(got, recorded["steps"]), start=1):
        for key in TRACE["keys"]:
            rel, abs_ = TOLERANCE[key]
            if not math.isclose(step[key], want[key], rel_tol=rel, abs_tol=abs_):
                diff = abs(step[key] - want[key])
                tol = f"|diff| {diff:.2e}; rel {rel}, abs {abs_}"
                mismatches.append(f"step {i} {key}: got {step[key]!r}, recorded {want[key]!r} ({tol})")
    assert not mismatches, f"{variant} left the trace recorded at {TRACE['commit'][:7]}:\n" + "\n".join(mismatches)
