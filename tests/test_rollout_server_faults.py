"""VLLMServerEngine when its server fails: a hung server and a killed one stop generate() with the URL
named, within rollout.server_timeout_s; an engine started against a dead URL says so just as fast.

Its own server (this module kills it), started as in test_rollout_server.py. Skips cleanly when vllm is
not installed.
"""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest

pytest.importorskip("vllm")

from test_rollout_contract import PROMPTS, write_vllm_model  # noqa: E402
from test_rollout_server import free_port, served  # noqa: E402

from minigrpo.rollout import SamplingParams  # noqa: E402
from minigrpo.rollout.server_http import ServerError  # noqa: E402
from minigrpo.rollout.vllm_server import VLLMServerEngine  # noqa: E402

TIMEOUT_S = 10.0
SLACK_S = 5.0  # thread wake-ups and a loaded CI machine
LONG = SamplingParams(temperature=1.0, max_new_tokens=400)  # generation still running when the fault comes


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    model_dir, _ = write_vllm_model(tiny_model_dir, root / "tiny32", seed=1)
    with served(model_dir, root / "server.log") as (url, proc):
        yield url, proc, model_dir


def generate_until_fault(engine: VLLMServerEngine, fault, after_s: float = 1.0) -> tuple[ServerError, float]:
    """Run a long generate(), inject `fault` after `after_s`; the error it raised and how long after the fault."""
    at = {}

    def inject() -> None:
        at["t"] = time.monotonic()
        fault()

    timer = threading.Timer(after_s, inject)
    timer.start()
    try:
        with pytest.raises(ServerError) as info:
            engine.generate(PROMPTS * 4, 4, LONG)
    finally:
        timer.cancel()
    assert "t" in at, "generate() ended before the fault was injected: the test could not fail"
    return info.value, time.monotonic() - at["t"]


def test_hung_server_is_named_within_the_timeout(server):
    url, proc, model_dir = server
    engine = VLLMServerEngine([url], model_dir, timeout_s=TIMEOUT_S)
    try:
        error, took = generate_until_fault(engine, lambda: os.kill(proc.pid, signal.SIGSTOP))
    finally:
        os.kill(proc.pid, signal.SIGCONT)
    print(f"hung server reported after {took:.1f} s: {error}")
    assert url in str(error) and "did not answer /health" in str(error)
    assert took < TIMEOUT_S + SLACK_S
    engine.close()


def test_killed_server_is_named_within_the_timeout(server):
    url, proc, model_dir = server
    engine = VLLMServerEngine([url], model_dir, timeout_s=TIMEOUT_S)
    error, took = generate_until_fault(engine, lambda: os.killpg(proc.pid, signal.SIGKILL))
    print(f"killed server reported after {took:.1f} s: {error}")
    assert url in str(error) and took < TIMEOUT_S + SLACK_S
    # a push to it fails the same way, naming it
    start = time.monotonic()
    with pytest.raises(ServerError, match=url):
        engine.load_weights([])
    assert time.monotonic() - start < TIMEOUT_S + SLACK_S
    engine.close()  # releases its end of the weight-transfer group (the server's end is gone)


def test_engine_start_against_a_dead_url_fails_within_the_timeout(server):
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    start = time.monotonic()
    with pytest.raises(ServerError, match=f"{url}.*cannot reach it"):
        VLLMServerEngine([url], server[2], timeout_s=3.0)
    assert time.monotonic() - start < 3.0 + SLACK_S
