"""Seconds per GRPO step and per phase: minigrpo with the shared prompt on and off, TRL's GRPOTrainer, the floor.

    OMP_NUM_THREADS=1 python benchmarks/grpo_step.py --preset small --workloads short,long --steps 3 \\
        --trl-python /tmp/trl-venv/bin/python --out /tmp/grpo_step.json
    python benchmarks/grpo_step.py --workloads drg-demo --work-dir /tmp/gstep      # the DRG demo's GRPO section
    python benchmarks/grpo_step.py --report /tmp/grpo_step.json                    # print saved results again

The contract (issue 12): 8 prompts x 8 samples x 64 new tokens at temperature 1, k3 KL at beta 0.04 against a
frozen reference, DAPO token-mean, one update per batch (so no old-policy pass), AdamW at a constant lr 1e-5 with
norm clipping at 1, fp32, the torch rollout engine, micro-batches of 8 completions (= G: each prompt is computed
once). Workloads: `short` (prompts of 50-70 tokens: a hospital-course fragment in a chat turn) and `long` (600-900
tokens: the DRG recipe's prompt around synthetic hospital courses, the DRG shape); the reward is the digits task's
(examples/digits.py); the model is a random-init Qwen2 of `--preset` (minigrpo.tiny) whose tokenizer is trained on
the recipe's text. `drg-demo` runs the GRPO section of recipes/drg/configs/demo.yaml on the demo's own model with
the dense DRG reward (shared prompt on and off; in a tree without `grpo.shared_prompt`, the one layout it has).

Interleaving: every trainer lives at once and takes one step in turn (the order rotating each round), after
`--warmup` untimed steps, so load drifting on a shared machine hits all alike; medians are reported. Two clocks:
wall seconds (the trainers' own phase timers) and CPU seconds of the trainer's process around each phase, which a
loaded machine disturbs far less. On a shared CPU machine run one thread per trainer (OMP_NUM_THREADS=1): more
threads than free cores make every parallel op wait for a descheduled thread. The work folder keeps the model and
cases, so a run from another checkout (`git worktree add`) can reuse them with `--work-dir` or `--model`.

TRL runs in its own interpreter, stepped over a pipe (benchmarks/grpo_step_trl.py says how to make its venv).

The floor: the FLOPs of the tokens that must be processed (each prompt once per group, each completion token once,
the LM head only on scored tokens) at the fp32 matmul rate measured in this run ([4096 x H] @ [H x 4H]). One forward
= 2 x body params x decoder tokens + 2 x V x H x scored tokens; generation and the reference are one forward each,
the update three (forward + backward). Attention FLOPs are not counted: the floor is a lower bound.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PHASES = ("generate", "reference", "old", "update", "sync")
WORKLOADS = {"short": (50, 70), "long": (600, 900)}  # prompt tokens, drawn uniformly per prompt
G, P, NEW_TOKENS = 8, 8, 64  # samples per prompt, prompts per step, completion budget


# ----------------------------------------------------------------------------- model and prompts


def drg_cases(n: int, seed: int = 0, **knobs) -> list[dict]:
    from recipes.drg.prep.synthetic import generate

    return generate(n, seed=seed, **knobs)


def build_model(out: Path, preset, cases: list[dict]) -> Path:
    """A random Qwen2 of `preset`; its tokenizer learns the recipe's text, pseudo-words fill the vocabulary."""
    if (out / "config.json").is_file():
        return out
    from benchmarks.rollout_throughput import corpus
    from minigrpo.tiny import build_tiny
    from recipes.drg.demo import tokenizer_corpus

    texts = tokenizer_corpus(cases) + ([] if not isinstance(preset, str) else corpus())
    return build_tiny(out, texts, preset, seed=0)


def cut(tokenizer, text: str, tokens: int) -> str:
    return tokenizer.decode(tokenizer(text)["input_ids"][: max(tokens, 1)])


def wrap_prompt(tokenizer, workload: str, body: str) -> str:
    """short: one user turn around the text; long: the DRG prompt (system prompt, DRG introduction, question)."""
    from recipes.drg.prompts import build_prompt_text

    if workload == "long":
        return build_prompt_text(tokenizer, body)
    turn = [{"role": "user", "content": "write digits: " + body}]
    return tokenizer.apply_chat_template(turn, add_generation_prompt=True, tokenize=False)


def make_prompt_texts(tokenizer, cases: list[dict], workload: str, n: int, seed: int = 0) -> list[str]:
    """n prompt texts of the workload's length range: hospital courses (joined when one is too short), cut."""
    lo, hi = WORKLOADS[workload]
    rng = random.Random(seed)
    texts = []
    for i in range(n):
        target = rng.randint(lo, hi)
        course, j = "", i
        while len(tokenizer(course)["input_ids"]) < target:
            course += cases[j % len(cases)]["problem"] + "\n\n"
            j += 1
        frame = len(tokenizer(wrap_prompt(tokenizer, workload, "x"))["input_ids"]) - 1  # the tokens around the body
        texts.append(wrap_prompt(tokenizer, workload, cut(tokenizer, course, target - frame)))
    return texts


def matmul_rate(hidden: int, repeats: int = 3) -> dict:
    """fp32 FLOP/s of a [4096 x H] @ [H x 4H] GEMM (an MLP projection of a 4096-token micro-batch), per wall
    second and per CPU second of this process."""
    a, b = torch.randn(4096, hidden), torch.randn(hidden, 4 * hidden)
    a @ b
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(repeats):
        a @ b
    flops = 2 * 4096 * hidden * 4 * hidden * repeats
    return {"wall": flops / (time.perf_counter() - wall), "cpu": flops / (time.process_time() - cpu)}


# ----------------------------------------------------------------------------- minigrpo


def needed_pairs(prompt: int, completions: list[int]) -> int:
    """Query-key pairs attention must score: the prompt causally, each completion over the prompt and its own
    causal prefix. SDPA given a mask scores every pair of each (padded) row: R x T^2 per micro-batch."""
    return prompt * (prompt + 1) // 2 + sum(n * prompt + n * (n + 1) // 2 for n in completions)


def computed_pairs(rows) -> int:
    """Query-key pairs the attention of one pass scores for these rows: per-completion rows (a padding mask)
    R x T^2; shared-prompt rows (minigrpo/attention.py) the prompts causally, R x P(P+1)/2, and S x L x (P + L)
    for the completions (P, L: the micro-batch's longest prompt and completion)."""
    mask = rows.attention_mask
    if hasattr(mask, "spans"):  # a SharedPromptMask
        P, L, R = mask.prompt_len, mask.completion_len, rows.input_ids.shape[0]
        return R * P * (P + 1) // 2 + len(mask.spans) * L * (P + L)
    return rows.input_ids.shape[0] * rows.input_ids.shape[1] ** 2


def token_counts(groups, mbs) -> dict:
    """Tokens of one step: needed (each prompt once per group), fed to the decoder, and LM-head rows."""
    prompt = [len(g.completions[0].prompt_ids) for g in groups]
    completion = [len(c.token_ids) for g in groups for c in g.completions]
    rows = [mb.rows for mb in mbs]
    pairs = sum(needed_pairs(p, [len(c.token_ids) for c in g.completions]) for p, g in zip(prompt, groups))
    head = sum(r.score_index.numel() if hasattr(r, "score_index") else int((r.targets != -100).sum()) for r in rows)
    return {
        "needed": sum(prompt) + sum(completion),
        "scored": sum(completion),
        "completion_tokens": sum(completion),
        "prompt_tokens": sum(prompt),
        # the torch engine prefills each prompt once (left-padded to the longest), then feeds every sampled token
        # but the last of each completion
        "generate_fed": len(prompt) * max(prompt) + sum(max(n - 1, 0) for n in completion),
        "forward_fed": sum(r.input_tokens for r in rows),  # per pass (reference, update): real tokens
        "forward_positions": sum(r.input_ids.numel() for r in rows),  # the same with padding
        "head_rows": head,
        "needed_pairs": pairs,
        "forward_pairs": sum(computed_pairs(r) for r in rows),
    }


class MinigrpoVariant:
    """One GRPOTrainer advanced one step per call; its metrics and token counts per step."""

    def __init__(self, name: str, prompts, reward_fn, overrides: list[str], yaml_path: str | None):
        from minigrpo.config import load_config
        from minigrpo.trainer import GRPORunConfig, GRPOTrainer

        self.name = name
        self.trainer = GRPOTrainer(load_config(GRPORunConfig, yaml_path, overrides), prompts, reward_fn)
        self.counts: list[dict] = []
        pack = self.trainer.micro_batches

        def counted(groups, adv):
            mbs, step_counts = pack(groups, adv)
            self.counts.append(token_counts(groups, mbs))
            return mbs, step_counts

        self.trainer.micro_batches = counted
        self.cpu: dict[str, float] = {}
        self._cpu_timed("rollout", lambda *args: "generate")
        self._cpu_timed("logprobs", lambda model, mbs: "reference" if model is self.trainer.ref else "old")
        self._cpu_timed("loss_and_backward", lambda *args: "update")
        self._cpu_timed("optimizer_step", lambda *args: "update")
        self._cpu_timed("sync_weights", lambda *args: "sync")
        self.steps = self.trainer.steps()

    def _cpu_timed(self, method: str, phase_of) -> None:
        """The trainer's `method`, its CPU seconds (this process, all threads) added to phase_of(*args)."""
        fn = getattr(self.trainer, method)

        def wrapper(*args, **kwargs):
            start = time.process_time()
            out = fn(*args, **kwargs)
            phase = phase_of(*args)
            self.cpu[phase] = self.cpu.get(phase, 0.0) + time.process_time() - start
            return out

        setattr(self.trainer, method, wrapper)

    def step(self) -> dict:
        self.cpu.clear()
        start = time.process_time()
        _, metrics = next(self.steps)
        cpu_step = time.process_time() - start
        seconds = {phase: float(metrics.get(f"time_{phase}", 0.0)) for phase in PHASES}
        cpu = {phase: self.cpu.get(phase, 0.0) for phase in PHASES}
        wall = {"seconds": seconds, "step": float(metrics["step_time"])}
        return {"wall": wall, "cpu": {"seconds": cpu, "step": cpu_step}, "tokens": self.counts[-1]}

    def close(self) -> None:
        self.steps.close()  # stops before the final export: nothing is written


def minigrpo_overrides(model_dir: Path, out: Path, steps: int) -> list[str]:
    return [
        f"--model.path={model_dir}",
        "--rollout.engine=torch",
        f"--rollout.samples_per_prompt={G}",
        f"--rollout.max_new_tokens={NEW_TOKENS}",
        "--rollout.temperature=1.0",
        "--loss.kl=k3",
        "--loss.beta=0.04",
        "--loss.aggregation=token_mean",
        "--optim.lr=1e-5",
        "--optim.max_grad_norm=1.0",
        "--optim.schedule=constant",
        f"--grpo.prompts_per_step={P}",
        "--grpo.updates_per_batch=1",
        "--grpo.max_prompt_tokens=1024",
        "--grpo.shuffle=false",  # step k takes prompts 8k..8k+7, as TRL does without shuffling
        f"--parallel.micro_batch_size={G}",
        f"--run.output_dir={out}",
        f"--run.steps={steps}",
        "--run.save_every=-1",
        "--run.log_every=1000",
    ]


def has_shared_prompt() -> bool:
    from minigrpo.config import GRPOConfig

    return "shared_prompt" in {f.name for f in dataclasses.fields(GRPOConfig)}


# ----------------------------------------------------------------------------- one workload


def model_shape(model_dir: Path) -> dict:
    """Parameter counts: the decoder body runs on every fed token, the head (V x H) only on scored ones."""
    from safetensors import safe_open

    cfg = json.loads((model_dir / "config.json").read_text())
    with safe_open(str(model_dir / "model.safetensors"), framework="pt") as f:
        params = sum(torch.Size(f.get_slice(name).get_shape()).numel() for name in f.keys())  # noqa: SIM118
    vocab, hidden = cfg["vocab_size"], cfg["hidden_size"]
    head = vocab * hidden
    body = params - head * (1 if cfg.get("tie_word_embeddings", True) else 2)  # an embedding lookup is no matmul
    shape = {"params": params, "body_params": body, "head_params": head, "vocab": vocab, "hidden": hidden}
    return shape | {"layers": cfg["num_hidden_layers"]}


def floor_seconds(tokens: dict, shape: dict, rate: float) -> dict:
    """Seconds per phase for the FLOPs that must be done (see the module docstring)."""
    forward = 2 * shape["body_params"] * tokens["needed"] + 2 * shape["head_params"] * tokens["scored"]
    flops = {"generate": forward, "reference": forward, "old": 0.0, "update": 3 * forward, "sync": 0.0}
    return {phase: flops[phase] / rate for phase in PHASES}


def cached_cases(path: Path, n: int, **knobs) -> list[dict]:
    if not path.is_file():
        path.write_text(json.dumps(drg_cases(n, **knobs)))
    return json.loads(path.read_text())


def contract_setup(workload: str, args, work: Path, steps: int):
    """(model folder, minigrpo prompts, TRL prompt texts, reward fn, YAML path, overrides) for short / long."""
    from examples.digits import reward_fn
    from minigrpo.model import load_tokenizer

    cases = cached_cases(work / "cases.json", 256, difficulty="medium")
    model_dir = Path(args.model) if args.model else build_model(work / f"model-{args.preset}", args.preset, cases)
    texts = make_prompt_texts(load_tokenizer(model_dir), cases, workload, P * steps)
    return model_dir, texts, texts, reward_fn, None, minigrpo_overrides(model_dir, work / "runs", steps)


def demo_setup(args, work: Path, steps: int):
    """The same for the DRG demo: its cases and model (as demo.py makes them), its GRPO section and reward."""
    import yaml

    from minigrpo.model import load_tokenizer
    from minigrpo.rl.prompts import Prompt
    from minigrpo.tiny import TinyPreset
    from recipes.drg.prompts import build_prompt_ids
    from recipes.drg.rewards import make_reward

    demo = yaml.safe_load((ROOT / "recipes/drg/configs/demo.yaml").read_text())
    setup, grpo = demo["demo"], dict(demo["grpo"])
    splits = [setup["sft_cases"], setup["grpo_cases"], setup["test_cases"]]
    knobs = {"seed": setup["seed"], "difficulty": setup["difficulty"], "principals": setup["principals"] or None}
    cases = cached_cases(work / "demo_cases.json", sum(splits), num_drgs=setup["num_drgs"] or None, **knobs)
    sft, train = cases[: splits[0]], cases[splits[0] : splits[0] + splits[1]]
    model_dir = (
        Path(args.model) if args.model else build_model(work / "model-drg-demo", TinyPreset(**demo["model"]), sft)
    )
    tokenizer = load_tokenizer(model_dir)
    prompts = [
        Prompt(f"case{i}", build_prompt_ids(tokenizer, case["problem"]), {"solution": case["solution"]})
        for i, case in enumerate(train)
    ]
    reward_fn = make_reward(grpo.pop("data")["reward"])
    yaml_path = work / "demo_grpo.yaml"
    yaml_path.write_text(yaml.safe_dump(grpo))
    run = [f"--run.steps={steps}", "--run.save_every=-1", "--run.log_every=1000"]
    return model_dir, prompts, None, reward_fn, str(yaml_path), [f"--model.path={model_dir}", *run]


def summarize(records: list[dict]) -> dict:
    """Medians over the timed steps: per clock (wall, cpu), seconds per phase and per step; tokens."""
    med = statistics.median
    out = {"tokens": {k: med([r["tokens"].get(k, 0) for r in records]) for k in records[0]["tokens"]}}
    for clock in ("wall", "cpu"):
        seconds = {phase: med([r[clock]["seconds"][phase] for r in records]) for phase in PHASES}
        other = med([r[clock]["step"] - sum(r[clock]["seconds"].values()) for r in records])
        out[clock] = {"seconds": seconds, "other": other, "step": med([r[clock]["step"] for r in records])}
    return out


def run_workload(workload: str, args, work: Path) -> dict:
    steps = args.warmup + args.steps
    if workload == "drg-demo":
        model_dir, prompts, texts, reward_fn, yaml_path, overrides = demo_setup(args, work, steps)
    else:
        model_dir, prompts, texts, reward_fn, yaml_path, overrides = contract_setup(workload, args, work, steps)
    shape = model_shape(model_dir)
    from benchmarks.grpo_step_trl import TRLVariant

    trl = None
    if texts is not None and args.trl_python:  # started first: its start-up is over before anything is timed
        spec = {"model": str(model_dir), "prompts": texts, "steps": steps, "threads": torch.get_num_threads()}
        contract = {"samples": G, "prompts_per_step": P, "new_tokens": NEW_TOKENS, "out": str(work / "trl")}
        trl = TRLVariant(args.trl_python, spec | contract, work)
    layouts = {"shared": "true", "unshared": "false"} if has_shared_prompt() else {"minigrpo": None}
    variants = []
    for name, shared in layouts.items():
        run_dir = work / "runs" / workload / name
        shutil.rmtree(run_dir, ignore_errors=True)  # the benchmark's scratch run (no checkpoints): a rerun starts over
        extra = [f"--run.output_dir={run_dir}"]
        extra += [] if shared is None else [f"--grpo.shared_prompt={shared}"]
        variants.append(MinigrpoVariant(name, prompts, reward_fn, overrides + extra, yaml_path))
    prompt_tokens = [len(p.ids) for p in variants[0].trainer.prompts[: P * steps]]
    variants += [trl] if trl else []
    records = {v.name: [] for v in variants}
    rates, loads = [], []
    try:
        for _ in range(args.warmup):
            for v in variants:
                v.step()
        for r in range(args.steps):
            rates.append(matmul_rate(shape["hidden"]))
            loads.append(os.getloadavg()[0])
            for v in variants[r % len(variants) :] + variants[: r % len(variants)]:  # rotate who goes first
                records[v.name].append(v.step())
                took = records[v.name][-1]
                print(
                    f"  {workload} round {r + 1}: {v.name} {took['wall']['step']:.1f} s ({took['cpu']['step']:.1f} s "
                    "CPU)",
                    flush=True,
                )
    finally:
        for v in variants:
            v.close()
    result = {name: summarize(rs) | {"per_step": rs} for name, rs in records.items()}
    needed = result[next(iter(layouts))]["tokens"]
    return {
        "workload": workload,
        "model": str(model_dir),
        "shape": shape,
        "prompt_tokens": prompt_tokens,
        "trl": trl.info if trl else None,
        "matmul_flops": rates,
        "load_average_1min": loads,
        "floor": {
            clock: floor_seconds(needed, shape, statistics.median(r[clock] for r in rates)) for clock in rates[0]
        },
        "variants": result,
    }


# ----------------------------------------------------------------------------- report


def table(rows: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = []
    for row in rows:
        cells = [row[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(row[1:], widths[1:])]
        lines.append("  " + "  ".join(cells))
    return "\n".join(lines)


def phase_seconds(summary: dict, phase: str) -> float:
    """Median seconds of a phase; `other` is the step's time outside the five phases (packing, logging)."""
    if phase == "step":
        return summary["step"]
    if phase == "other":
        return summary["other"]
    return summary["seconds"][phase]


TRL_TOKENS = {  # TRL's counts are read off its reference pass (its loss forward reads the same rows)
    "generate_fed": "generate_fed",
    "forward_fed": "reference_fed",
    "forward_positions": "reference_positions",
    "head_rows": "reference_head_rows",
    "forward_pairs": "reference_pairs",
}


def seconds_table(res: dict, clock: str) -> str:
    """Per phase: each trainer's median seconds on `clock`, the floor, ratios to the first trainer."""
    variants, floor = res["variants"], res["floor"][clock]
    names = list(variants)
    base, others = names[0], names[1:]
    rows = [[f"{clock} seconds (median)", *names, "floor", *[f"{n}/{base}" for n in others], f"{base}/floor"]]
    for phase in (*PHASES, "other", "step"):
        low = sum(floor.values()) if phase == "step" else floor.get(phase, 0.0)
        times = [phase_seconds(variants[n][clock], phase) for n in names]
        row = [phase, *[f"{t:.2f}" for t in times], f"{low:.2f}"]
        row += [f"x{t / times[0]:.2f}" if times[0] > 0.005 and t > 0.005 else "-" for t in times[1:]]
        rows.append([*row, f"x{times[0] / low:.1f}" if low > 0 else "-"])
    return table(rows)


def report(res: dict) -> str:
    variants, shape, rates = res["variants"], res["shape"], res["matmul_flops"]
    names, lengths, load = list(variants), res["prompt_tokens"], res["load_average_1min"]
    tokens = variants[names[0]]["tokens"]
    hidden = shape["hidden"]
    head = f"== {res['workload']}: {len(lengths)} prompts of {min(lengths)}-{max(lengths)} tokens (median "
    head += f"{statistics.median(lengths):.0f}), {tokens['completion_tokens']:.0f} completion tokens per step (median)"
    lines = [head, f"fp32 matmul [4096 x {hidden}] @ [{hidden} x {4 * hidden}], GFLOP/s (median of the rounds):"]
    for clock in ("wall", "cpu"):
        gflops = [r[clock] / 1e9 for r in rates]
        lines[-1] += f" per {clock} second {statistics.median(gflops):.1f} ({min(gflops):.1f}-{max(gflops):.1f});"
    lines.append(f"1-minute load average {min(load):.1f}-{max(load):.1f} on {os.cpu_count()} cores")
    if res["trl"]:
        same = "the same" if res["trl"]["prompt_tokens"][: len(lengths)] == lengths else "OTHER"
        lines.append(f"TRL {res['trl']['trl']}: the prompt texts tokenize to {same} lengths there")
    rows = [["tokens per step (median)", "needed", *names]]
    for label, key, needed in [
        ("generate: fed to the decoder", "generate_fed", tokens["needed"]),
        ("reference, update pass: fed", "forward_fed", tokens["needed"]),
        ("  positions with padding", "forward_positions", tokens["needed"]),
        ("LM-head rows per pass", "head_rows", tokens["scored"]),
        ("attention query-key pairs per pass", "forward_pairs", tokens.get("needed_pairs", 0)),
    ]:
        counts = [variants[n]["tokens"].get(TRL_TOKENS[key] if n == "TRL" else key, 0) for n in names]
        rows.append([label, f"{needed:,.0f}", *[f"{c:,.0f}" for c in counts]])
    lines += [table(rows), seconds_table(res, "wall"), seconds_table(res, "cpu")]
    return "\n".join(lines)


def reprint(paths: list[str]) -> None:
    """The report of earlier runs, the medians taken again from their per-step records."""
    for path in paths:
        saved = json.loads(Path(path).read_text())
        for run in saved.get("runs", [saved]):  # one run's file, or several runs gathered in one
            print(f"# {run['date']}, checkout {run['commit']}, {run['device']}\n# {' '.join(run['argv'])}")
            for res in run["results"]:
                res["variants"] = {name: summarize(v["per_step"]) for name, v in res["variants"].items()}
                print(report(res))


# ----------------------------------------------------------------------------- main


def commit() -> str:
    try:
        return subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workloads", default="short,long", help="comma-separated: short, long, drg-demo")
    ap.add_argument("--preset", default="small", choices=["tiny", "small", "base"], help="minigrpo.tiny preset")
    ap.add_argument("--model", help="an existing HF model folder instead of the random preset model")
    ap.add_argument("--steps", type=int, default=3, help="timed steps per trainer (interleaved)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps per trainer first")
    ap.add_argument("--trl-python", help="interpreter of a venv with trl (see the module docstring)")
    ap.add_argument("--work-dir", help="model, cases and run folders, kept and reused (default: a new temp dir)")
    ap.add_argument("--out", help="write the results as JSON here")
    ap.add_argument("--report", nargs="+", help="print the tables of these JSON results again, run nothing")
    args = ap.parse_args()
    if args.report:
        return reprint(args.report)
    from benchmarks._device import describe
    from minigrpo.dist import destroy_distributed

    work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="grpo_step."))
    work.mkdir(parents=True, exist_ok=True)
    device = describe("cpu")
    head = f"shared prompt {'on and off' if has_shared_prompt() else 'absent (per-completion rows)'}"
    print(f"device: {device}\ncheckout: {commit()} ({head}); work dir {work}")
    print(
        f"contract: {P} prompts x {G} samples x {NEW_TOKENS} new tokens, T 1, k3 KL beta 0.04, DAPO token-mean, "
        f"AdamW lr 1e-5, fp32, torch engine, micro-batch {G}; drg-demo: recipes/drg/configs/demo.yaml's grpo "
        f"section"
    )
    print(f"timing: median of {args.steps} steps per trainer after {args.warmup} warm-up, interleaved step by step")
    meta = {"date": time.strftime("%Y-%m-%d %H:%M"), "device": device, "commit": commit(), "argv": sys.argv}
    results = []
    try:
        for workload in args.workloads.split(","):
            results.append(run_workload(workload, args, work))
            shape = results[-1]["shape"]
            print(
                f"model: {results[-1]['model']}: {shape['params'] / 1e6:.1f}M params ({shape['layers']} layers, "
                f"hidden {shape['hidden']}, vocab {shape['vocab']}; body {shape['body_params'] / 1e6:.1f}M)"
            )
            print(report(results[-1]), flush=True)
            if args.out:  # after every workload: a run cut short keeps what it measured
                Path(args.out).write_text(json.dumps(meta | {"results": results}, indent=1))
    finally:
        destroy_distributed()


if __name__ == "__main__":
    main()
