"""Plot a GRPO run's reward, accuracy and completion length over steps (matplotlib, Agg backend).

The study's figures (study.py) are here too: `plot_scaling` (Pass@1 against log #SFT examples with
the least-squares line), `plot_before_after` (Pass@1 / Pass@k / Maj@k per arm) and `plot_arm_curves`
(per-step curves, one line per arm).

    python recipes/drg/plot.py --plot.metrics=outputs/drg-demo/grpo/metrics.jsonl [--plot.out=curves.png]
    python recipes/drg/plot.py --help      # every config key with its default
"""

from __future__ import annotations

import io
import math
import sys
from dataclasses import dataclass
from pathlib import Path

if __name__ == "__main__" and __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # `python recipes/drg/plot.py` from anywhere

from minigrpo.cli import run_command
from minigrpo.config import check, load_config, section, split_cli
from minigrpo.help import print_help, wants_help
from minigrpo.io import DataError, atomic_write_bytes, read_jsonl

PANELS = (
    ("reward_mean", "mean reward"),
    ("accuracy", "accuracy (exact DRG)"),
    ("completion_len_mean", "completion tokens"),
)
ARM_PANELS = (
    ("reward_mean", "mean reward"),
    ("format_fail_frac", "format-failure rate"),
    ("accuracy", "accuracy (exact DRG)"),
    ("completion_len_mean", "completion tokens"),
)


@dataclass(slots=True)
class PlotSettings:
    metrics: str = ""  # a GRPO run's metrics.jsonl
    out: str = ""  # the PNG; "" = grpo_curves.png beside the metrics file
    title: str = ""  # "" = the run folder's name
    window: int = 5  # steps in the moving average

    def __post_init__(self) -> None:
        check(self.window >= 1, "plot.window", "must be >= 1")


@dataclass(slots=True)
class PlotConfig:
    plot: PlotSettings = section(PlotSettings)


def read_metrics(path: str | Path) -> list[dict]:
    rows = read_jsonl(path)
    if not rows:
        raise DataError(f"{path}: no metrics rows")
    return rows


def moving_average(values: list[float], window: int) -> list[float]:
    out = []
    for i in range(len(values)):
        part = values[max(0, i - window + 1) : i + 1]
        out.append(sum(part) / len(part))
    return out


def _pyplot():
    import matplotlib  # optional (the drg extra): the demo skips its plot without it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(plt, fig, out: str | Path) -> Path:
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=110)
    plt.close(fig)
    return atomic_write_bytes(out, png.getvalue())


def plot_metrics(rows: list[dict], out: str | Path, title: str = "GRPO", window: int = 5) -> Path:
    """One panel per metric of PANELS present in `rows`: raw values and a trailing moving average."""
    plt = _pyplot()
    panels = [(k, label) for k, label in PANELS if any(k in r for r in rows)]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4), squeeze=False)
    for ax, (key, label) in zip(axes[0], panels):
        points = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
        steps, values = [p[0] for p in points], [p[1] for p in points]
        ax.plot(steps, values, "o-", alpha=0.35, markersize=3, label="per step")
        ax.plot(steps, moving_average(values, window), "-", linewidth=2, label=f"mean of last {window}")
        ax.set_xlabel("GRPO step")
        ax.set_title(label)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    return _save(plt, fig, out)


def run(cfg: PlotConfig) -> Path:
    settings = cfg.plot
    check(bool(settings.metrics), "plot.metrics", "is required (a GRPO run's metrics.jsonl)")
    metrics = Path(settings.metrics)
    out = Path(settings.out or metrics.with_name("grpo_curves.png"))
    title = settings.title or metrics.resolve().parent.name
    path = plot_metrics(read_metrics(metrics), out, title=title, window=settings.window)
    print(path)
    return path


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if wants_help(argv):
        return print_help(__doc__, PlotConfig)
    return run_command(lambda: run(load_config(PlotConfig, *split_cli(argv))))


if __name__ == "__main__":
    sys.exit(main())


def plot_scaling(points: dict[str, list[tuple[int, float]]], fits: dict[str, dict], out: str | Path,
                 title: str = "") -> Path:
    """Pass@1 (percent) against #SFT examples on a log axis: the points and each series' least-squares line.

    `points[name]` = [(examples, value)], `fits[name]` = {"slope", "intercept", "r2"} of value on log10(examples).
    """
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.6, 4.0))
    for name, series in points.items():
        xs, ys = [p[0] for p in series], [p[1] for p in series]
        (dots,) = ax.plot(xs, ys, "o", alpha=0.6)
        fit = fits.get(name)
        label = name
        if fit:
            grid = sorted(set(xs))
            ax.plot(grid, [fit["intercept"] + fit["slope"] * math.log10(x) for x in grid], "-", color=dots.get_color())
            r2 = "n/a" if fit["r2"] is None else f"{fit['r2']:.2f}"
            label = f"{name}: {fit['slope']:+.1f} pts per 10x, R^2 {r2}"
        dots.set_label(label)
    ax.set_xscale("log")
    ax.set_xlabel("SFT examples (log scale)")
    ax.set_ylabel("DRG Pass@1 (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title or "DRG Pass@1 vs log(#SFT examples)")
    fig.tight_layout()
    return _save(plt, fig, out)


def plot_before_after(arms: list[dict], metrics: list[tuple[str, str]], out: str | Path, title: str = "") -> Path:
    """One panel per (key, label) of `metrics`: before / after bars per arm with their intervals.

    arms[i] = {"label", "before": {key: {"mean", "low", "high"}}, "after": {...}} (fractions; drawn as percent).
    """
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.4 * len(metrics), 3.8), squeeze=False)
    xs = list(range(len(arms)))
    for ax, (key, label) in zip(axes[0], metrics):
        for offset, phase, name in ((-0.2, "before", "before GRPO"), (0.2, "after", "after GRPO")):
            stats = [arm[phase][key] for arm in arms]
            means = [100 * s["mean"] for s in stats]
            errors = [[100 * (s["mean"] - s["low"]) for s in stats], [100 * (s["high"] - s["mean"]) for s in stats]]
            ax.bar([x + offset for x in xs], means, 0.4, yerr=errors, capsize=3, label=name)
        ax.set_xticks(xs, [arm["label"] for arm in arms], rotation=30, ha="right", fontsize=8)
        ax.set_title(label)
        ax.set_ylabel("percent")
        ax.grid(alpha=0.3, axis="y")
    axes[0][0].legend(fontsize=8)
    fig.suptitle(title or "before and after GRPO (95% bootstrap intervals over test cases)")
    fig.tight_layout()
    return _save(plt, fig, out)


def plot_arm_curves(curves: dict[str, list[dict]], out: str | Path, title: str = "", window: int = 5) -> Path:
    """Per-step GRPO curves, one line (trailing moving average) per arm, one panel per ARM_PANELS metric."""
    plt = _pyplot()
    panels = [(k, label) for k, label in ARM_PANELS if any(k in r for rows in curves.values() for r in rows)]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4), squeeze=False)
    for ax, (key, label) in zip(axes[0], panels):
        for name, rows in curves.items():
            points = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
            if points:
                ax.plot([p[0] for p in points], moving_average([p[1] for p in points], window), "-", label=name)
        ax.set_xlabel("GRPO step")
        ax.set_title(label)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(title or f"GRPO per step, every arm (mean of last {window} steps)")
    fig.tight_layout()
    return _save(plt, fig, out)
