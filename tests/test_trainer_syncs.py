"""The loss loop has no host syncs and no object collectives per micro-batch.

Counts, during a real GRPO step on one process, the calls made *from minigrpo's own code* that wait
for the device (`Tensor.item`, `float()`, `int()`, `bool()`, `.tolist()`) and every
`torch.distributed` object collective. The bound stated: inside `loss_and_backward`, exactly one host
sync per call (the finiteness check before the optimizer step) and no object collective, whatever the
number of micro-batches; over the whole step, the same number of syncs with 8 micro-batches as with 2.
"""

import sys
from collections import Counter

import pytest
import torch

from examples.digits import make_prompts, reward_fn
from minigrpo.config import load_config
from minigrpo.model import load_tokenizer
from minigrpo.parallel import full_tensor
from minigrpo.trainer import GRPORunConfig, GRPOTrainer

SYNC_METHODS = ("item", "__float__", "__int__", "__bool__", "tolist")
OBJECT_COLLECTIVES = ("all_gather_object", "broadcast_object_list", "gather_object", "scatter_object_list")


def _minigrpo_caller(depth: int = 2) -> str | None:
    """`file:line` of the caller `depth` frames up when it is minigrpo's own code, else None."""
    frame = sys._getframe(depth)
    filename = frame.f_code.co_filename
    if "/minigrpo/" in filename and "site-packages" not in filename:
        return f"{filename.rsplit('/minigrpo/', 1)[1]}:{frame.f_lineno}"
    return None


class SyncCounter:
    """Counts host syncs made by minigrpo code and object collectives, while `active`."""

    def __init__(self, monkeypatch):
        self.counts: Counter = Counter()
        self.active = False
        for name in SYNC_METHODS:
            original = getattr(torch.Tensor, name)
            monkeypatch.setattr(torch.Tensor, name, self._wrap_sync(name, original))
        for name in OBJECT_COLLECTIVES:
            original = getattr(torch.distributed, name)
            monkeypatch.setattr(torch.distributed, name, self._wrap_collective(name, original))

    def _wrap_sync(self, name, original):
        def wrapper(tensor, *args, **kwargs):
            where = _minigrpo_caller() if self.active else None
            if where:
                self.counts["sync"] += 1
                self.counts["sync at " + where] += 1
            return original(tensor, *args, **kwargs)

        return wrapper

    def _wrap_collective(self, name, original):
        def wrapper(*args, **kwargs):
            if self.active:
                self.counts["object_collective"] += 1
            return original(*args, **kwargs)

        return wrapper


class CountingTrainer(GRPOTrainer):
    def __init__(self, counter, *args):
        super().__init__(*args)
        self.counter, self.loop_counts, self.step_counts = counter, [], []

    def loss_and_backward(self, *args):
        before = Counter(self.counter.counts)
        super().loss_and_backward(*args)
        self.loop_counts.append(self.counter.counts - before)

    def train_step(self):
        before = Counter(self.counter.counts)
        self.counter.active = True
        try:
            return super().train_step()
        finally:
            self.counter.active = False
            self.step_counts.append(self.counter.counts - before)


def _run(tiny_model_dir, out, monkeypatch, micro_batch_size):
    counter = SyncCounter(monkeypatch)
    overrides = [
        f"--model.path={tiny_model_dir}", f"--run.output_dir={out}", "--run.steps=2", "--run.seed=1",
        "--run.save_every=-1", "--grpo.prompts_per_step=2", "--rollout.samples_per_prompt=4",
        "--rollout.max_new_tokens=6", f"--parallel.micro_batch_size={micro_batch_size}", "--loss.beta=0.1",
        "--grpo.updates_per_batch=2",
    ]
    cfg = load_config(GRPORunConfig, None, overrides)
    trainer = CountingTrainer(counter, cfg, make_prompts(load_tokenizer(tiny_model_dir), 8), reward_fn)
    trainer.train()
    return trainer


@pytest.mark.parametrize("micro_batch_size", [1, 4])
def test_loss_loop_has_one_host_sync_and_no_object_collective(tiny_model_dir, tmp_path, monkeypatch, micro_batch_size):
    trainer = _run(tiny_model_dir, tmp_path, monkeypatch, micro_batch_size)
    assert len(trainer.loop_counts) == 4  # 2 steps x 2 updates
    for counts in trainer.loop_counts:
        assert counts["sync"] == 1, counts  # the finiteness flag, read once after the loop
        assert counts["object_collective"] == 0, counts


def test_syncs_per_step_do_not_grow_with_micro_batches(tiny_model_dir, tmp_path, monkeypatch):
    many = _run(tiny_model_dir, tmp_path / "many", monkeypatch, 1).step_counts  # 8 micro-batches a step
    monkeypatch.undo()
    few = _run(tiny_model_dir, tmp_path / "few", monkeypatch, 4).step_counts  # 2 micro-batches a step
    assert [c["sync"] for c in many] == [c["sync"] for c in few], (many, few)
    assert [c["object_collective"] for c in many] == [c["object_collective"] for c in few]
    for counts in many:
        assert counts["object_collective"] <= 2, counts  # reward-component names, prompt records


class GradientTrainer(GRPOTrainer):
    """Keeps the gradients each optimizer step sees."""

    def __init__(self, *args):
        super().__init__(*args)
        self.grads = []

    def optimizer_step(self, total_updates):
        self.grads.append({n: full_tensor(p.grad).clone() for n, p in self.policy.named_parameters()})
        return super().optimizer_step(total_updates)


def _trained(tiny_model_dir, out, *extra) -> GradientTrainer:
    overrides = [
        f"--model.path={tiny_model_dir}", f"--run.output_dir={out}", "--run.steps=2", "--run.seed=1",
        "--run.save_every=-1", "--grpo.prompts_per_step=2", "--rollout.samples_per_prompt=4",
        "--rollout.max_new_tokens=6", "--parallel.micro_batch_size=1", "--loss.beta=0.1", *extra,
    ]
    prompts = make_prompts(load_tokenizer(tiny_model_dir), 8)
    trainer = GradientTrainer(load_config(GRPORunConfig, None, overrides), prompts, reward_fn)
    trainer.history = trainer.train()
    return trainer


def _gradients(tiny_model_dir, out):
    return _trained(tiny_model_dir, out, "--parallel.fsdp=always").grads


def test_one_rank_reduces_gradients_once_per_update(tiny_model_dir, tmp_path, monkeypatch):
    """On one sharded rank FSDP2 reduces the accumulated gradients after the last micro-batch only (8 per step here),
    and the optimizer sees bit for bit the gradients of a reduction after every micro-batch."""
    from torch.distributed.fsdp import FSDPModule

    import minigrpo.trainer as trainer_module

    flags = []
    real = FSDPModule.set_requires_gradient_sync

    def recording(self, requires_gradient_sync, **kwargs):
        flags.append(requires_gradient_sync)
        return real(self, requires_gradient_sync, **kwargs)

    monkeypatch.setattr(FSDPModule, "set_requires_gradient_sync", recording)
    deferred = _gradients(tiny_model_dir, tmp_path / "deferred")
    assert flags == ([False] * 7 + [True]) * 2  # 2 prompts x 4 samples, one completion per micro-batch; 2 steps
    monkeypatch.setattr(trainer_module, "sync_gradients", lambda *args, **kwargs: None)
    every = _gradients(tiny_model_dir, tmp_path / "every")
    assert len(deferred) == len(every) == 2
    for a, b in zip(deferred, every):
        assert a.keys() == b.keys()
        for name in a:
            assert torch.equal(a[name], b[name]), name
        assert any(g.abs().sum() > 0 for g in a.values())


def test_one_plain_rank_trains_as_one_sharded_rank(tiny_model_dir, tmp_path):
    """On one rank in fp32 the models are not sharded (parallel.fsdp=auto), and the run is FSDP2's on one rank
    bit for bit: every gradient the optimizer sees, the final weights, the metrics of every step."""
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    plain = _trained(tiny_model_dir, tmp_path / "plain")
    sharded = _trained(tiny_model_dir, tmp_path / "sharded", "--parallel.fsdp=always")
    assert not isinstance(plain.policy, FSDPModule) and not isinstance(plain.ref, FSDPModule)
    assert not any(isinstance(p, DTensor) for p in plain.policy.parameters())
    assert isinstance(sharded.policy, FSDPModule) and isinstance(sharded.ref, FSDPModule)
    assert len(plain.grads) == len(sharded.grads) == 2
    for a, b in zip(plain.grads, sharded.grads):
        assert a.keys() == b.keys()
        for name in a:
            assert torch.equal(a[name], b[name]), name
    weights = {n: full_tensor(p) for n, p in sharded.policy.named_parameters()}
    for name, param in plain.policy.named_parameters():
        assert torch.equal(param, weights[name]), name
    clock = ("time_", "step_time", "_per_s", "mfu", "eta")  # what a clock measures differs run to run
    untimed = lambda m: {k: v for k, v in m.items() if not any(c in k for c in clock)}  # noqa: E731
    assert [untimed(m) for m in plain.history] == [untimed(m) for m in sharded.history]
    assert len(untimed(plain.history[-1])) > 10
