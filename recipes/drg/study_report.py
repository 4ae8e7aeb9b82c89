"""The study's report (study.py): study.json, results.md and its plots, from the cells' records.

An arm pairs a "before" cell with an "after" cell on the same test cases: sft-N -> grpo-N, and for
the cold start base (the untrained model) -> grpo-cold. Each case's metric is averaged over the
seeds, then bootstrapped over cases (before, after, and the paired difference); each seed's own
means are kept beside, with the standard deviation of the seeds' differences.
"""

from __future__ import annotations

import os
import platform
import sys
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from minigrpo.config import to_dict
from minigrpo.io import atomic_write_text, write_json_atomic
from recipes.drg.evaluate_metrics import LEVELS, METRICS, bootstrap_mean, paired_bootstrap
from recipes.drg.plot import plot_arm_curves, plot_before_after, plot_scaling
from recipes.drg.rewards import FORMAT_FAIL

KEYS = [f"{level}/{metric}" for level in LEVELS for metric in METRICS]
LEVEL_TITLES = {"drg": "DRG", "base": "base DRG (principal diagnosis)", "severity": "CC/MCC status"}
PAPER_ROW = {"label": "Table 2, 75% SFT row, MIMIC-IV, Qwen2.5-7B", "sft": (46.5, 76.2, 52.8),
             "grpo": (53.5, 64.9, 54.6)}


def arm_cells(setup) -> list[tuple[str, int, str, str]]:
    """(label, SFT examples, before cell, after cell) per arm."""
    arms = [(f"SFT {n}", n, f"sft-{n}", f"grpo-{n}") for n in setup.sft_sizes]
    if setup.cold_start:
        arms.append(("cold start", 0, "base", "grpo-cold"))
    return arms


def _std(values: list[float]) -> float | None:
    return float(np.std(values, ddof=1)) if len(values) > 1 else None


def summarize_arm(label: str, size: int, before: str, after: str, by_cell: dict, setup) -> dict:
    seeds, level, resamples = setup.seeds, setup.level, setup.resamples
    arm: dict = {"label": label, "sft_examples": size, "before_cell": before, "after_cell": after,
                 "before": {}, "after": {}, "delta": {}, "seeds": {}}
    for key in KEYS:
        cases = {}
        for phase, cell in (("before", before), ("after", after)):
            per_seed = [by_cell[(s, cell)]["eval"]["per_case"][key] for s in seeds]
            cases[phase] = [sum(v) / len(v) for v in zip(*per_seed)]  # each case averaged over seeds
            arm[phase][key] = bootstrap_mean(cases[phase], level, resamples)
        arm["delta"][key] = paired_bootstrap(cases["before"], cases["after"], level, resamples)
        b = [by_cell[(s, before)]["eval"][key] for s in seeds]
        a = [by_cell[(s, after)]["eval"][key] for s in seeds]
        deltas = [y - x for x, y in zip(b, a)]
        arm["seeds"][key] = {"before": b, "after": a, "delta": deltas, "delta_std": _std(deltas)}
    for phase, cell in (("before", before), ("after", after)):
        arm[f"{phase}_format_rate"] = float(np.mean([by_cell[(s, cell)]["eval"]["format_rate"] for s in seeds]))
    return arm


def fit_log_line(points: list[tuple[int, float]]) -> dict | None:
    """Least squares value = intercept + slope * log10(examples), with R^2; None with < 2 distinct sizes."""
    xs = np.log10([p[0] for p in points])
    ys = np.asarray([p[1] for p in points], dtype=np.float64)
    if len(set(xs.tolist())) < 2:
        return None
    slope, intercept = np.polyfit(xs, ys, 1)
    total = float(((ys - ys.mean()) ** 2).sum())
    residual = float(((ys - (intercept + slope * xs)) ** 2).sum())
    r2 = 1 - residual / total if total > 0 else None
    return {"slope": float(slope), "intercept": float(intercept), "r2": r2, "points": len(points)}


def step_curves(history: list[list[dict]]) -> list[dict]:
    """Per-step means over seeds, with the format-failure rate (reward_format is 0 or FORMAT_FAIL per completion)."""
    rows = []
    for step, per_seed in enumerate(zip(*history), start=1):
        row = {"step": step}
        for key in ("reward_mean", "accuracy", "completion_len_mean", "reward_format"):
            values = [h[key] for h in per_seed if h.get(key) is not None]
            if values:
                row[key] = sum(values) / len(values)
        if "reward_format" in row:
            row["format_fail_frac"] = row["reward_format"] / FORMAT_FAIL
        rows.append(row)
    return rows


def machine() -> dict:
    import torch

    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "world_size": int(os.environ.get("WORLD_SIZE", "1")), "python": sys.version.split()[0]}


def _pct(stats: dict) -> str:
    return f"{100 * stats['mean']:.1f}"


def _delta(stats: dict) -> str:
    return f"{100 * stats['mean']:+.1f} [{100 * stats['low']:+.1f}, {100 * stats['high']:+.1f}]"


def results_markdown(study: dict, cfg) -> str:
    setup, k = cfg.study, cfg.eval.k
    names = ("Pass@1", f"Pass@{k}", f"Maj@{k}")
    when = (f"{study['date']}; {study['machine']['platform']}, {study['machine']['cpu_count']} CPUs, "
            f"{study['machine']['world_size']} rank(s), torch {study['machine']['torch']}.")
    command = (f"Command: `{' '.join(study['command'])}`. Wall time this run {study['wall_seconds'] / 60:.1f} min; "
               f"all cells {study['cell_seconds_total'] / 60:.1f} min.")
    data = (f"Data: SFT pool {max(setup.sft_sizes)} / GRPO {setup.grpo_cases} / test {setup.test_cases} synthetic "
            f"cases; seeds {setup.seeds}; SFT {setup.sft_epochs:g} epochs; GRPO {cfg.grpo.run.steps} steps "
            f"({cfg.grpo.data.reward} reward, lr {cfg.grpo.optim.lr:g}, beta {cfg.grpo.loss.beta:g}); eval k={k}, "
            f"T={cfg.eval.temperature}, top-p={cfg.eval.top_p}.")
    legend = (f"Percent. Δ = after - before GRPO, [{round(100 * setup.level)}% paired bootstrap interval over test "
              "cases, each case averaged over seeds]. The cold-start arm's \"SFT\" is the untrained model.")
    lines = ["# DRG study: the paper's findings in miniature", "", when, command, "", data, legend]
    for level in LEVELS:
        head = ["arm", "SFT examples", *(f"SFT {n}" for n in names), *(f"GRPO {n}" for n in names),
                *(f"Δ {n}" for n in names)]
        lines += ["", f"## {LEVEL_TITLES[level]}", "", "| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
        for arm in study["arms"]:
            keys = [f"{level}/{m}" for m in METRICS]
            cells = [arm["label"], str(arm["sft_examples"]), *(_pct(arm["before"][x]) for x in keys),
                     *(_pct(arm["after"][x]) for x in keys), *(_delta(arm["delta"][x]) for x in keys)]
            lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "## Seed spread (DRG Pass@1)", "", "| arm | SFT per seed | GRPO per seed | Δ per seed | Δ std |",
              "|---|---|---|---|---|"]
    for arm in study["arms"]:
        spread = arm["seeds"]["drg/pass@1"]
        std = "-" if spread["delta_std"] is None else f"{100 * spread['delta_std']:.1f}"
        lines.append(f"| {arm['label']} | " + " | ".join(" / ".join(f"{100 * v:.1f}" for v in spread[p])
                                                        for p in ("before", "after", "delta")) + f" | {std} |")
    lines += ["", "## Pass@1 against log10(#SFT examples), least squares", ""]
    for name, fit in study["scaling"]["fits"].items():
        if fit:
            r2 = "n/a" if fit["r2"] is None else f"{fit['r2']:.2f}"
            lines.append(f"- {name}: DRG Pass@1 = {fit['intercept']:.1f} + {fit['slope']:.1f} x log10(n), "
                         f"R^2 {r2} ({fit['points']} points)")
        else:
            lines.append(f"- {name}: fewer than two SFT sizes, no fit")
    lines += ["", "## Format and length per arm (GRPO, mean over seeds)", "",
              ("| arm | format ok before | format ok after | GRPO steps | format failures first -> last step | "
               "completion tokens first -> last step |"), "|---|---|---|---|---|---|"]
    for arm in study["arms"]:
        rows = study["curves"][arm["label"]]
        fail = [r.get("format_fail_frac") for r in rows]
        length = [r.get("completion_len_mean") for r in rows]
        first_last = (f"{100 * fail[0]:.0f}% -> {100 * fail[-1]:.0f}%" if rows and fail[0] is not None else "-",
                      f"{length[0]:.0f} -> {length[-1]:.0f}" if rows and length[0] is not None else "-")
        lines.append(f"| {arm['label']} | {100 * arm['before_format_rate']:.1f} | {100 * arm['after_format_rate']:.1f}"
                     f" | {len(rows)} | {first_last[0]} | {first_last[1]} |")
    paper = PAPER_ROW
    paper_line = (f"The paper ({paper['label']}): DRG Pass@1 / Pass@8 / Maj@8 SFT "
                  f"{' / '.join(map(str, paper['sft']))} -> GRPO {' / '.join(map(str, paper['grpo']))}.")
    lines += ["", paper_line, "",
              "Plots: scaling.png, before_after.png, grpo_curves.png. Every number: study.json; every cell: cells/."]
    return "\n".join(lines) + "\n"


def write_report(root: Path, cfg, records: list[dict], wall_seconds: float, command: list[str]) -> dict:
    """study.json, results.md and the plots in `root`; returns the study summary."""
    setup = cfg.study
    by_cell = {(r["seed"], r["cell"]): r for r in records}
    arms = [summarize_arm(label, n, before, after, by_cell, setup) for label, n, before, after in arm_cells(setup)]
    sized = [arm for arm in arms if arm["sft_examples"] > 0]
    points = {
        "SFT": [(arm["sft_examples"], 100 * v) for arm in sized for v in arm["seeds"]["drg/pass@1"]["before"]],
        "SFT+GRPO": [(arm["sft_examples"], 100 * v) for arm in sized for v in arm["seeds"]["drg/pass@1"]["after"]],
    }
    curves = {arm["label"]: step_curves([by_cell[(s, arm["after_cell"])]["history"] for s in setup.seeds])
              for arm in arms}
    study = {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"), "machine": machine(),
        "command": list(command), "wall_seconds": wall_seconds,
        "cell_seconds_total": round(sum(r.get("seconds", 0.0) for r in records), 1),
        "cells": [{k: v for k, v in r.items() if k not in ("history", "eval")}
                  | {"eval": {k: v for k, v in r["eval"].items() if k != "per_case"}} for r in records],
        "arms": arms, "scaling": {"points": points, "fits": {name: fit_log_line(p) for name, p in points.items()}},
        "curves": curves, "paper": PAPER_ROW, "config": to_dict(cfg),
    }
    write_json_atomic(root / "study.json", study)
    atomic_write_text(root / "results.md", results_markdown(study, cfg))
    k = cfg.eval.k
    try:
        plot_scaling(points, study["scaling"]["fits"], root / "scaling.png")
        plot_before_after(arms, [("drg/pass@1", "DRG Pass@1"), ("drg/pass@k", f"DRG Pass@{k}"),
                                 ("drg/maj@k", f"DRG Maj@{k}")], root / "before_after.png")
        plot_arm_curves(curves, root / "grpo_curves.png")
    except ImportError:
        print("study: matplotlib is not installed; skipping the plots (pip install matplotlib)", file=sys.stderr)
    print(f"study: wrote {root}/results.md, study.json and plots", flush=True)
    return study
