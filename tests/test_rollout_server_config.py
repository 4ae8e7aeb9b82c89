"""rollout.engine=vllm_server's config keys, and the flags the launcher gives `vllm serve` (no server needed)."""

import argparse
import json

import pytest

from minigrpo.config import ConfigError, RolloutConfig


def test_server_engine_needs_urls_and_a_positive_timeout():
    RolloutConfig(engine="vllm_server", server_urls=["http://gen0:8000", "https://gen1:8443"])
    for bad, key in ((dict(engine="vllm_server"), "server_urls"),
                     (dict(engine="vllm_server", server_urls=["gen0:8000"]), r"server_urls\[0\]"),
                     (dict(server_timeout_s=0.0), "server_timeout_s")):
        with pytest.raises(ConfigError, match=key):
            RolloutConfig(**bad)


@pytest.mark.parametrize("on_gpu", [False, True])
def test_launcher_flags(on_gpu):
    pytest.importorskip("vllm")
    from minigrpo.rollout.serve import server_command

    args = argparse.Namespace(model="/models/policy", host="127.0.0.1", port=8123, seed=0, kv_cache_gb=0.5,
                              gpu_memory_utilization=0.8)
    command = server_command(args, ["--enforce-eager"], on_gpu)
    assert command[1:3] == ["-m", "vllm.entrypoints.launchers.api_server.entry"]
    flag = lambda name: command[command.index(name) + 1]  # noqa: E731
    assert json.loads(flag("--weight-transfer-config")) == {"backend": "minigrpo_nccl" if on_gpu else "minigrpo_gloo"}
    assert flag("--logprobs-mode") == "processed_logprobs" and flag("--generation-config") == "vllm"
    assert flag("--dtype") == ("bfloat16" if on_gpu else "float32") and "--enable-scale-out" in command
    if on_gpu:
        assert flag("--gpu-memory-utilization") == "0.8"
    else:
        assert flag("--kv-cache-memory-bytes") == str(1 << 29)
    assert command[-1] == "--enforce-eager"
