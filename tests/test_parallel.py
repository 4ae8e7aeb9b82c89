"""The sharded engine: 2 gloo ranks match 1 process (losses, grad norms, weights), streaming names."""

import json
import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent / "dist"))
from launch import run  # noqa: E402

from minigrpo.config import OptimConfig  # noqa: E402
from minigrpo.optim import clip_grad_norm_, grad_norm, lr_at  # noqa: E402

SCRIPT = "tests/dist/engine_run.py"
STEPS = 3


@pytest.fixture(scope="module")
def runs(tiny_model_dir, tmp_path_factory):
    """One process with the whole batch in one micro-batch vs 2 ranks with micro-batches of 1 + AC."""
    one = tmp_path_factory.mktemp("one")
    two = tmp_path_factory.mktemp("two")
    run([SCRIPT, str(tiny_model_dir), str(one), "--steps", str(STEPS), "--micro-batch-size", "7"])
    run([SCRIPT, str(tiny_model_dir), str(two), "--steps", str(STEPS), "--micro-batch-size", "1", "--ac"], nproc=2)
    return one, two


def _result(path: Path) -> dict:
    return json.loads((path / "result.json").read_text())


def test_two_ranks_match_one_process(runs):
    from safetensors.torch import load_file

    one, two = (_result(p) for p in runs)
    assert (one["world_size"], two["world_size"]) == (1, 2)
    for a, b in zip(one["steps"], two["steps"], strict=True):
        assert a["tokens"] == b["tokens"] == sum(b["tokens_per_rank"])
        assert b["tokens_per_rank"][0] != b["tokens_per_rank"][1]  # the ranks hold different token counts
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=1e-6)
        # Adam is nearly scale-invariant, so the weights alone would not catch a gradient averaged
        # over ranks instead of summed: the pre-clip norm does (it would be half).
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
    assert one["steps"][STEPS - 1]["loss"] < one["steps"][0]["loss"] - 0.5  # it trained
    assert two["steps"][-1]["tokens_per_rank"][1] == 0  # the last step left rank 1 without samples
    w1, w2 = load_file(str(runs[0] / "final.safetensors")), load_file(str(runs[1] / "final.safetensors"))
    assert w1.keys() == w2.keys()
    for name in w1:
        # atol lr/100: Adam divides by sqrt(v), so elements whose gradient is ~0 move by an amount
        # set by float rounding of the (differently ordered) sums; real bugs move weights by ~lr.
        torch.testing.assert_close(w2[name], w1[name], rtol=1e-4, atol=1e-4, msg=lambda m, n=name: f"{n}: {m}")


def test_weights_moved(runs, tiny_model_dir):
    from safetensors.torch import load_file

    start = load_file(str(tiny_model_dir / "model.safetensors"))
    end = load_file(str(runs[1] / "final.safetensors"))
    moved = max((end[n] - start[n]).abs().max().item() for n in start)
    assert moved > 5e-3  # lr 1e-2 for 3 Adam steps: parameters move by about 1e-2 each step


def test_stream_names_are_hf_names_with_lm_head(runs, tiny_model_dir):
    from safetensors import safe_open

    names = _result(runs[1])["names"]
    with safe_open(str(tiny_model_dir / "model.safetensors"), "pt") as f:
        saved = set(f.keys())
    assert "lm_head.weight" in names and "model.embed_tokens.weight" in names
    assert not any(n.startswith("lm.") for n in names)
    assert set(names) == saved | {"lm_head.weight"}
    assert len(names) == len(set(names))


def test_lr_schedules():
    cfg = OptimConfig(lr=1.0, schedule="cosine", warmup_ratio=0.2, min_lr_ratio=0.1)
    lrs = [lr_at(s, 10, cfg) for s in range(10)]
    assert lrs[:2] == [0.5, 1.0]  # 2 warm-up steps
    assert lrs[2] == pytest.approx(1.0) and lrs[-1] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(lrs[2:], lrs[3:]))
    mid = lr_at(2 + 7 // 2, 10, cfg)  # not exactly the midpoint: 7 decay intervals
    assert 0.1 < mid < 1.0
    const = OptimConfig(lr=2.0, warmup_ratio=0.5)
    assert [lr_at(s, 4, const) for s in range(4)] == [1.0, 2.0, 2.0, 2.0]


def test_clip_grad_norm_plain_tensors():
    a, b = torch.zeros(3, requires_grad=True), torch.zeros(2, 2, requires_grad=True)
    a.grad, b.grad = torch.tensor([3.0, 0.0, 0.0]), torch.tensor([[0.0, 4.0], [0.0, 0.0]])
    assert grad_norm([a, b]).item() == pytest.approx(5.0)
    norm = clip_grad_norm_([a, b], 1.0)
    assert norm.item() == pytest.approx(5.0)
    assert grad_norm([a, b]).item() == pytest.approx(1.0, rel=1e-5)
    assert clip_grad_norm_([a, b], 10.0).item() == pytest.approx(1.0, rel=1e-5)  # below max: untouched
    assert grad_norm([a, b]).item() == pytest.approx(1.0, rel=1e-5)


def test_export_loads_with_transformers_and_gives_same_logprobs(runs):
    """The HF export of the 2-rank sharded model: from_pretrained gives the trained model's log-probs."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    hf_dir = runs[1] / "hf"
    assert (hf_dir / "config.json").is_file() and (hf_dir / "tokenizer_config.json").is_file()
    exported = load_file(str(hf_dir / "model.safetensors"))
    trained = load_file(str(runs[1] / "final.safetensors"))
    assert exported.keys() == trained.keys()  # tied lm_head left out, as save_pretrained does
    for name in trained:
        assert torch.equal(exported[name], trained[name]), name
    model = AutoModelForCausalLM.from_pretrained(str(hf_dir)).eval()
    probe = load_file(str(runs[1] / "probe.safetensors"))
    with torch.no_grad():
        logits = model(probe["input_ids"]).logits.float()  # (B, T, V)
    logp = torch.log_softmax(logits, -1).gather(-1, probe["targets"].unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(logp, probe["logp"], rtol=1e-5, atol=1e-5)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # still tied


def test_reference_is_frozen_and_still_the_initial_model(runs):
    from safetensors.torch import load_file

    for path in runs:
        probe = load_file(str(path / "probe.safetensors"))
        assert _result(path)["ref_trainable"] == 0
        torch.testing.assert_close(probe["ref_logp"], probe["initial_logp"], rtol=1e-5, atol=1e-5)
        assert (probe["logp"] - probe["initial_logp"]).abs().max() > 1e-2  # while the policy moved


def odd_sized_copy(model_dir: Path, out: Path) -> Path:
    """The tiny model re-drawn with an odd vocabulary and MLP width, so 2 ranks get shards of unequal rows."""
    import shutil

    from transformers import AutoConfig, Qwen2ForCausalLM

    cfg = AutoConfig.from_pretrained(model_dir)
    cfg.vocab_size, cfg.intermediate_size = cfg.vocab_size - 3, cfg.intermediate_size + 1
    torch.manual_seed(5)
    Qwen2ForCausalLM(cfg).save_pretrained(out)
    for f in model_dir.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "chat_template")):
            shutil.copy(f, out / f.name)
    return out


def test_load_sharded_equals_plain_load_on_two_ranks(tiny_model_dir, tmp_path):
    """Meta-device init with rank 0's weights scattered gives, shard by shard, what a plain load sharded
    with shard_model / shard_reference gives, and only rank 0 reads the checkpoint."""
    model_dir = odd_sized_copy(tiny_model_dir, tmp_path / "odd")
    out = tmp_path / "load.json"
    run(["tests/dist/load_sharded.py", str(model_dir), str(out)], nproc=2)
    ranks = json.loads(out.read_text())["ranks"]
    assert [r["checkpoint_reads"] for r in ranks] == [2, 0]  # trainable + frozen, rank 0 only
    vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"]
    assert [r["local_rows"] for r in ranks] == [(vocab + 1) // 2, vocab // 2]  # uneven Shard(0)
    for r in ranks:
        for kind in ("trainable", "frozen"):
            assert all(r[kind].values()), (kind, r[kind])


@pytest.mark.parametrize("saved, loaded", [(1, 2), (2, 1)])
def test_checkpoint_restores_across_plain_and_sharded_worlds(tiny_model_dir, tmp_path, saved, loaded):
    """One rank trains a plain module and more ranks FSDP2 shards: a checkpoint of either restores in the
    other bit for bit (weights and AdamW moments, gathered and compared by name)."""
    script = "tests/dist/checkpoint_worlds.py"
    run([script, str(tiny_model_dir), str(tmp_path), "save"], nproc=saved)
    run([script, str(tiny_model_dir), str(tmp_path), "load"], nproc=loaded)
    result = json.loads((tmp_path / "loaded.json").read_text())
    assert result["names"] > 20 and result["differ"] == [], result
    assert result["sharded"] == ("LogprobModel" if loaded == 1 else "FSDPLogprobModel")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_bf16_mixed_precision_tracks_the_fp32_cpu_run(runs, tiny_model_dir, tmp_path):
    """NCCL + bf16 compute with fp32 master weights and reductions: close to the fp32 CPU run."""
    from safetensors.torch import load_file

    visible = os.environ.get("CUDA_VISIBLE_DEVICES") or ",".join(str(i) for i in range(torch.cuda.device_count()))
    nproc = min(2, torch.cuda.device_count())
    run([SCRIPT, str(tiny_model_dir), str(tmp_path), "--steps", str(STEPS), "--micro-batch-size", "1"], nproc=nproc, env={"CUDA_VISIBLE_DEVICES": visible})
    gpu, cpu = _result(tmp_path), _result(runs[0])
    assert gpu["device"].startswith("cuda")
    for a, b in zip(cpu["steps"], gpu["steps"], strict=True):
        assert b["tokens"] == a["tokens"]
        assert b["loss"] == pytest.approx(a["loss"], rel=2e-2)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-1)
    weights = load_file(str(tmp_path / "final.safetensors"))
    assert all(w.dtype == torch.float32 for w in weights.values())  # master weights stay fp32
