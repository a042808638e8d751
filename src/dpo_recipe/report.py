"""Plots and reports, drawn from the files a run leaves (metrics.jsonl, eval JSON), never from live objects."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # headless: runs write PNGs, nobody opens a window
import matplotlib.pyplot as plt  # noqa: E402

from .config import ConfigError, RecipeConfig, describe_model  # noqa: E402
from .evaluate import markdown_table  # noqa: E402
from .rundir import (  # noqa: E402
    TEST_DATASET, best_label, best_record, eval_file_name, find_runs, load_run_config, read_metrics,
)

# ---------------------------------------------------------------------------------------------------------------
# Sweep report: several runs side by side, from their metrics.jsonl, best.json and eval JSON.

# Each report's figures are named after it (reports/mine.md -> reports/mine_val_loss.png), so reports that share a
# folder never overwrite each other's.
SWEEP_PLOTS = {
    "val_loss": ("loss", "Validation DPO loss per epoch", "val loss"),
    "val_margin": ("margin", "Validation reward margin per epoch", "val margin  (chosen − rejected reward)"),
}
SWEEP_TEST_PLOT = "test"


def figure_path(report: Path, name: str) -> Path:
    return report.with_name(f"{report.stem}_{name}.png")


@dataclass
class RunSummary:
    """What the sweep report shows of one run, read back from the files training and evaluation left."""

    name: str
    run_dir: Path
    config: RecipeConfig
    records: list[dict]
    best: dict | None
    # The metrics.jsonl record best.json was chosen from: an epoch's, or a validated step checkpoint's.
    best_record: dict | None
    test: dict | None
    pairs: dict[str, int]

    @property
    def label(self) -> str:
        return f"{self.name} (β={self.config.loss.beta:g}, lr={self.config.training.learning_rate:g})"

    @property
    def epochs(self) -> list[int]:
        return [r["epoch"] for r in self.records]

    def val(self, metric: str) -> list[float]:
        return [r["val"].get(metric, float("nan")) for r in self.records]


def overfitting_onset(epochs: list[int], val_losses: list[float]) -> int | None:
    """The first epoch k after which val loss rose (val_loss[k+1] > val_loss[k]); None if it never rose."""
    for k in range(len(val_losses) - 1):
        if val_losses[k + 1] > val_losses[k]:
            return epochs[k]
    return None


def summarize_run(run_dir: Path, dataset: str = TEST_DATASET) -> RunSummary:
    run_dir = Path(run_dir)
    config = load_run_config(run_dir)
    best, record = best_record(run_dir) or (None, None)
    test_file = run_dir / best["checkpoint"] / eval_file_name(dataset) if best else None
    test = json.loads(test_file.read_text()) if test_file is not None and test_file.is_file() else None
    data_report = run_dir / "data_report.json"
    pairs = json.loads(data_report.read_text()).get("pairs", {}) if data_report.is_file() else {}
    return RunSummary(run_dir.name, run_dir, config, read_metrics(run_dir), best, record, test, pairs)


def _model_description(config: RecipeConfig) -> str:
    model = config.model
    text = describe_model(model)
    if model.tokenizer:
        text += f"; tokenizer {model.tokenizer}" + (f" ({model.tokenizer_vocab_size} tokens)" if model.tokenizer == "local-bpe" else "")
    if model.lora is not None:
        text += f"; LoRA r={model.lora.r}"
    return text


def _format(value: float | None, digits: int = 3) -> str:
    return "—" if value is None or value != value else f"{value:.{digits}f}"


def _with_ci(result: dict | None, metric: str, digits: int = 3) -> str:
    if result is None:
        return "not evaluated"
    low, high = result[f"{metric}_ci95"]
    return f"{result[metric]:.{digits}f} [{low:.{digits}f}, {high:.{digits}f}]"


def sweep_table(runs: list[RunSummary]) -> str:
    headers = ["run", "β", "lr", "epochs run", "best epoch", "val loss", "val acc", "val margin",
               "test loss", "test acc [95% CI]", "test ties", "test margin [95% CI]", "overfitting onset"]  # fmt: skip
    rows = []
    for run in runs:
        val = run.best_record["val"] if run.best_record else {}
        onset = overfitting_onset(run.epochs, run.val("loss"))
        rows.append(
            [
                run.name,
                f"{run.config.loss.beta:g}",
                f"{run.config.training.learning_rate:g}",
                f"{len(run.records)}/{run.config.training.num_epochs}",
                f"{best_label(run.best).removeprefix('epoch ')} ({run.best['metric'].replace('_', ' ')})" if run.best else "—",
                _format(val.get("loss"), 4),
                _format(val.get("accuracy")),
                _format(val.get("margin")),
                _format(run.test["loss"], 4) if run.test else "not evaluated",
                _with_ci(run.test, "accuracy"),
                _format(run.test["ties"]) if run.test else "—",
                _with_ci(run.test, "reward_margin"),
                f"after epoch {onset}" if onset is not None else "none",
            ]
        )
    return markdown_table(headers, rows)


def setup_table(runs: list[RunSummary]) -> str:
    rows = [
        [
            run.name,
            _model_description(run.config),
            run.config.data.describe(),
            "/".join(str(run.pairs.get(split, "?")) for split in ("train", "val", "test")),
            run.config.loss.type + (f" (label smoothing {run.config.loss.label_smoothing:g})" if run.config.loss.label_smoothing else ""),
            run.config.training.effective_batch_size,
            run.config.data.max_length,
            run.config.training.seed,
        ]
        for run in runs
    ]
    headers = ["run", "model", "data", "pairs train/val/test", "loss", "batch", "max length", "seed"]
    return markdown_table(headers, rows)


def _run_colors(runs: list[RunSummary]) -> dict[str, Any]:
    palette = plt.get_cmap("tab10")
    return {run.name: palette(i % 10) for i, run in enumerate(runs)}


def plot_sweep_curves(runs: list[RunSummary], report: Path) -> list[Path]:
    """One PNG per validation metric, one line per run; a star marks each run's best epoch."""
    colors = _run_colors(runs)
    written = []
    for metric_key, (metric, title, ylabel) in SWEEP_PLOTS.items():
        figure, axes = plt.subplots(figsize=(7.5, 4.5))
        all_values = []
        for run in runs:
            values = run.val(metric)
            all_values += [v for v in values if v == v]
            axes.plot(run.epochs, values, marker="o", color=colors[run.name], label=run.label)
            if run.best_record is not None:  # at its own epoch, which is fractional for a step checkpoint
                axes.plot(run.best["epoch"], run.best_record["val"].get(metric, float("nan")), marker="*",
                          markersize=16, color=colors[run.name], markeredgecolor="black", linestyle="none")
        positive = [v for v in all_values if v > 0]
        if metric == "loss" and positive and len(positive) == len(all_values) and max(positive) / min(positive) > 100:
            axes.set_yscale("log")  # losses near zero and near log 2 differ by orders of magnitude
            ylabel += " (log scale)"
        axes.set_title(f"{title}  (★ = best epoch)")
        axes.set_xlabel("epoch")
        axes.set_ylabel(ylabel)
        epochs = sorted({e for run in runs for e in run.epochs})
        axes.set_xticks(epochs)
        axes.grid(alpha=0.3)
        axes.legend(fontsize="small")
        figure.tight_layout()
        path = figure_path(report, metric_key)
        figure.savefig(path, dpi=110)
        plt.close(figure)
        written.append(path)
    return written


def plot_sweep_test(runs: list[RunSummary], report: Path) -> Path | None:
    """Test accuracy and reward margin at each run's best epoch, with their 95% bootstrap intervals."""
    evaluated = [run for run in runs if run.test is not None]
    if not evaluated:
        return None
    colors = _run_colors(runs)
    figure, panels = plt.subplots(1, 2, figsize=(max(7.5, 1.6 * len(evaluated) + 4), 4.5))
    positions = range(len(evaluated))
    for axes, metric, title in (
        (panels[0], "accuracy", "Test accuracy (chosen reward > rejected)"),
        (panels[1], "reward_margin", "Test reward margin"),
    ):
        values = [run.test[metric] for run in evaluated]
        low = [value - run.test[f"{metric}_ci95"][0] for value, run in zip(values, evaluated)]
        high = [run.test[f"{metric}_ci95"][1] - value for value, run in zip(values, evaluated)]
        axes.bar(positions, values, yerr=[low, high], capsize=6, color=[colors[run.name] for run in evaluated])
        for x, value in zip(positions, values):  # inside the bar, clear of the error bar at its top
            axes.text(x, value / 2, f"{value:.3f}", ha="center", va="center", color="white", fontweight="bold")
        axes.set_xticks(list(positions), [f"{run.name}\nβ={run.config.loss.beta:g}" for run in evaluated], fontsize="small")
        axes.set_title(title, fontsize="medium")
        axes.axhline(0, color="black", linewidth=0.8)
        axes.grid(axis="y", alpha=0.3)
    panels[0].set_ylim(0, 1.05)
    panels[0].axhline(0.5, color="grey", linestyle=":", linewidth=1, zorder=0)  # a coin flip
    figure.suptitle("Best checkpoint of each run on its test pairs (error bars: 95% bootstrap CI)", fontsize="medium")
    figure.tight_layout()
    path = figure_path(report, SWEEP_TEST_PLOT)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


HOW_TO_READ = """\
## How to read this report

- **β** scales the implicit reward β·(log πθ − log πref): a larger β keeps the policy closer to the reference.
- **best epoch** is the checkpoint the trainer marked best by its validation metric (`training.best_metric`, val loss
  by default); the **val** columns are that epoch's validation metrics and the **test** columns evaluate that
  checkpoint on held-out test pairs (`make eval`).
- **acc** (accuracy) is the share of pairs whose chosen response gets a strictly higher implicit reward than the
  rejected one; pairs with equal rewards are counted as **ties**, not as half right. A policy identical to the
  reference ties on every pair.
- **margin** is the mean of chosen reward − rejected reward, β·h per pair, where h is the policy's log-ratio to the
  reference on the chosen response minus that on the rejected one. The **loss** depends on β as the margin does
  (for `dpo` it is −log σ(β·h), a function of the margin itself): the same h > 0 gives a larger margin and a lower
  loss at a larger β.
- **Across β**, compare accuracy and ties only: they depend on the sign of h alone, not on β.
- **Within one β**, compare loss and margin too (or margin / β, which is h, across β).
- **[95% CI]** is a percentile bootstrap interval over test pairs (1000 resamples, fixed seed): runs whose intervals
  overlap widely are not clearly different on this test set.
- **overfitting onset** is the first epoch after which val loss went up (the next epoch's val loss was higher);
  "none" means val loss never rose. Training past it mostly makes the model more confident, not more accurate.
"""


def write_sweep_report(paths: list[str | Path], out: str | Path = "reports/sweep.md", dataset: str = TEST_DATASET) -> Path:
    """`reports/sweep.md`: one table row per run, plus PNGs comparing the runs, linked from the report."""
    out = Path(out)
    run_dirs = [run for path in paths for run in find_runs(Path(path))]
    runs = []
    for run_dir in dict.fromkeys(run_dirs):
        summary = summarize_run(run_dir, dataset)
        if summary.records:
            runs.append(summary)
        else:
            print(f"skipping {run_dir}: no finished epoch (metrics.jsonl is empty or missing)", flush=True)
    if not runs:
        raise ConfigError(f"no run with finished epochs among: {', '.join(map(str, paths))}")
    out.parent.mkdir(parents=True, exist_ok=True)
    figures = plot_sweep_curves(runs, out)
    test_figure = plot_sweep_test(runs, out)
    missing = [run.name for run in runs if run.test is None]
    lines = [
        "# DPO sweep report",
        "",
        f"{len(runs)} runs: {', '.join(f'`{run.run_dir}`' for run in runs)}. Validation metrics come from each run's "
        f"`metrics.jsonl`; test metrics from `eval_{dataset}.json` of its best checkpoint.",
        "",
        "## Results",
        "",
        sweep_table(runs),
        "",
    ]
    if missing:
        lines += [f"Not evaluated yet: {', '.join(missing)} (run `python scripts/eval.py <run dir>`).", ""]
    lines += ["## Curves", ""]
    for path, (_, title, _) in zip(figures, SWEEP_PLOTS.values()):
        lines += [f"![{title}]({path.name})", ""]
    if test_figure is not None:
        lines += [f"![Test metrics at each run's best epoch]({test_figure.name})", ""]
    lines += ["## Setup", "", setup_table(runs), "", HOW_TO_READ]
    out.write_text("\n".join(lines))
    return out
