"""FSDP2 -> vLLM weight sync under torchrun (2 CPU ranks, gloo): the sampler follows the trainer."""

import json
import sys
from pathlib import Path

import pytest

pytest.importorskip("vllm")

sys.path.insert(0, str(Path(__file__).resolve().parent / "dist"))

from launch import run  # noqa: E402
from test_rollout_vllm import write_vllm_model  # noqa: E402

SYNC_TOL = 2e-4  # as test_rollout_vllm.LOGPROB_TOL: fp32 on both sides


def test_fsdp_step_reaches_vllm_engine(tiny_model_dir, tmp_path):
    model_dir, _ = write_vllm_model(tiny_model_dir, tmp_path / "tiny32", seed=1)
    out = tmp_path / "sync.json"
    run(["tests/dist/rollout_sync.py", str(model_dir), str(out)], nproc=2, timeout=420)
    result = json.loads(out.read_text())
    print(f"torchrun x{result['world_size']}: max |sampler - trainer| logprob before sync {result['stale']:.3f}, after {result['synced']:.2e}")
    assert result["stale"] > 0.05, "the optimizer step did not change the log-probs: the test could not fail"
    assert result["synced"] < SYNC_TOL
    assert result["version"] == 1 and result["weight_versions"] == [1]
    assert "lm_head.weight" in result["names"] and "model.embed_tokens.weight" in result["names"]
