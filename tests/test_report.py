"""The sweep report: overfitting onset, and a smoke-sized sweep (two β values) written with its table and plots."""

from __future__ import annotations

import json
import re

import matplotlib.image
import pytest
import torch

from dpo_recipe.cli import main
from dpo_recipe.evaluate import evaluate_paths
from dpo_recipe.curves import plot_run
from dpo_recipe.report import overfitting_onset, write_sweep_report
from dpo_recipe.rundir import read_metrics
from dpo_recipe.run import run_training


@pytest.mark.parametrize(
    ("losses", "onset"),
    [
        ([0.6, 0.5, 0.55, 0.4], 2),  # rose after epoch 2 (even though epoch 4 is lower still)
        ([0.6, 0.7, 0.5], 1),
        ([0.6, 0.5, 0.5, 0.4], None),  # flat is not rising
        ([0.6], None),
    ],
)
def test_overfitting_onset_is_the_epoch_after_which_val_loss_first_rose(losses, onset):
    assert overfitting_onset(list(range(1, len(losses) + 1)), losses) == onset


def test_smoke_sweep_writes_a_report_with_table_and_plots(smoke_config, tmp_path, capsys):
    betas = ("0.1", "0.5")
    runs = []
    for beta in betas:
        config = smoke_config(f"run_name=sweep_beta{beta}", f"loss.beta={beta}", "training.num_epochs=2",
                              "data.num_pairs=120", "data.num_test_pairs=24")  # fmt: skip
        assert run_training(config) == 0
        runs.append(config.run_dir)
    out = tmp_path / "reports" / "sweep.md"

    # Before evaluation the report still renders, and says what is missing.
    text = write_sweep_report([tmp_path / "checkpoints"], out).read_text()
    assert text.count("not evaluated") >= 2 and not (out.parent / "sweep_test.png").exists()

    evaluate_paths(runs)
    assert main(["report", *map(str, runs), "--out", str(out)]) == 0
    text = out.read_text()
    results = text.split("## Results")[1].split("## Curves")[0]
    table = [line for line in results.splitlines() if line.startswith("| sweep_beta")]
    assert len(table) == len(betas)
    for beta, run in zip(betas, runs):
        (row,) = [line for line in table if line.startswith(f"| {run.name} ")]
        cells = [cell.strip() for cell in row.strip("|").split("|")]
        best = json.loads((run / "best.json").read_text())
        test = json.loads((run / best["checkpoint"] / "eval_test.json").read_text())
        records = read_metrics(run)
        onset = overfitting_onset([r["epoch"] for r in records], [r["val"]["loss"] for r in records])
        assert cells[1] == beta and cells[2] == "0.001" and cells[3] == "2/2"
        assert cells[4] == f"{best['epoch']} (val loss)"
        assert cells[5] == f"{best['value']:.4f}"
        assert cells[9] == f"{test['accuracy']:.3f} [{test['accuracy_ci95'][0]:.3f}, {test['accuracy_ci95'][1]:.3f}]"
        assert cells[11].startswith(f"{test['reward_margin']:.3f} [")
        assert cells[12] == (f"after epoch {onset}" if onset is not None else "none")
    for image in ("sweep_val_loss.png", "sweep_val_margin.png", "sweep_test.png"):
        assert f"]({image})" in text
        height, width, _ = matplotlib.image.imread(out.parent / image).shape
        assert width >= 600 and height >= 400
    assert "## How to read this report" in text
    assert "GPT-2 from config, random init (n_layer=2, n_embd=64, n_head=2)" in text and "synthetic" in text

    # A second report in the same folder writes its own figures, named after it, and leaves the first one's alone.
    figures = {image: (out.parent / image).read_bytes() for image in ("sweep_val_loss.png", "sweep_val_margin.png", "sweep_test.png")}
    mine = out.parent / "mine.md"
    assert main(["report", str(runs[0]), "--out", str(mine)]) == 0
    for image in ("mine_val_loss.png", "mine_val_margin.png", "mine_test.png"):
        assert f"]({image})" in mine.read_text() and (out.parent / image).is_file()
    assert {image: (out.parent / image).read_bytes() for image in figures} == figures
    assert "](sweep_" not in mine.read_text()


def test_a_one_epoch_run_plots_its_training_curve_per_logged_step(tmp_path, monkeypatch):
    """metrics.jsonl -> PNG: six logged steps and a mid-epoch evaluation are curves, not a single dot per epoch."""
    import matplotlib.axes

    train = {"loss": 0.6, "margin": 0.1, "accuracy": 0.5, "chosen_reward": 0.0, "rejected_reward": -0.1}
    val = {"loss": 0.65, "margin": 0.05, "accuracy": 0.55, "chosen_reward": 0.0, "rejected_reward": -0.05}
    records = [{"kind": "step", "epoch": step / 6, "step": step, "train": {**train, "loss": 0.7 - 0.02 * step}}
               for step in range(1, 7)]  # fmt: skip
    records.insert(3, {"kind": "eval", "epoch": 0.5, "step": 3, "val": val})
    records.append({"kind": "epoch", "epoch": 1, "step": 6, "train": train, "val": val})
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))

    drawn = []
    real_plot = matplotlib.axes.Axes.plot
    monkeypatch.setattr(matplotlib.axes.Axes, "plot", lambda self, x, y, *a, **k: drawn.append((list(x), list(y))) or real_plot(self, x, y, *a, **k))
    written = plot_run(tmp_path)
    assert [path.name for path in written] == ["loss.png", "rewards.png", "accuracy.png"]
    assert all(matplotlib.image.imread(path).shape[0] > 100 for path in written)
    smoothed_loss, raw_loss, val_loss = drawn[:3]
    assert raw_loss == ([step / 6 for step in range(1, 7)], pytest.approx([0.7 - 0.02 * step for step in range(1, 7)]))
    assert smoothed_loss[0] == raw_loss[0] and smoothed_loss[1][0] == raw_loss[1][0]
    assert smoothed_loss[1][-1] > raw_loss[1][-1]  # a falling curve, smoothed, lags behind
    assert val_loss == ([0.5, 1], [0.65, 0.65])  # the mid-epoch evaluation and the epoch end


def test_validation_is_drawn_at_the_step_it_was_taken_and_the_best_epoch_is_marked(tmp_path, monkeypatch):
    """`training.max_steps=20` at 12 steps per epoch: the partial epoch 2 was validated at step 20, epoch 1.67, not 2.
    Every plot marks the best epoch (here that partial one) where its validation point is."""
    import matplotlib.axes

    train = {"loss": 0.6, "margin": 0.1, "accuracy": 0.5}
    val = {"loss": 0.65, "margin": 0.05, "accuracy": 0.55, "chosen_reward": 0.0, "rejected_reward": -0.05}
    records = [{"kind": "step", "epoch": step / 12, "step": step, "train": train} for step in (6, 12, 18)]
    records.insert(2, {"kind": "epoch", "epoch": 1, "step": 12, "train": train, "val": val})
    records.append({"kind": "epoch", "epoch": 2, "step": 20, "train": train, "val": {**val, "loss": 0.6, "margin": 0.2}})
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (tmp_path / "best.json").write_text(json.dumps({"epoch": 2, "metric": "val_loss", "value": 0.6, "checkpoint": "epoch-2"}))

    drawn, marked = [], []
    real_plot, real_axvline = matplotlib.axes.Axes.plot, matplotlib.axes.Axes.axvline
    monkeypatch.setattr(matplotlib.axes.Axes, "plot", lambda self, x, y, *a, **k: drawn.append((list(x), list(y), k)) or real_plot(self, x, y, *a, **k))
    monkeypatch.setattr(matplotlib.axes.Axes, "axvline", lambda self, x, *a, **k: marked.append((x, k["label"])) or real_axvline(self, x, *a, **k))
    assert [path.name for path in plot_run(tmp_path)] == ["loss.png", "rewards.png", "accuracy.png"]
    validation = [(x, y) for x, y, style in drawn if style.get("marker") == "o"]
    assert len(validation) == 5  # val loss; val chosen, rejected and margin; val accuracy
    assert all(x == pytest.approx([1, 20 / 12]) for x, _ in validation)
    assert validation[0][1] == [0.65, 0.6]
    # Each plot marks epoch 2 with a line at its step, and each validation series with a star on its value there.
    assert marked == [(pytest.approx(20 / 12), "best: epoch 2 (val loss)")] * 3
    stars = [(x, y) for x, y, style in drawn if style.get("marker") == "*"]
    assert stars == [([pytest.approx(20 / 12)], [value]) for value in (0.6, 0.0, -0.05, 0.2, 0.55)]


def test_the_reading_guidance_compares_across_beta_only_what_beta_leaves_unchanged():
    """The same policy and reference log-probs scored at two β: the report (and the README) may call comparable across
    β only the metrics that did not move, and must keep every metric that moved to one β."""
    from dpo_recipe.evaluate import preference_metrics
    from dpo_recipe.loss import dpo_loss
    from dpo_recipe.report import HOW_TO_READ

    from conftest import REPO

    generator = torch.Generator().manual_seed(0)
    logps = [-40 + torch.randn(64, generator=generator, dtype=torch.float64) for _ in range(4)]
    logps[0][:4] = logps[2][:4]  # a few pairs where policy == reference on both sides: ties at every β
    logps[1][:4] = logps[3][:4]
    scored = {}
    for beta in (0.1, 1.0):
        losses, chosen, rejected = dpo_loss(*logps, beta)
        scored[beta] = preference_metrics(losses, chosen, rejected, logps[0], logps[1], bootstrap_samples=10)
    names = {"accuracy": "accuracy", "ties": "ties", "loss": "loss", "reward_margin": "margin"}
    moved = {name for key, name in names.items() if scored[0.1][key] != pytest.approx(scored[1.0][key])}
    assert moved == {"loss", "margin"} and scored[0.1]["ties"] > 0

    def metrics_named(text: str) -> set[str]:
        return {name for name in names.values() if re.search(rf"\b{name}\b", text)}

    guidance = {line.split("**")[1]: line.split("(")[0] for line in HOW_TO_READ.splitlines() if line.startswith("- **")}
    assert metrics_named(guidance["Across β"]) == set(names.values()) - moved
    assert moved <= metrics_named(guidance["Within one β"])
    readme = re.search(r"compare ([^.]*?) across β, ([^.(]*?) within one β", (REPO / "README.md").read_text())
    assert readme, "the README's reading guidance says what to compare across β and within one β"
    assert metrics_named(readme[1]) == set(names.values()) - moved and moved <= metrics_named(readme[2])
