"""Resumable checkpoints (sharded model + optimizer via DCP, step, RNG, data cursor, config) and HF export.

Layout of `run_dir/checkpoints/`:
    step_000020/            one complete checkpoint
        model_optim/        torch.distributed.checkpoint (DCP) files, one shard file per rank
        rng/rank_00000.json python / numpy / torch CPU / CUDA RNG states of each rank
        meta.json           step, trainer state (data cursor, ...), config, data fingerprint
        manifest.json       size + sha256 of every file above, written last
    latest                  name of the newest complete checkpoint, written after the rename

Atomicity: everything is written into `step_000020.tmp/`, the manifest last, then the folder is
renamed and `latest` is replaced (both atomic renames). A crash leaves at most a `.tmp` folder,
which is never loaded. Loading verifies every file against the manifest first, so a checkpoint
truncated or corrupted on disk fails with an error naming the file instead of loading garbage.

Which checkpoint a resumed run continues from (and what it checks first) is run_dir.RunDir's job.

No pickles: RNG states and metadata are JSON; DCP's metadata file is written and read by torch.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from minigrpo.dist import all_gather_object, all_ok, barrier, broadcast_object, rank, world_size
from minigrpo.io import InputError, atomic_write_text, write_json_atomic

MANIFEST = "manifest.json"
LATEST = "latest"


class CheckpointError(InputError):
    """A checkpoint that is missing, incomplete or corrupt; the message names the file."""


def step_dir(root: str | os.PathLike, step: int) -> Path:
    return Path(root) / f"step_{step:06d}"


def complete_checkpoints(root: str | os.PathLike) -> list[Path]:
    """The checkpoint folders under `root` whose save finished (renamed from .tmp), newest first.

    Finished is not verified: `verify_manifest` checks the files."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.glob("step_*") if p.is_dir() and p.name[5:].isdigit()]
    return sorted(found, key=lambda p: int(p.name[5:]), reverse=True)


# ----------------------------------------------------------------------------- RNG


def python_rng_to_json(state: tuple) -> list:
    """A `random.Random.getstate()` tuple as JSON-able lists."""
    version, internal, gauss = state
    return [version, list(internal), gauss]


def python_rng_from_json(state: list) -> tuple:
    """The inverse of python_rng_to_json, for `random.Random.setstate`."""
    version, internal, gauss = state
    return (version, tuple(internal), gauss)


def rng_state() -> dict:
    state: dict[str, Any] = {"python": python_rng_to_json(random.getstate()), "torch": torch.get_rng_state().tolist()}
    try:
        import numpy as np

        kind, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
        state["numpy"] = [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)]
    except ImportError:
        pass
    if torch.cuda.is_available():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(python_rng_from_json(state["python"]))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "numpy" in state:
        import numpy as np

        kind, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])


# ----------------------------------------------------------------------------- manifest


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def write_manifest(folder: Path) -> None:
    """Collective. Size + sha256 of every file in `folder`; ranks hash disjoint shares, rank 0 writes.

    Hashing a multi-GB checkpoint is the slow part of a save: sharing it keeps the cost per rank
    at about (checkpoint size / world size).
    """
    listed = None
    if rank() == 0:
        listed = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)
    files = broadcast_object(listed)
    mine = {rel: {"bytes": (folder / rel).stat().st_size, "sha256": _sha256(folder / rel)}
            for rel in files[rank() :: world_size()]}
    entries = {rel: e for part in all_gather_object(mine) for rel, e in part.items()}
    if rank() == 0:
        write_json_atomic(folder / MANIFEST, {"files": dict(sorted(entries.items()))}, indent=None, fsync=True)


def _read_manifest(folder: Path) -> dict:
    manifest = folder / MANIFEST
    if not manifest.is_file():
        raise CheckpointError(f"{folder}: no {MANIFEST} (incomplete checkpoint: the save did not finish)")
    try:
        return json.loads(manifest.read_text())["files"]
    except (json.JSONDecodeError, KeyError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{manifest}: unreadable ({e})") from None


def _check_file(path: Path, want: dict) -> str | None:
    if not path.is_file():
        return f"{path}: missing (listed in {MANIFEST})"
    size = path.stat().st_size
    if size != want["bytes"]:
        return f"{path}: {size} bytes, expected {want['bytes']} (truncated or corrupted checkpoint)"
    if _sha256(path) != want["sha256"]:
        return f"{path}: sha256 mismatch (corrupted checkpoint)"
    return None


def verify_manifest(folder: str | os.PathLike) -> None:
    """Collective. Raise CheckpointError (on every rank) naming a missing, truncated or altered file."""
    folder = Path(folder)
    entries, problem = None, None
    if rank() == 0:
        try:
            entries = _read_manifest(folder)
        except CheckpointError as e:
            problem = str(e)
    entries, problem = broadcast_object((entries, problem))
    if problem:
        raise CheckpointError(problem)
    share = sorted(entries)[rank() :: world_size()]
    mine = next((msg for rel in share if (msg := _check_file(folder / rel, entries[rel]))), None)
    problem = all_ok(mine is None, mine or "")
    if problem:
        raise CheckpointError(problem)


# ----------------------------------------------------------------------------- save / load


def save_checkpoint(
    root: str | os.PathLike,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    state: dict | None = None,
    config: dict | None = None,
    keep_last: int = 0,
    data: dict | None = None,
) -> Path:
    """Collective: every rank calls it. Returns the final folder. `state` (the trainer's), `config`
    and `data` (a fingerprint of the training data, see run_dir.fingerprint) must be JSON-able."""
    root = Path(root)
    final = step_dir(root, step)
    tmp = final.with_name(final.name + ".tmp")
    if rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        (tmp / "rng").mkdir(parents=True)
    barrier()
    model_sd, optim_sd = get_state_dict(model, optimizer if optimizer is not None else [])
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp / "model_optim"))
    write_json_atomic(tmp / "rng" / f"rank_{rank():05d}.json", rng_state(), indent=None, fsync=True)
    if rank() == 0:
        meta = {"step": step, "world_size": world_size(), "state": state or {}, "config": config or {}}
        if data is not None:
            meta["data"] = data
        write_json_atomic(tmp / "meta.json", meta, indent=None, fsync=True)
    barrier()  # every rank's shard and RNG file is on disk before the manifest describes them
    write_manifest(tmp)
    if rank() == 0:
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        atomic_write_text(root / LATEST, final.name, fsync=True)
        if keep_last > 0:
            for old in complete_checkpoints(root)[keep_last:]:
                shutil.rmtree(old, ignore_errors=True)
    barrier()
    return final


def latest_checkpoint(root: str | os.PathLike) -> Path | None:
    """The checkpoint `latest` names, or None when the folder has none."""
    pointer = Path(root) / LATEST
    if not pointer.is_file():
        return None
    path = Path(root) / pointer.read_text().strip()
    if not path.is_dir():
        raise CheckpointError(f"{pointer} names {path.name}, which does not exist")
    return path


def read_meta(path: str | os.PathLike) -> dict:
    """A checkpoint's meta.json: step, world_size, state (the trainer's), config, data (fingerprint)."""
    meta = Path(path) / "meta.json"
    try:
        return json.loads(meta.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{meta}: unreadable ({e})") from None


def load_checkpoint(path: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer | None,
                    verify: bool = True) -> dict:
    """Collective. Verify, then restore model, optimizer and this rank's RNG; return meta.json.

    Every rank raises the same CheckpointError when any rank finds a damaged file. A different
    world size than at save time is allowed (DCP reshards); RNG states are then not restored.
    `verify=False` skips the hashing, for a checkpoint the caller has just verified (RunDir does).
    """
    path = Path(path)
    if verify:
        verify_manifest(path)
    meta = read_meta(path)
    rng_file = path / "rng" / f"rank_{rank():05d}.json"
    same_world = meta.get("world_size", world_size()) == world_size()
    problem = all_ok(rng_file.is_file() or not same_world, f"{rng_file}: missing")
    if problem:
        raise CheckpointError(problem)
    model_sd, optim_sd = get_state_dict(model, optimizer if optimizer is not None else [])
    to_load = {"model": model_sd, "optim": optim_sd} if optimizer is not None else {"model": model_sd}
    dcp.load(to_load, checkpoint_id=str(path / "model_optim"))
    set_state_dict(model, optimizer if optimizer is not None else [], model_state_dict=model_sd,
                   optim_state_dict=optim_sd if optimizer is not None else {})
    if same_world:
        set_rng_state(json.loads(rng_file.read_text()))
    elif rank() == 0:
        # DCP reshards model and optimizer to the new world size; per-rank RNG streams cannot be
        # mapped, so they start from the seed (data order is a function of the step, unaffected).
        print(f"warning: {path} was saved by {meta['world_size']} ranks, resuming on {world_size()}: "
              "RNG states not restored", flush=True)
    return meta


# ----------------------------------------------------------------------------- HF export


def export_hf(model: nn.Module, out_dir: str | os.PathLike, tokenizer: Any = None, dtype: torch.dtype | None = None,
              max_shard_bytes: int = 4 << 30) -> Path:
    """Collective. Write a `save_pretrained`-style folder (safetensors, config, generation config,
    tokenizer) that `AutoModelForCausalLM.from_pretrained` and vLLM load unchanged.

    Weights are gathered one tensor at a time (`iter_full_state_dict`); rank 0 keeps at most one
    shard (`max_shard_bytes`) in CPU memory before writing it. The folder appears atomically.
    """
    from safetensors.torch import save_file

    from minigrpo.parallel import iter_full_state_dict

    out = Path(out_dir)
    tmp = out.with_name(out.name + ".tmp")
    main = rank() == 0
    if main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    lm = getattr(model, "lm", model)
    shards: list[dict[str, str]] = []  # per written shard: name -> file
    buffer: dict[str, torch.Tensor] = {}
    size = 0

    def flush() -> None:
        nonlocal buffer, size
        if buffer:
            name = f"model-{len(shards) + 1:05d}.safetensors"
            save_file(buffer, str(tmp / name), metadata={"format": "pt"})
            shards.append(dict.fromkeys(buffer, name))
        buffer, size = {}, 0

    total = 0
    for name, tensor in iter_full_state_dict(model, dtype=dtype, include_tied=False):
        if not main:
            continue  # other ranks only take part in the gathers
        buffer[name] = tensor.detach().to("cpu").contiguous()
        size += tensor.numel() * tensor.element_size()
        total += tensor.numel() * tensor.element_size()
        if size >= max_shard_bytes:
            flush()
    if main:
        flush()
        _name_shards(tmp, shards, total)
        config = copy.deepcopy(lm.config)  # do not touch the live model's config
        config.use_cache = True  # activation checkpointing turns it off for training
        config.dtype = dtype or next(iter(lm.parameters())).dtype
        config.save_pretrained(tmp)
        if getattr(lm, "generation_config", None) is not None:
            lm.generation_config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    barrier()
    return out


def _name_shards(folder: Path, shards: list[dict[str, str]], total_bytes: int) -> None:
    """One shard -> `model.safetensors`; several -> `model-0000i-of-0000n.safetensors` + index."""
    n = len(shards)
    if n == 1:
        (name,) = set(shards[0].values())
        os.replace(folder / name, folder / "model.safetensors")
        return
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        final = f"model-{i:05d}-of-{n:05d}.safetensors"
        os.replace(folder / f"model-{i:05d}.safetensors", folder / final)
        weight_map.update(dict.fromkeys(shard, final))
    index = {"metadata": {"total_size": total_bytes}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
