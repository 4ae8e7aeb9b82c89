"""The GPU code paths checked on CPU: vLLM weight-API detection, sleep and wake-up order, the config
keys that reach the engines, the KV-cache bound, the prefill attention choice, the weight push's
gather dtype, and the suite itself on a (pretended) CUDA host.

vLLM is replaced by a fake `vllm` module whose workers have the old (vLLM < 0.16:
`reload_weights(self)`) or the new (`reload_weights(self, weights_iterator=None, ...)`) signature,
so these tests run without vllm installed; tests/test_vllm_push.py uses the real one.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from minigrpo.config import ParallelConfig, RolloutConfig
from minigrpo.rollout import SamplingParams, TorchEngine, make_engine

ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- a fake vLLM


class OldRunner:
    """vLLM < 0.16: reload_weights() re-reads the checkpoint from disk; weights go through the model."""

    def __init__(self, events):
        self.events = events
        self.model = types.SimpleNamespace(load_weights=lambda weights: events.append(("load", list(weights))))

    def reload_weights(self) -> None:
        self.events.append(("reload_from_disk",))


class NewRunner(OldRunner):
    def reload_weights(self, weights_iterator=None, weights_path=None, is_checkpoint_format=True) -> None:
        self.events.append(("reload", list(weights_iterator)))


class FakeWorker:
    """As vLLM's Worker: reload_weights(*args, **kwargs) forwards to the model runner."""

    def __init__(self, runner):
        self.model_runner = runner

    def reload_weights(self, *args, **kwargs) -> None:
        self.model_runner.reload_weights(*args, **kwargs)


class FakeLLM:
    """Records what the engine asks of vllm.LLM; collective_rpc calls its one worker in process."""

    runner = NewRunner
    version = "0.32.0"

    def __init__(self, **kwargs):
        self.kwargs, self.events = kwargs, []
        self.worker = FakeWorker(self.runner(self.events))
        hf_config = types.SimpleNamespace(tie_word_embeddings=True, eos_token_id=2)
        model_config = types.SimpleNamespace(max_model_len=64, get_vocab_size=lambda: 512, hf_config=hf_config)
        shutdown = types.SimpleNamespace(shutdown=lambda: None)
        self.llm_engine = types.SimpleNamespace(model_config=model_config, engine_core=shutdown)

    def collective_rpc(self, method, timeout=None, args=(), kwargs=None):
        fn = getattr(self.worker, method) if isinstance(method, str) else functools.partial(method, self.worker)
        return [fn(*args, **(kwargs or {}))]

    def sleep(self, level=1):
        self.events.append(("sleep", level))

    def wake_up(self, tags=None):
        self.events.append(("wake_up", tuple(tags)))

    def reset_prefix_cache(self):
        self.events.append(("reset_prefix_cache",))


@pytest.fixture
def fake_vllm(monkeypatch):
    """`import vllm` gives the fake; returns a function that selects the worker signature."""
    module = types.ModuleType("vllm")
    module.LLM, module.__version__ = FakeLLM, FakeLLM.version
    monkeypatch.setitem(sys.modules, "vllm", module)

    def use(runner=NewRunner, version="0.32.0"):
        monkeypatch.setattr(FakeLLM, "runner", runner)
        monkeypatch.setattr(module, "__version__", version)

    return use


@pytest.fixture
def fake_gpu(monkeypatch):
    """CUDA reported available (sleep mode on); the calls to torch.cuda.empty_cache are recorded."""
    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: [])
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", lambda states: None)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: calls.append("empty_cache"))
    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF", raising=False)
    return calls


def hf_state(model_dir) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(Path(model_dir) / "model.safetensors"))


def test_new_vllm_reloads_through_weights_iterator(fake_vllm, tiny_model_dir):
    from minigrpo.rollout.vllm_engine import RELOAD, VLLMEngine

    fake_vllm(NewRunner)
    engine = VLLMEngine(tiny_model_dir)
    assert engine.weights_api == RELOAD
    state = hf_state(tiny_model_dir)
    engine.load_weights(state.items())
    (kind, sent), reset = engine.llm.events
    assert kind == "reload" and reset == ("reset_prefix_cache",)
    names = [name for name, _ in sent]
    assert names == [*state, "lm_head.weight"]  # tied: the embedding is sent again as the output weight
    assert engine.version == 1


def test_old_vllm_falls_back_to_model_load_weights(fake_vllm, tiny_model_dir):
    from minigrpo.rollout.vllm_engine import LOAD, VLLMEngine

    fake_vllm(OldRunner, version="0.11.0")
    engine = VLLMEngine(tiny_model_dir)
    assert engine.weights_api == LOAD
    state = hf_state(tiny_model_dir)
    engine.load_weights(state.items())
    (kind, sent), reset = engine.llm.events
    assert kind == "load" and reset == ("reset_prefix_cache",)  # never reload_from_disk
    assert dict(sent).keys() == {*state, "lm_head.weight"}


def test_level_2_sleep_and_empty_cache_before_every_wake_up(fake_vllm, fake_gpu, tiny_model_dir):
    from minigrpo.rollout.vllm_engine import VLLMEngine

    fake_vllm()
    engine = VLLMEngine(tiny_model_dir, sleep_level=2, enforce_eager=True)
    assert engine.llm.kwargs["enable_sleep_mode"] and engine.llm.kwargs["enforce_eager"]
    events = engine.llm.events
    # one step of the trainer: sleep, train, push every weight, wake the KV cache
    for _ in range(2):
        events.clear()
        fake_gpu.clear()
        engine.sleep()
        assert events == [("sleep", 2)]
        engine.load_weights(hf_state(tiny_model_dir).items())
        engine.wake_up()
        kinds = [e[0] for e in events]
        assert kinds == ["sleep", "wake_up", "reload", "reset_prefix_cache", "wake_up"]
        assert events[1] == ("wake_up", ("weights",)) and events[-1] == ("wake_up", ("kv_cache",))
        assert fake_gpu == ["empty_cache", "empty_cache"]  # one before each of the two wake-ups


def test_level_2_refuses_a_push_that_leaves_weights_discarded(fake_vllm, fake_gpu, tiny_model_dir):
    from minigrpo.rollout.vllm_engine import VLLMEngine

    fake_vllm()
    engine = VLLMEngine(tiny_model_dir, sleep_level=2)
    engine.sleep()
    with pytest.raises(RuntimeError, match="discarded by a level-2 sleep"):
        engine.wake_up()  # nothing pushed: the weights would be garbage
    partial = [(k, v) for k, v in hf_state(tiny_model_dir).items() if "norm" not in k]
    with pytest.raises(RuntimeError, match="left 5 weights unpushed"):  # 2 layers x 2 norms + the final norm
        engine.load_weights(partial)
    engine.load_weights(hf_state(tiny_model_dir).items())  # a complete push makes it usable again
    engine.wake_up()
    # level 1 (the default) copies the weights: waking up without a push is fine
    engine = VLLMEngine(tiny_model_dir)
    engine.sleep()
    engine.wake_up()
    assert [e[0] for e in engine.llm.events] == ["sleep", "wake_up"] and engine.llm.events[0] == ("sleep", 1)


def test_expandable_segments_refused_only_where_vllm_cannot_take_them(fake_vllm, fake_gpu, tiny_model_dir, monkeypatch):
    from minigrpo.rollout.vllm_engine import VLLMEngine, check_allocator_conf

    conf = {"PYTORCH_CUDA_ALLOC_CONF": "max_split_size_mb:512,expandable_segments:True"}
    with pytest.raises(RuntimeError, match="sleep_between_steps=false"):
        check_allocator_conf("0.20.2", conf)
    check_allocator_conf("0.21.0", conf)  # vLLM >= 0.21 turns them off around its own pool
    check_allocator_conf("0.11.0", {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:False"})
    fake_vllm(OldRunner, version="0.15.1")
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    with pytest.raises(RuntimeError, match="vLLM 0.15.1"):
        VLLMEngine(tiny_model_dir)  # before LLM() starts, not deep inside its allocator
    VLLMEngine(tiny_model_dir, enable_sleep_mode=False)  # no sleep mode: no conflict


def test_make_engine_passes_the_rollout_config(fake_vllm, tiny_model_dir):
    fake_vllm()
    cfg = RolloutConfig(engine="vllm", enforce_eager=True, gpu_memory_utilization=0.3, kv_cache_memory_gb=0.5)
    engine = make_engine(cfg, tiny_model_dir, torch.device("cpu"), seed=3)
    assert engine.llm.kwargs["enforce_eager"] is True and engine.llm.kwargs["seed"] == 3
    assert engine.llm.kwargs["dtype"] == "float32" and engine.sleep_level == 2
    assert make_engine(RolloutConfig(), tiny_model_dir, torch.device("cpu"), 0).max_batch_rows is None
    assert make_engine(RolloutConfig(max_batch_rows=6), tiny_model_dir, torch.device("cpu"), 0).max_batch_rows == 6


# ----------------------------------------------------------------------------- the torch engine


def test_max_batch_rows_bounds_the_kv_cache(tiny_model_dir, monkeypatch):
    """The KV caches never hold more rows than rollout.max_batch_rows, and the tokens do not change."""
    from minigrpo.rollout.kv_cache import KVCache

    rows = []
    make_cache = KVCache.__init__

    def recording(self, shape, n_rows, *args):
        rows.append(n_rows)
        make_cache(self, shape, n_rows, *args)

    monkeypatch.setattr(KVCache, "__init__", recording)
    prompts = [[5, 6, 7], [8, 9], [10, 11, 12, 13], [14]]
    greedy = SamplingParams(temperature=0, max_new_tokens=6)
    outputs = {}
    for bound in (0, 4):
        rows.clear()
        engine = make_engine(RolloutConfig(max_batch_rows=bound), tiny_model_dir, torch.device("cpu"), 0)
        outputs[bound] = [[c.token_ids for c in row] for row in engine.generate(prompts, 2, greedy)]
        assert max(rows) == (8 if bound == 0 else 4)  # 4 prompts x 2 samples, or 2 prompts per pass
    assert outputs[0] == outputs[4]


def test_prefill_attention_avoids_masked_gqa_where_repeat_kv():
    """Masked GQA repeats the KV heads (CUDA's fused kernels then qualify); unpadded prefill is plain causal.
    Every path gives the same numbers as the reference."""
    from minigrpo.attention import sdpa as prefill_attention

    g = torch.Generator().manual_seed(0)
    B, H, Hkv, L, d = 2, 4, 2, 6, 8
    q, k, v = (torch.randn(B, h, L, d, generator=g, dtype=torch.float64) for h in (H, Hkv, Hkv))
    lens = torch.tensor([6, 4])
    keys_real = torch.arange(L)[None, :] >= (L - lens)[:, None]  # left padding
    mask = (torch.ones(L, L, dtype=torch.bool).tril()[None] & keys_real[:, None]) | torch.eye(L, dtype=torch.bool)
    mask = mask[:, None]  # (B, 1, L, L)
    kr, vr = k.repeat_interleave(H // Hkv, 1), v.repeat_interleave(H // Hkv, 1)
    scores = (q @ kr.transpose(-1, -2) / d**0.5).masked_fill(~mask, float("-inf"))
    want = scores.softmax(-1) @ vr  # (B, H, L, d)

    calls = []
    sdpa = F.scaled_dot_product_attention

    def recording(query, key, value, **kwargs):
        calls.append((key.shape[1], kwargs.get("attn_mask") is not None, kwargs.get("enable_gqa", False),
                      kwargs.get("is_causal", False)))
        return sdpa(query, key, value, **kwargs)

    import minigrpo.attention as attention

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(attention.F, "scaled_dot_product_attention", recording)
        on_cuda = prefill_attention(q, k, v, mask, d**-0.5, repeat_kv=True)
        on_cpu = prefill_attention(q, k, v, mask, d**-0.5, repeat_kv=False)
        causal = prefill_attention(q, k, v, None, d**-0.5, repeat_kv=True)
    assert calls == [(H, True, False, False), (Hkv, True, True, False), (Hkv, False, True, True)]
    torch.testing.assert_close(on_cuda, want)
    torch.testing.assert_close(on_cpu, want)
    full = (q @ kr.transpose(-1, -2) / d**0.5).masked_fill(~torch.ones(L, L, dtype=torch.bool).tril(), float("-inf"))
    torch.testing.assert_close(causal, full.softmax(-1) @ vr)


def test_unpadded_prompts_decode_as_padded_ones(tiny_model_dir):
    """Prompts of one length take the mask-free causal prefill: same greedy tokens as in a padded batch."""
    engine = TorchEngine(tiny_model_dir)
    greedy = SamplingParams(temperature=0, max_new_tokens=5)
    same_length = [[5, 6, 7, 8], [9, 10, 11, 12]]
    alone = engine.generate(same_length, 1, greedy)
    padded = engine.generate(same_length + [[13, 14]], 1, greedy)[:2]
    assert [r[0].token_ids for r in alone] == [r[0].token_ids for r in padded]
    for a, b in zip(alone, padded):
        torch.testing.assert_close(torch.tensor(a[0].logprobs), torch.tensor(b[0].logprobs), rtol=0, atol=1e-4)


# ----------------------------------------------------------------------------- the weight push


def test_weight_push_casts_before_the_gather(tiny_model_dir, monkeypatch):
    """iter_full_state_dict(dtype=bf16) all-gathers bf16 shards (half the bytes of fp32 masters). One rank, sharded
    (parallel.fsdp=always), so that the gathers are there to count."""
    from torch.distributed.tensor import DTensor

    from minigrpo.dist import init_distributed
    from minigrpo.model import LogprobModel, load_model
    from minigrpo.parallel import iter_full_state_dict, shard_model

    policy = shard_model(LogprobModel(load_model(tiny_model_dir)), ParallelConfig(fsdp="always"), init_distributed())
    gathered = []
    full_tensor = DTensor.full_tensor
    recording = lambda self, **kw: gathered.append(self.dtype) or full_tensor(self, **kw)  # noqa: E731
    monkeypatch.setattr(DTensor, "full_tensor", recording)
    pushed = dict(iter_full_state_dict(policy, dtype=torch.bfloat16))
    assert len(gathered) == len(pushed) and set(gathered) == {torch.bfloat16}
    gathered.clear()
    masters = dict(iter_full_state_dict(policy))
    assert set(gathered) == {torch.float32}
    for name, tensor in pushed.items():
        assert tensor.dtype == torch.bfloat16 and torch.equal(tensor, masters[name].bfloat16()), name


# ----------------------------------------------------------------------------- the suite on a CUDA host


def test_probe_device_choice_is_cpu(tiny_model_dir):
    """Run by the next test on a pretended CUDA host: an unmarked test still gets CPU, gloo and fp32."""
    from minigrpo.dist import init_distributed

    assert torch.cuda.is_available() is False and os.environ["CUDA_VISIBLE_DEVICES"] == ""
    info = init_distributed()
    assert (info.device.type, info.backend) == ("cpu", "gloo")
    engine = make_engine(RolloutConfig(), tiny_model_dir, info.device, 0)
    assert next(engine.lm.parameters()).dtype == torch.float32


def test_cpu_tests_stay_on_cpu_when_a_gpu_is_reported():
    """pytest with torch.cuda.is_available() pretending True and -m "not cuda": fp32-on-CPU tests still pass
    (a trainer run comparing sampler and trainer log-probs to 1e-4 among them), and no CUDA test is left
    unmarked in the files that hold them."""
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'tests' / 'plugins'}{os.pathsep}{ROOT}", "OMP_NUM_THREADS": "1"}
    env.pop("CUDA_VISIBLE_DEVICES", None)
    base = [sys.executable, "-m", "pytest", "-p", "pretend_cuda", "-p", "no:cacheprovider", "-m", "not cuda", "-q"]
    tests = ["tests/test_gpu_paths.py::test_probe_device_choice_is_cpu",
             "tests/test_trainer.py::test_metrics_log_and_prompt_records"]
    proc = subprocess.run([*base, *tests], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "2 passed" in proc.stdout, proc.stdout[-2000:]
    with_cuda_tests = ["tests/test_kernels.py", "tests/test_parallel.py", "tests/test_gpu_paths.py"]
    proc = subprocess.run([*base, "--collect-only", "-k", "cuda", *with_cuda_tests], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    selected = [line for line in proc.stdout.splitlines() if "::" in line]
    assert proc.returncode in (0, 5) and not selected, selected  # 5: nothing collected


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_torch_engine_prefill_runs_without_the_math_kernel(tiny_model_dir):
    """Padded GQA prompts in bf16 on the GPU with SDPA's math backend switched off, and the sampler's
    log-probs against the trainer's on the same bf16 weights."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from minigrpo.model import LogprobModel, load_model

    engine = TorchEngine(tiny_model_dir, dtype="bfloat16", device="cuda")
    prompts = [[5, 6, 7, 8, 9, 10, 11], [100, 37], [42]]
    sampling = SamplingParams(temperature=1.0, max_new_tokens=8, seed=0)
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION]):
        out = engine.generate(prompts, 2, sampling)
    trainer = LogprobModel(load_model(tiny_model_dir, dtype="bfloat16", device="cuda")).eval()
    worst = 0.0
    for row in out:
        for c in row:
            ids = torch.tensor([c.prompt_ids + c.token_ids], device="cuda")
            targets = torch.full_like(ids, -100)
            targets[0, len(c.prompt_ids) - 1 : -1] = ids[0, len(c.prompt_ids) :]
            with torch.no_grad():
                logp, _ = trainer(ids, targets)
            got = logp[0, len(c.prompt_ids) - 1 : -1].float().cpu()
            worst = max(worst, (got - torch.tensor(c.logprobs)).abs().max().item())
    assert worst < 0.1, worst  # bf16 on both sides, different kernels: ~1e-2 expected


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_load_sharded_and_bf16_push_on_nccl(tiny_model_dir, tmp_path):
    """On the GPU (NCCL): meta init + rank 0's weights equal a plain load, and the push gathers bf16."""
    sys.path.insert(0, str(ROOT / "tests" / "dist"))
    from launch import run

    out = tmp_path / "load.json"
    visible = os.environ.get("CUDA_VISIBLE_DEVICES") or ",".join(str(i) for i in range(torch.cuda.device_count()))
    nproc = min(2, torch.cuda.device_count())
    run(["tests/dist/load_sharded.py", str(tiny_model_dir), str(out), "--push-dtype", "bfloat16"], nproc=nproc,
        env={"CUDA_VISIBLE_DEVICES": visible})
    result = json.loads(out.read_text())
    for r in result["ranks"]:
        assert r["device"].startswith("cuda") and r["pushed_dtypes"] == ["torch.bfloat16"]
        for kind in ("trainable", "frozen"):
            assert all(r[kind].values()), (kind, r[kind])
