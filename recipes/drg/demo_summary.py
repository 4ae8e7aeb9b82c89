"""The demo's bookkeeping: phase banners with timings, and the summary (summary.json, summary.md, plot)."""

from __future__ import annotations

import sys
import time
from dataclasses import asdict
from pathlib import Path

from minigrpo.io import atomic_write_text, write_json_atomic

from recipes.drg.evaluate import LEVEL_NAMES, format_table
from recipes.drg.evaluate_metrics import paired_bootstrap
from recipes.drg.plot import plot_metrics


class Banner:
    """`banner(i, name)` prints a phase's banner (rank 0) and times the phase it ends."""

    def __init__(self, total: int, enabled: bool):
        self.total, self.enabled, self.t0, self.times, self.current = total, enabled, time.perf_counter(), {}, None
        self.last, self.cpu0 = self.t0, time.process_time()

    def __call__(self, index: int, name: str) -> None:
        now = time.perf_counter()
        if self.current:
            self.times[self.current] = round(now - self.last, 1)
        self.current, self.last = name, now
        if self.enabled:
            print(f"\n{'=' * 20} [{index}/{self.total}] {name}  (t+{now - self.t0:.0f}s) {'=' * 20}", flush=True)

    def finish(self) -> dict:
        now = time.perf_counter()
        if self.current:
            self.times[self.current] = round(now - self.last, 1)
        self.times["total"] = round(now - self.t0, 1)
        # CPU seconds of this process: close to the wall time on an otherwise idle machine (one thread per rank)
        self.times["cpu_rank0"] = round(time.process_time() - self.cpu0, 1)
        return self.times


def reward_trend(history: list[dict], key: str, window: int = 5) -> tuple[float, float]:
    """Mean of `key` over the first and the last `window` GRPO steps."""
    values = [h[key] for h in history if h.get(key) is not None]
    w = max(1, min(window, len(values) // 2 or 1))
    return sum(values[:w]) / w, sum(values[-w:]) / w


def history_rows(history: list[dict]) -> list[dict]:
    return [{"step": i + 1, **h} for i, h in enumerate(history)]


def grpo_gains(evals: dict, keys=("drg/pass@1", "drg/maj@k", "drg/pass@k", "base/pass@1", "severity/pass@1")) -> dict:
    """SFT -> SFT+GRPO per metric: the paired 95% bootstrap interval of the difference over the test cases."""
    before, after = evals["SFT"]["per_case"], evals["SFT+GRPO"]["per_case"]
    return {key: paired_bootstrap(before[key], after[key]) for key in keys}


def gain_line(gains: dict, k: int) -> str:
    parts = []
    for key, d in gains.items():
        level, metric = key.split("/")
        name = metric.replace("@k", f"@{k}").replace("pass", "Pass").replace("maj", "Maj")
        parts.append(
            f"{LEVEL_NAMES[level]} {name} {100 * d['mean']:+.1f} [{100 * d['low']:+.1f}, {100 * d['high']:+.1f}]"
        )
    drg = gains["drg/pass@1"]
    half = 100 * (drg["high"] - drg["low"]) / 2
    verdict = "exceeds" if abs(100 * drg["mean"]) > half else "does not exceed"
    return (
        f"GRPO gain, SFT -> SFT+GRPO (points; paired 95% bootstrap interval over the {drg['n']} test cases): "
        + "; ".join(parts)
        + f". The DRG Pass@1 gain {verdict} the interval's half-width ({half:.1f})."
    )


def summary_markdown(cfg, evals: dict, grpo: dict, times: dict, data_info: dict, plot: Path | None) -> str:
    steps, w = grpo["steps"], max(1, min(5, grpo["steps"] // 2 or 1))
    cases = f"{data_info['sft_cases']} SFT / {data_info['grpo_cases']} GRPO / {data_info['test_cases']} test cases"
    lines = [
        "# DRG demo summary",
        "",
        f"{data_info['num_drgs']} DRGs; {cases}; eval k={cfg.eval.k}, T={cfg.eval.temperature}, "
        f"top-p={cfg.eval.top_p}. Percent.",
        "",
        format_table(evals, cfg.eval.k),
        "",
        gain_line(grpo["gains"], cfg.eval.k),
        "",
        f"GRPO {steps} steps: mean reward {grpo['reward_first']:.3f} (first {w} steps) -> "
        f"{grpo['reward_last']:.3f} (last {w}); "
        f"training accuracy {grpo['accuracy_first']:.3f} -> {grpo['accuracy_last']:.3f}.",
        "",
        "Seconds per phase: " + ", ".join(f"{k} {v}" for k, v in times.items()),
        "",
        f"Plot: {plot.name if plot else '(matplotlib missing)'}; step metrics: grpo/metrics.jsonl, sft/metrics.jsonl.",
    ]
    return "\n".join(lines) + "\n"


def write_summary(out: Path, cfg, evals: dict, history: list[dict], times: dict, data_info: dict) -> dict:
    """summary.json, grpo_curves.png and summary.md in `out` (rank 0); prints the markdown. `cfg`: a DemoConfig."""
    first_reward, last_reward = reward_trend(history, "reward_mean")
    first_accuracy, last_accuracy = reward_trend(history, "accuracy")
    grpo = {
        "steps": len(history),
        "reward_first": first_reward,
        "reward_last": last_reward,
        "accuracy_first": first_accuracy,
        "accuracy_last": last_accuracy,
        "reward_mean_per_step": [h["reward_mean"] for h in history],
        "accuracy_per_step": [h.get("accuracy") for h in history],
        "gains": grpo_gains(evals),
    }
    summary = {"eval": evals, "grpo": grpo, "data": data_info, "seconds": times, "config": asdict(cfg)}
    write_json_atomic(out / "summary.json", summary)
    plot = None
    title = f"DRG demo GRPO ({data_info['num_drgs']} DRGs, reward {cfg.grpo.data.reward})"
    try:
        plot = plot_metrics(history_rows(history), out / "grpo_curves.png", title=title)
    except ImportError:
        print("demo: matplotlib is not installed; skipping the plot (pip install matplotlib)", file=sys.stderr)
    text = summary_markdown(cfg, evals, grpo, times, data_info, plot)
    atomic_write_text(out / "summary.md", text)
    print(text, flush=True)
    print(f"demo: wrote {out}/summary.md, summary.json" + (", grpo_curves.png" if plot else ""), flush=True)
    return summary
