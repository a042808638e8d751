"""Step checkpoints: a one-epoch run validated inside its epoch gets its best checkpoint among them, keeps only as
many as training.keep_checkpoints says (never the best one or the newest), and bad combinations of the keys stop
with one line. Exact resume from a step checkpoint, and saving on a signal, are tested in test_resume.py."""

from __future__ import annotations

import json

import pytest

from dpo_recipe.cli import main
from dpo_recipe.rundir import RESUME_ONLY_PREFIXES, checkpoint_step, epoch_dirs, read_metrics, step_dirs
from dpo_recipe.report import summarize_run, sweep_table
from dpo_recipe.run import run_training

from conftest import SMOKE_CONFIG


def test_a_one_epoch_run_gets_a_step_checkpoint_as_its_best_and_keeps_the_newest_step_besides(smoke_config, capsys):
    """At this learning rate validation is best early in the epoch (measured: 0.434 at step 3, 0.477 at its end), so
    best.json, the `best` link and the plots' marker must name a step checkpoint, which keep_checkpoints=1 keeps
    next to the newest step checkpoint. Resume state (optimizer, running totals, data order) stays in the newest
    checkpoint alone."""
    config = smoke_config(
        "training.num_epochs=1", "training.learning_rate=3e-4", "training.eval_steps=3", "training.save_steps=3",
        "training.keep_checkpoints=1",
    )  # fmt: skip
    assert run_training(config) == 0
    run_dir = config.run_dir
    evals = read_metrics(run_dir, "eval")
    # 12 steps: validated and saved at 3, 6 and 9; step 12 ends the epoch, which saves epoch-1 instead.
    assert [(r["step"], r["checkpoint"]) for r in evals] == [(3, "step-3"), (6, "step-6"), (9, "step-9")]
    (epoch,) = read_metrics(run_dir)
    lowest = min([*evals, epoch], key=lambda r: r["val"]["loss"])
    assert lowest is not epoch  # the case under test: the epoch end is not the best
    best = json.loads((run_dir / "best.json").read_text())
    assert best == {
        "epoch": lowest["epoch"], "step": lowest["step"], "metric": "val_loss", "value": lowest["val"]["loss"],
        "checkpoint": lowest["checkpoint"],
    }  # fmt: skip
    assert (run_dir / "best").resolve() == run_dir / best["checkpoint"]
    assert checkpoint_step(run_dir / "best") == best["step"]
    assert {path.name for path in step_dirs(run_dir)} == {"step-9", best["checkpoint"]}
    assert [path.name for path in epoch_dirs(run_dir)] == ["epoch-1"]
    for checkpoint in [*step_dirs(run_dir), *epoch_dirs(run_dir)]:
        resume_files = {path.name for path in checkpoint.iterdir() if path.name.startswith(RESUME_ONLY_PREFIXES)}
        assert bool(resume_files) == (checkpoint.name == "epoch-1"), (checkpoint.name, resume_files)
        assert (checkpoint / "model.safetensors").is_file()
    out = capsys.readouterr().out
    assert f"done: {run_dir} (best {best['checkpoint']} (epoch {best['epoch']:.2f}) by val_loss" in out
    card = (run_dir / "README.md").read_text()
    assert f"- **Best checkpoint**: {best['checkpoint']} (epoch {best['epoch']:.2f}) (by val loss)" in card
    # The sweep report reads the same best: its checkpoint and the validation taken there, not an epoch's.
    row = [cell.strip() for cell in sweep_table([summarize_run(run_dir)]).splitlines()[2].strip("|").split("|")]
    assert row[4] == f"{best['checkpoint']} (epoch {best['epoch']:.2f}) (val loss)"
    assert row[5] == f"{lowest['val']['loss']:.4f}"


@pytest.mark.parametrize(
    ("overrides", "line"),
    [
        (["training.eval_steps=4", "training.save_steps=6"],
         ("error: --set training.save_steps=6: training.save_steps must be a multiple of training.eval_steps (4), so "
          "that every step checkpoint is validated and can be the best one (got 6)")),
        (["training.keep_checkpoints=2"],
         ("error: --set training.keep_checkpoints=2: training.keep_checkpoints bounds step checkpoints, which only "
          "training.save_steps or training.save_on_signal write: set one of them (got 2)")),
        (["training.save_steps=5", "training.keep_checkpoints=-1"],
         "error: --set training.keep_checkpoints=-1: training.keep_checkpoints must be >= 1 or null (got -1)"),
        (["training.save_steps=-2"], "error: --set training.save_steps=-2: training.save_steps must be >= 1 or null (got -2)"),
        (["training.save_on_signal=maybe"],
         "error: --set training.save_on_signal=maybe: training.save_on_signal must be true or false, got 'maybe'"),
    ],
    ids=["save_steps not a multiple of eval_steps", "keep_checkpoints without step checkpoints", "keep_checkpoints < 1",
         "save_steps < 1", "save_on_signal not a bool"],
)  # fmt: skip
def test_bad_step_checkpoint_settings_stop_with_one_line(overrides, line, capsys):
    arguments = ["print-config", "--config", str(SMOKE_CONFIG), *(a for o in overrides for a in ("--set", o))]
    assert main(arguments) == 2
    assert capsys.readouterr().err.strip().splitlines() == [line]


def test_a_repeated_scheduler_notice_does_not_cut_the_save_short_but_a_second_ctrl_c_does():
    """Under a launcher the same SIGTERM can arrive twice (the scheduler's, and the launcher's forwarded copy): with
    save_on_signal the second must not interrupt the save the first asked for. A second Ctrl-C still means "now"."""
    import signal

    from dpo_recipe.callbacks import InterruptGuard

    saving = InterruptGuard(save_on_signal=True)
    saving._request_stop(signal.SIGUSR1, None)
    saving._request_stop(signal.SIGTERM, None)
    assert saving.signal == signal.SIGUSR1
    with pytest.raises(KeyboardInterrupt):
        saving._request_stop(signal.SIGINT, None)
    plain = InterruptGuard()
    plain._request_stop(signal.SIGTERM, None)
    with pytest.raises(KeyboardInterrupt):
        plain._request_stop(signal.SIGTERM, None)
