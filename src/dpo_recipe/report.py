"""Plots and reports, drawn from the files a run leaves (metrics.jsonl, eval JSON), never from live objects."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: runs write PNGs, nobody opens a window
import matplotlib.pyplot as plt  # noqa: E402

from .trainer import read_metrics  # noqa: E402

RUN_PLOTS = {
    "loss.png": ("DPO loss", [("loss", "train", "train loss"), ("loss", "val", "val loss")]),
    "rewards.png": (
        "Implicit rewards  β·(log πθ − log πref)",
        [
            ("chosen_reward", "val", "val chosen"),
            ("rejected_reward", "val", "val rejected"),
            ("margin", "val", "val margin"),
            ("margin", "train", "train margin"),
        ],
    ),
    "accuracy.png": ("Preference accuracy (chosen reward > rejected)", [("accuracy", "train", "train"), ("accuracy", "val", "val")]),
}


def plot_run(run_dir: Path) -> list[Path]:
    """Per-epoch curves of one run: loss, rewards and accuracy, as PNGs in the run directory."""
    records = read_metrics(run_dir)
    if not records:
        return []
    epochs = [r["epoch"] for r in records]
    written = []
    for filename, (title, series) in RUN_PLOTS.items():
        figure, axes = plt.subplots(figsize=(6, 4))
        for metric, split, label in series:
            values = [r[split].get(metric, float("nan")) for r in records]
            axes.plot(epochs, values, marker="o", label=label, linestyle="--" if split == "train" else "-")
        axes.set_title(f"{Path(run_dir).name}: {title}")
        axes.set_xlabel("epoch")
        axes.set_xticks(epochs)
        axes.grid(alpha=0.3)
        axes.legend()
        figure.tight_layout()
        path = Path(run_dir) / filename
        figure.savefig(path, dpi=110)
        plt.close(figure)
        written.append(path)
    return written
