"""Curves of one run, drawn from its metrics.jsonl and best.json as PNGs in the run directory: what training leaves
to look at. They are drawn again at every epoch end and when a run stops early (Ctrl-C), so a run directory always
shows what the run has done so far."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: runs write PNGs, nobody opens a window
import matplotlib.pyplot as plt  # noqa: E402

from .rundir import best_label, best_record, read_metrics  # noqa: E402

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


def steps_per_epoch(run_dir: Path) -> float | None:
    """Optimizer steps per epoch, read back from metrics.jsonl; None when the records cannot tell.

    `step` and `eval` records carry transformers' fractional epoch (step / steps per epoch). An `epoch` record names
    the epoch it belongs to, so a partial last epoch (`training.max_steps`) reads as whole: only a first epoch
    followed by another one is known to be complete.
    """
    fractional = [r for r in read_metrics(run_dir, "step") + read_metrics(run_dir, "eval") if r["epoch"] > 0]
    if fractional:
        latest = max(fractional, key=lambda r: r["step"])
        return latest["step"] / latest["epoch"]
    epochs = read_metrics(run_dir)
    return epochs[0]["step"] / epochs[0]["epoch"] if len(epochs) > 1 else None


def _position(record: dict, per_epoch: float | None) -> float:
    """Where on the epoch axis a record was taken: the step it was taken at, in epochs."""
    if record.get("kind", "epoch") != "epoch" or per_epoch is None:
        return record["epoch"]
    return record["step"] / per_epoch


def training_curve(run_dir: Path, metric: str) -> tuple[list[float], list[float]]:
    """(epochs, values) of a training metric per logged step; per epoch for runs that logged no steps."""
    per_epoch = steps_per_epoch(run_dir)
    records = read_metrics(run_dir, "step") or read_metrics(run_dir)
    return [_position(r, per_epoch) for r in records], [r["train"].get(metric, float("nan")) for r in records]


def validation_curve(run_dir: Path, metric: str) -> tuple[list[float], list[float]]:
    """(epochs, values) of a validation metric at every evaluation (epoch ends and any `training.eval_steps`), each at
    the step it was taken."""
    per_epoch = steps_per_epoch(run_dir)
    records = sorted(read_metrics(run_dir) + read_metrics(run_dir, "eval"), key=lambda r: r["step"])
    return [_position(r, per_epoch) for r in records], [r["val"].get(metric, float("nan")) for r in records]


def best_point(run_dir: Path) -> tuple[dict, float, dict] | None:
    """(best.json, its position on the epoch axis, its epoch's validation metrics), or None before there is a best."""
    found = best_record(run_dir)  # an epoch's record, or a step checkpoint's validation
    if found is None:
        return None
    best, record = found
    return best, _position(record, steps_per_epoch(run_dir)), record.get("val", {})


def plot_run(run_dir: Path) -> list[Path]:
    """Curves of one run, as PNGs in the run directory: training per logged step (faint raw, smoothed line over it),
    validation at each evaluation (markers), against the epoch; the best epoch marked on each."""
    if not read_metrics(run_dir):
        return []
    best = best_point(run_dir)
    written = []
    for filename, (title, (train_metric, train_label), val_series) in RUN_PLOTS.items():
        figure, axes = plt.subplots(figsize=(6.5, 4))
        x, y = training_curve(run_dir, train_metric)
        (line,) = axes.plot(x, smoothed(y), label=f"{train_label} (smoothed)", linewidth=1.5)
        axes.plot(x, y, color=line.get_color(), alpha=0.25, linewidth=1)
        for metric, label in val_series:
            (val_line,) = axes.plot(*validation_curve(run_dir, metric), marker="o", label=label)
            if best is not None and metric in best[2]:
                axes.plot([best[1]], [best[2][metric]], marker="*", markersize=15, color=val_line.get_color(),
                          markeredgecolor="black", linestyle="none")  # fmt: skip
        if best is not None:
            info, at, _ = best
            axes.axvline(at, color="grey", linestyle="--", linewidth=1,
                         label=f"best: {best_label(info)} ({info['metric'].replace('_', ' ')})")  # fmt: skip
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
