"""Plot a GRPO run's reward, accuracy and completion length over steps (matplotlib, Agg backend).

    python recipes/drg/plot.py --plot.metrics=outputs/drg-demo/grpo/metrics.jsonl [--plot.out=curves.png]
    python recipes/drg/plot.py --help      # every config key with its default
"""

from __future__ import annotations

import io
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


def plot_metrics(rows: list[dict], out: str | Path, title: str = "GRPO", window: int = 5) -> Path:
    """One panel per metric of PANELS present in `rows`: raw values and a trailing moving average."""
    import matplotlib  # optional (the drg extra): the demo skips its plot without it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=110)
    plt.close(fig)
    return atomic_write_bytes(out, png.getvalue())


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
