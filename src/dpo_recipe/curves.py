"""Curves of one run, drawn from its metrics.jsonl as PNGs in the run directory: what training leaves to look at."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: runs write PNGs, nobody opens a window
import matplotlib.pyplot as plt  # noqa: E402

from .rundir import read_metrics  # noqa: E402

# Each run plot: title, the training metric drawn per logged step, and the validation metrics drawn per evaluation.
RUN_PLOTS = {
    "loss.png": ("DPO loss", ("loss", "train loss"), [("loss", "val loss")]),
    "rewards.png": (
        "Implicit rewards  β·(log πθ − log πref)",
        ("margin", "train margin"),
        [("chosen_reward", "val chosen"), ("rejected_reward", "val rejected"), ("margin", "val margin")],
    ),
    "accuracy.png": ("Preference accuracy (chosen reward > rejected)", ("accuracy", "train"), [("accuracy", "val")]),
}
SMOOTHING = 0.6  # exponential moving average weight, TensorBoard's default: the trend without hiding the noise


def smoothed(values: list[float], weight: float = SMOOTHING) -> list[float]:
    out, last = [], None
    for value in values:
        last = value if last is None else weight * last + (1 - weight) * value
        out.append(last)
    return out


def training_curve(run_dir: Path, metric: str) -> tuple[list[float], list[float]]:
    """(epochs, values) of a training metric per logged step; per epoch for runs that logged no steps."""
    steps = read_metrics(run_dir, "step")
    if steps:
        return [r["epoch"] for r in steps], [r["train"].get(metric, float("nan")) for r in steps]
    records = read_metrics(run_dir)
    return [r["epoch"] for r in records], [r["train"].get(metric, float("nan")) for r in records]


def validation_curve(run_dir: Path, metric: str) -> tuple[list[float], list[float]]:
    """(epochs, values) of a validation metric at every evaluation: epoch ends and any `training.eval_steps`."""
    records = sorted(read_metrics(run_dir) + read_metrics(run_dir, "eval"), key=lambda r: r["step"])
    return [r["epoch"] for r in records], [r["val"].get(metric, float("nan")) for r in records]


def plot_run(run_dir: Path) -> list[Path]:
    """Curves of one run, as PNGs in the run directory: training per logged step (faint raw, smoothed line over it),
    validation at each evaluation (markers), against the epoch."""
    if not read_metrics(run_dir):
        return []
    written = []
    for filename, (title, (train_metric, train_label), val_series) in RUN_PLOTS.items():
        figure, axes = plt.subplots(figsize=(6.5, 4))
        x, y = training_curve(run_dir, train_metric)
        (line,) = axes.plot(x, smoothed(y), label=f"{train_label} (smoothed)", linewidth=1.5)
        axes.plot(x, y, color=line.get_color(), alpha=0.25, linewidth=1)
        for metric, label in val_series:
            axes.plot(*validation_curve(run_dir, metric), marker="o", label=label)
        axes.set_title(f"{Path(run_dir).name}: {title}")
        axes.set_xlabel("epoch")
        axes.grid(alpha=0.3)
        axes.legend(fontsize="small")
        figure.tight_layout()
        path = Path(run_dir) / filename
        figure.savefig(path, dpi=110)
        plt.close(figure)
        written.append(path)
    return written
