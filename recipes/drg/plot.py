"""Plot a GRPO run's reward, accuracy and completion length over steps (matplotlib, Agg backend).

    python recipes/drg/plot.py outputs/drg-demo/grpo/metrics.jsonl outputs/drg-demo/grpo_curves.png
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

PANELS = (("reward_mean", "mean reward"), ("accuracy", "accuracy (exact DRG)"), ("completion_len_mean", "completion tokens"))


def read_metrics(path: str | Path) -> list[dict]:
    rows = [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    if not rows:
        raise ValueError(f"{path}: no metrics rows")
    return rows


def moving_average(values: list[float], window: int) -> list[float]:
    out = []
    for i in range(len(values)):
        part = values[max(0, i - window + 1) : i + 1]
        out.append(sum(part) / len(part))
    return out


def plot_metrics(rows: list[dict], out: str | Path, title: str = "GRPO", window: int = 5) -> Path:
    """One panel per metric of PANELS present in `rows`: raw values and a trailing moving average."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(k, label) for k, label in PANELS if any(k in r for r in rows)]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4), squeeze=False)
    for ax, (key, label) in zip(axes[0], panels):
        pts = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
        steps, values = [p[0] for p in pts], [p[1] for p in pts]
        ax.plot(steps, values, "o-", alpha=0.35, markersize=3, label="per step")
        ax.plot(steps, moving_average(values, window), "-", linewidth=2, label=f"mean of last {window}")
        ax.set_xlabel("GRPO step")
        ax.set_title(label)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(out)
    return out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2:
        print(__doc__.strip().splitlines()[-1], file=sys.stderr)
        return 2
    try:
        print(plot_metrics(read_metrics(argv[0]), argv[1], title=Path(argv[0]).parent.name))
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
