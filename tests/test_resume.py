"""Exact resume, atomic epoch checkpoints, divergence and Ctrl-C, each against a real interruption of a real run.

Every run here trains the smoke config for 2 epochs on 32 pairs (4 optimizer steps of 8 per epoch, in an order
that changes between epochs), compared with one uninterrupted run of the same config (`baseline`): final
weights and every metrics.jsonl value within 1e-5.
"""

from __future__ import annotations

import json
import math
import os
import re
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import transformers
from safetensors.torch import load_file
from transformers import TrainerCallback

from dpo_recipe.cli import main
from dpo_recipe.config_loader import load_config
from dpo_recipe.rundir import epoch_dirs, latest_checkpoint, read_metrics, step_dirs
import dpo_recipe.run as run_module
from dpo_recipe.run import prepare_run, run_training

from conftest import REPO, SMOKE_CONFIG

TOLERANCE = 1e-5
SMALL_RUN = [
    "training.num_epochs=2", "data.num_pairs=40", "data.num_test_pairs=4", "data.max_length=64",
    "training.effective_batch_size=8", "training.per_device_batch_size=8",
]
# Wall-clock throughput differs between any two runs; everything else in a metrics record must match.
TIMING_KEYS = {"tokens_per_s", "pairs_per_s"}

# A loss module the runs import through `loss.type`: exactly dpo_loss, except that once epoch 1 (or the checkpoint
# $GATE_CHECKPOINT) is committed it tells the test (gate-reached) and holds the run inside the next step until
# gate-release appears. That makes "interrupted during epoch 2" deterministic without timing anything.
GATE_MODULE = '''
import os
import time
from pathlib import Path

from dpo_recipe.loss import dpo_loss


def hold_after_epoch_1(*args):
    run_dir = Path(os.environ["GATE_RUN_DIR"])
    if (run_dir / os.environ.get("GATE_CHECKPOINT", "epoch-1")).is_dir():
        (run_dir.parent / "gate-reached").touch()
        while not (run_dir.parent / "gate-release").exists():
            time.sleep(0.02)
    return dpo_loss(*args)
'''
# dpo_loss, but nan from the 7th call on (or $NAN_FROM_CALL): calls 1-4 are epoch 1's steps, 5 is its validation,
# 6 is step 5, 7 is step 6, ..., 9 is step 8 (the last of epoch 2).
NAN_MODULE = '''
import os

from dpo_recipe.loss import dpo_loss

calls = 0


def nan_from_call_7(*args):
    global calls
    calls += 1
    losses, chosen_rewards, rejected_rewards = dpo_loss(*args)
    bad = calls >= int(os.environ.get("NAN_FROM_CALL", 7))
    return (losses * float("nan") if bad else losses), chosen_rewards, rejected_rewards
'''
# dpo_loss that appends each batch's pairs (their reference log-probs, which identify them) to BATCH_LOG.
ORDER_MODULE = '''
import json
import os

from dpo_recipe.loss import dpo_loss


def record_batches(*args):
    with open(os.environ["BATCH_LOG"], "a") as log:
        log.write(json.dumps([round(value, 4) for value in args[2].tolist()]) + "\\n")
    return dpo_loss(*args)
'''
STEPS_PER_EPOCH = 4


def _overrides(output_dir: Path, cache_dir: Path, *extra: str) -> list[str]:
    return [f"training.output_dir={output_dir}", f"training.reference_cache_dir={cache_dir}", *SMALL_RUN, *extra]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A reference cache shared by every run of this module, and the module that holds the test losses."""
    root = tmp_path_factory.mktemp("resume")
    modules = root / "modules"
    modules.mkdir()
    (modules / "gate_loss.py").write_text(GATE_MODULE)
    (modules / "nan_loss.py").write_text(NAN_MODULE)
    (modules / "order_loss.py").write_text(ORDER_MODULE)
    return root


@pytest.fixture(scope="module")
def baseline(workspace):
    """One uninterrupted run; it also fills the reference cache that every later run reads."""
    overrides = _overrides(workspace / "baseline", workspace / "ref_cache", "loss.type=order_loss:record_batches")
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str(workspace / "modules"))
        patch.setenv("BATCH_LOG", str(workspace / "batches.jsonl"))
        assert run_training(load_config(SMOKE_CONFIG, overrides)) == 0
    return workspace / "baseline" / "smoke"


def test_the_batch_order_differs_between_epochs(workspace, baseline):
    """Otherwise a lost sampler or RNG state on resume would go unnoticed: every epoch would replay one order."""
    calls = [json.loads(line) for line in (workspace / "batches.jsonl").read_text().splitlines()]
    per_epoch = STEPS_PER_EPOCH + 1  # the steps, then one validation batch
    assert len(calls) == 2 * per_epoch
    epoch_1, epoch_2 = calls[:STEPS_PER_EPOCH], calls[per_epoch : per_epoch + STEPS_PER_EPOCH]
    assert sorted(v for batch in epoch_1 for v in batch) == sorted(v for batch in epoch_2 for v in batch)
    assert epoch_1[1:] != epoch_2[1:]  # the first (longest) batch stays first; the others are reshuffled


def _config(workspace: Path, name: str, *extra: str):
    return load_config(SMOKE_CONFIG, _overrides(workspace / name, workspace / "ref_cache", *extra))


def _weights(checkpoint: Path) -> dict:
    return load_file(checkpoint / "model.safetensors")


def assert_same_weights(checkpoint: Path, expected: Path, tolerance: float = TOLERANCE) -> None:
    ours, theirs = _weights(checkpoint), _weights(expected)
    assert ours.keys() == theirs.keys()
    worst = max((ours[name] - theirs[name]).abs().max().item() for name in ours)
    assert worst <= tolerance, f"{checkpoint} differs from {expected} by {worst:g}"


def assert_same_metrics(run_dir: Path, expected_dir: Path, epochs: int = 2) -> None:
    ours, theirs = read_metrics(run_dir), read_metrics(expected_dir)
    assert [r["epoch"] for r in ours] == [r["epoch"] for r in theirs][:epochs] == list(range(1, epochs + 1))
    # Logging steps too: the one at step 6 spans the resume at step 4, and still covers steps 1-6.
    steps, expected_steps = read_metrics(run_dir, "step"), read_metrics(expected_dir, "step")
    assert [r["step"] for r in steps] == [r["step"] for r in expected_steps if r["step"] <= ours[-1]["step"]]
    for mine, reference in zip(steps, expected_steps):
        for key, value in reference["train"].items():
            assert math.isclose(mine["train"][key], value, rel_tol=TOLERANCE, abs_tol=TOLERANCE), (mine["step"], key)
    for mine, reference in zip(ours, theirs):
        assert mine["step"] == reference["step"]
        for split in ("train", "val"):
            assert mine[split].keys() == reference[split].keys()
            for key, value in reference[split].items():
                if key in TIMING_KEYS:
                    continue
                # Log-prob sums run to hundreds of nats, where fp32 evaluation alone moves the last digits: relative there.
                assert math.isclose(mine[split][key], value, rel_tol=TOLERANCE, abs_tol=TOLERANCE), (
                    f"epoch {mine['epoch']} {split} {key}: {mine[split][key]!r} != {value!r}"
                )


@pytest.fixture
def gated_run(workspace):
    """Start a real `python -m dpo_recipe train` process that holds inside the first step of epoch 2 (or the step after
    the checkpoint `gate`), with any `extra` overrides."""
    started = []

    def start(name: str, *extra: str, gate: str = "epoch-1") -> tuple[subprocess.Popen, Path, Path]:
        output_dir = workspace / name
        output_dir.mkdir()
        overrides = _overrides(output_dir, workspace / "ref_cache", "loss.type=gate_loss:hold_after_epoch_1", *extra)
        env = dict(os.environ, GATE_RUN_DIR=str(output_dir / "smoke"), GATE_CHECKPOINT=gate)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(workspace / "modules"), os.environ.get("PYTHONPATH")]))
        with open(output_dir / "stdout.txt", "w") as stdout, open(output_dir / "stderr.txt", "w") as stderr:
            process = subprocess.Popen(
                [sys.executable, "-m", "dpo_recipe", "train", "--config", str(SMOKE_CONFIG),
                 *(arg for override in overrides for arg in ("--set", override))],
                cwd=REPO, env=env, stdout=stdout, stderr=stderr,
            )
        started.append(process)
        wait_until(process, lambda: (output_dir / "gate-reached").exists(), output_dir)
        return process, output_dir, output_dir / "smoke"

    yield start
    for process in started:  # a failed test must not leave a held run behind
        if process.poll() is None:
            process.kill()
            process.wait()


def wait_until(process: subprocess.Popen, condition, output_dir: Path) -> None:
    while not condition():
        try:
            process.wait(timeout=0.05)
        except subprocess.TimeoutExpired:
            continue
        stderr = (output_dir / "stderr.txt").read_text()
        pytest.fail(f"the run ended (exit {process.returncode}) too early:\n{stderr[-3000:]}")


def test_checkpoints_hold_weights_only_as_safetensors(baseline):
    assert [path.name for path in epoch_dirs(baseline)] == ["epoch-1", "epoch-2"]
    for checkpoint in epoch_dirs(baseline):
        names = {path.name for path in checkpoint.iterdir()}
        assert "model.safetensors" in names
        # Pickled files hold only optimizer, scheduler and RNG state (loaded by Trainer with weights_only=True).
        assert {n for n in names if n.endswith((".bin", ".pt", ".pth", ".pkl"))} <= {
            "optimizer.pt", "scheduler.pt", "rng_state.pth", "training_args.bin"
        }
    assert (baseline / "reference" / "model.safetensors").is_file()


def test_sigkill_during_epoch_2_then_resume_matches_the_uninterrupted_run(workspace, baseline, gated_run, capsys):
    process, output_dir, run_dir = gated_run("killed")
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL
    assert [path.name for path in epoch_dirs(run_dir)] == ["epoch-1"]
    assert [r["epoch"] for r in read_metrics(run_dir)] == [1]

    # Resumed with the run's own loss.type, as --resume requires; the gate lets every step through once released.
    (output_dir / "gate-release").touch()
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str(workspace / "modules"))
        patch.setenv("GATE_RUN_DIR", str(run_dir))
        assert run_training(_config(workspace, "killed", "loss.type=gate_loss:hold_after_epoch_1"), resume=True) == 0
    assert f"resuming {run_dir} from epoch-1 (step 4)" in capsys.readouterr().out
    assert [path.name for path in epoch_dirs(run_dir)] == ["epoch-1", "epoch-2"]
    assert_same_weights(run_dir / "epoch-2", baseline / "epoch-2")
    assert_same_metrics(run_dir, baseline)


def test_sigkill_inside_epoch_2_after_a_step_checkpoint_then_resume_matches_the_uninterrupted_run(
    workspace, baseline, gated_run, capsys
):
    """The issue's must-show: step checkpoints every 2 steps; killed (-9) inside step 7, after `step-6` was written,
    in the middle of epoch 2. `--resume` goes on from step-6 with the epoch's own data order (shuffled differently
    from epoch 1's, which a new process would draw), and ends with the uninterrupted run's weights and records."""
    process, output_dir, run_dir = gated_run("killed_in_steps", "training.save_steps=2", gate="step-6")
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL
    assert [path.name for path in epoch_dirs(run_dir)] == ["epoch-1"]
    assert [path.name for path in step_dirs(run_dir)] == ["step-2", "step-6"]
    assert latest_checkpoint(run_dir) == run_dir / "step-6"

    (output_dir / "gate-release").touch()
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str(workspace / "modules"))
        patch.setenv("GATE_RUN_DIR", str(run_dir))
        config = _config(workspace, "killed_in_steps", "loss.type=gate_loss:hold_after_epoch_1", "training.save_steps=2")
        assert run_training(config, resume=True) == 0
    assert f"resuming {run_dir} from step-6 (step 6)" in capsys.readouterr().out
    assert [path.name for path in epoch_dirs(run_dir)] == ["epoch-1", "epoch-2"]
    assert_same_weights(run_dir / "epoch-2", baseline / "epoch-2", tolerance=1e-6)
    assert_same_metrics(run_dir, baseline)


def resume_as_printed(config_file, workspace, run_dir, baseline, monkeypatch, **tolerance):
    """Run the printed resume command's config (the run's own config.yaml; its gated loss passes through once
    gate-release exists): it must finish equal to the uninterrupted baseline."""
    monkeypatch.syspath_prepend(str(workspace / "modules"))
    monkeypatch.setenv("GATE_RUN_DIR", str(run_dir))
    assert run_training(load_config(config_file), resume=True) == 0
    assert_same_weights(run_dir / "epoch-2", baseline / "epoch-2", **tolerance)
    assert_same_metrics(run_dir, baseline)


def test_sigterm_with_save_on_signal_saves_the_step_and_the_printed_command_resumes_exactly(
    workspace, baseline, gated_run, monkeypatch
):
    """SIGTERM during step 5 (the first of epoch 2): that step finishes, is saved as step-5, and the run exits 75 naming
    it and the resume command. Nothing is lost: the resumed run ends as the uninterrupted one."""
    process, output_dir, run_dir = gated_run("sigterm_saved", "training.save_on_signal=true")
    process.send_signal(signal.SIGTERM)
    stderr_file = output_dir / "stderr.txt"
    wait_until(process, lambda: "received SIGTERM: saving a checkpoint after this step" in stderr_file.read_text(), output_dir)
    (output_dir / "gate-release").touch()
    assert process.wait(timeout=300) == 75, stderr_file.read_text()[-3000:]
    stderr = stderr_file.read_text()
    assert "Traceback" not in stderr
    assert [path.name for path in step_dirs(run_dir)] == ["step-5"]
    assert [path.name for path in epoch_dirs(run_dir)] == ["epoch-1"]
    match = re.search(
        rf"stopped by SIGTERM after saving (\S+) \(step 5\)\. Resume with: {re.escape(shlex.quote(sys.executable))} -m "
        r"dpo_recipe train --config (\S+) --resume", stderr
    )
    assert match, stderr[-2000:]
    assert Path(match.group(1)) == run_dir / "step-5"

    resume_as_printed(match.group(2), workspace, run_dir, baseline, monkeypatch, tolerance=1e-6)


def test_sigint_stops_cleanly_and_the_printed_command_resumes_exactly(workspace, baseline, gated_run, monkeypatch):
    process, output_dir, run_dir = gated_run("sigint")
    # The plots are drawn at each epoch end, not only when a run finishes; and drawn again when it is interrupted.
    plots = [run_dir / name for name in ("loss.png", "rewards.png", "accuracy.png")]
    assert all(path.is_file() for path in plots)
    for path in plots:
        path.unlink()
    process.send_signal(signal.SIGINT)
    # The handler has run once it says so; only then may the held step finish.
    wait_until(process, lambda: "received SIGINT" in (output_dir / "stderr.txt").read_text(), output_dir)
    (output_dir / "gate-release").touch()
    assert process.wait(timeout=300) == 130, (output_dir / "stderr.txt").read_text()[-3000:]
    assert all(path.is_file() for path in plots)
    stderr = (output_dir / "stderr.txt").read_text()
    assert "Traceback" not in stderr
    assert [path.name for path in epoch_dirs(run_dir)] == ["epoch-1"]
    assert not list(run_dir.glob("checkpoint-*"))  # the stopped epoch was not saved at all
    # Launched as `python -m dpo_recipe train`, so resumed the same way (not through `accelerate launch`), by this
    # environment's interpreter: a bare `python` outside the activated environment is another one.
    match = re.search(
        rf"interrupted; last complete checkpoint: (\S+)\. Resume with: {re.escape(shlex.quote(sys.executable))} -m dpo_recipe "
        r"train --config (\S+) --resume", stderr
    )
    assert match, stderr[-2000:]
    assert Path(match.group(1)) == run_dir / "epoch-1"

    resume_as_printed(match.group(2), workspace, run_dir, baseline, monkeypatch)


def test_a_save_that_fails_midway_is_never_loaded_and_is_cleaned_on_resume(workspace, baseline, monkeypatch):
    epoch_2_step = read_metrics(baseline)[1]["step"]
    save_rng_state = transformers.Trainer._save_rng_state

    def disk_full_at_epoch_2(self, output_dir):  # model, optimizer and scheduler are already written by now
        if self.state.global_step == epoch_2_step:
            raise OSError(28, "No space left on device")
        return save_rng_state(self, output_dir)

    monkeypatch.setattr(transformers.Trainer, "_save_rng_state", disk_full_at_epoch_2)
    config = _config(workspace, "failed_save")
    with pytest.raises(OSError, match="No space left"):
        run_training(config)
    run_dir = config.run_dir
    partial = run_dir / f"checkpoint-{epoch_2_step}"
    assert (partial / "model.safetensors").is_file() and not (partial / "rng_state.pth").exists()
    assert latest_checkpoint(run_dir) == run_dir / "epoch-1"
    assert [path.name for path in epoch_dirs(run_dir)] == ["epoch-1"]
    assert [r["epoch"] for r in read_metrics(run_dir)] == [1]
    assert os.readlink(run_dir / "best") == "epoch-1"

    monkeypatch.undo()
    assert run_training(config, resume=True) == 0
    assert not list(run_dir.glob("checkpoint-*"))
    assert_same_weights(run_dir / "epoch-2", baseline / "epoch-2")
    assert_same_metrics(run_dir, baseline)


def test_nan_loss_stops_with_exit_3_naming_the_step_and_keeps_epoch_1(workspace, baseline, monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(workspace / "modules"))
    monkeypatch.delitem(sys.modules, "nan_loss", raising=False)  # its call count starts at 0
    output_dir = workspace / "diverged"
    overrides = _overrides(output_dir, workspace / "ref_cache", "loss.type=nan_loss:nan_from_call_7")
    code = main(["train", "--config", str(SMOKE_CONFIG), *(a for o in overrides for a in ("--set", o))])
    error_lines = capsys.readouterr().err.strip().splitlines()
    assert code == 3
    assert error_lines[-1] == (
        "error: training diverged: loss became nan at optimizer step 6 (epoch 1.25); the last good checkpoint is intact"
    )
    run_dir = output_dir / "smoke"
    assert [path.name for path in epoch_dirs(run_dir)] == ["epoch-1"]
    assert not list(run_dir.glob("checkpoint-*"))
    assert_same_weights(run_dir / "epoch-1", baseline / "epoch-1")
    assert_same_metrics(run_dir, baseline, epochs=1)


def test_a_nan_in_the_last_step_before_a_save_never_reaches_a_checkpoint(workspace, baseline, monkeypatch, capsys):
    """Step statistics are read at log steps and saves, not every step. With no log step in between, the epoch-end
    read must still stop a nan in the very last step of epoch 2 before epoch 2 is evaluated or saved."""
    monkeypatch.syspath_prepend(str(workspace / "modules"))
    monkeypatch.delitem(sys.modules, "nan_loss", raising=False)
    monkeypatch.setenv("NAN_FROM_CALL", "9")
    output_dir = workspace / "diverged_late"
    overrides = _overrides(output_dir, workspace / "ref_cache", "loss.type=nan_loss:nan_from_call_7", "training.logging_steps=100")
    code = main(["train", "--config", str(SMOKE_CONFIG), *(a for o in overrides for a in ("--set", o))])
    assert code == 3
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "error: training diverged: loss became nan at optimizer step 8 (epoch 1.75); the last good checkpoint is intact"
    )
    run_dir = output_dir / "smoke"
    assert [path.name for path in epoch_dirs(run_dir)] == ["epoch-1"]
    assert not list(run_dir.glob("checkpoint-*"))
    assert [r["epoch"] for r in read_metrics(run_dir)] == [1]
    assert_same_weights(run_dir / "epoch-1", baseline / "epoch-1")


def test_resume_refuses_a_changed_recipe_naming_each_key_and_the_way_out(baseline, monkeypatch, capsys):
    """The issue's case: a finished smoke run resumed with another β would train on at β 0.9 and compare validation
    losses taken at two β. Nothing may be written or trained before the refusal."""
    monkeypatch.syspath_prepend(str(baseline.parents[1] / "modules"))  # the run's loss.type
    saved = baseline / "config.yaml"
    before = {path: path.stat().st_mtime_ns for path in baseline.rglob("*")}
    code = main(["train", "--config", str(saved), "--resume", "--set", "training.num_epochs=4", "--set", "loss.beta=0.9",
                 "--set", "training.learning_rate=0.01"])  # fmt: skip
    errors = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(errors) == 1 and "Traceback" not in errors[0]
    assert errors[0].startswith(f"error: {saved}: --resume: {baseline} was trained with other settings: ")
    assert "loss.beta 0.3 → 0.9 (--set loss.beta=0.9)" in errors[0]
    assert "training.learning_rate 0.001 → 0.01 (--set training.learning_rate=0.01)" in errors[0]
    assert "training.num_epochs 2 →" not in errors[0]  # extending the run is allowed
    assert errors[0].endswith("or start over with --overwrite, or train it as a new run with --set run_name=<new name>")
    assert {path: path.stat().st_mtime_ns for path in baseline.rglob("*")} == before


def test_resume_may_extend_a_run_and_records_the_change_with_its_step(workspace, capfd, caplog):
    """More epochs (and other keys that only extend a run) are accepted and written into run_info.json with the step
    they apply from. The early-stopping run's resume says nothing about a best checkpoint that "does not exist"."""
    config = _config(workspace, "extended", "training.num_epochs=1", "training.early_stopping_patience=3")
    assert run_training(config) == 0
    capfd.readouterr()
    saved = config.run_dir / "config.yaml"
    assert main(["train", "--config", str(saved), "--resume", "--set", "training.num_epochs=2",
                 "--set", "training.logging_steps=2"]) == 0  # fmt: skip
    assert "does not exist anymore" not in "".join(capfd.readouterr()) + caplog.text  # the text, or the log record
    assert [r["epoch"] for r in read_metrics(config.run_dir)] == [1, 2]
    changes = json.loads((config.run_dir / "run_info.json").read_text())["config_changes"]
    assert changes == [
        {"from_step": STEPS_PER_EPOCH, "after_epoch": 1, "key": "training.num_epochs", "old": 1, "new": 2},
        {"from_step": STEPS_PER_EPOCH, "after_epoch": 1, "key": "training.logging_steps", "old": 6, "new": 2},
    ]
    assert "num_epochs: 2" in saved.read_text()


class SignalDuringStep(TrainerCallback):
    """Sends this process `signum` while optimizer step `step` runs, as `kill` or Ctrl-C would."""

    def __init__(self, step: int, signum: int):
        self.step, self.signum = step, signum

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == self.step - 1:
            signal.raise_signal(self.signum)


@pytest.mark.parametrize("entry", ["trainer.train", "run_training"])
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_stops_training_in_process_after_the_step_and_then_reaches_its_handler(smoke_config, monkeypatch, signum, entry):
    """Training driven in-process (a notebook, a test) stops at the end of the step, then the signal reaches the
    handler that was there before (for Ctrl-C, Python's KeyboardInterrupt; for SIGTERM, the end of the process).
    Swallowed, it let a stopped run pass for a finished one: a test session stopped by a signal went on with a LoRA
    run cut short in epoch 2 and failed comparing it with its last checkpoint (merged logits 0.1309 against 0.1264)."""
    received = []

    def handler(number, frame):
        received.append(number)

    def prepared(*args, **kwargs):
        run = prepare_run(*args, **kwargs)
        run.trainer.add_callback(SignalDuringStep(2, signum))
        runs.append(run)
        return run

    runs = []
    monkeypatch.setattr(run_module, "prepare_run", prepared)
    previous = signal.signal(signum, handler)
    try:
        if entry == "run_training":
            assert run_training(smoke_config(*SMALL_RUN)) == 130  # after the signal went on to `handler`
        else:
            prepared(smoke_config(*SMALL_RUN)).trainer.train()
        assert signal.getsignal(signum) is handler  # restored before it was delivered
    finally:
        signal.signal(signum, previous)
    assert received == [signum]
    (run,) = runs
    assert run.trainer.state.global_step == 2 and epoch_dirs(run.trainer.args.output_dir) == []


@pytest.mark.parametrize(
    ("signum", "step", "saved"),
    [(signal.SIGUSR1, 6, "step-6"), (signal.SIGTERM, STEPS_PER_EPOCH, "epoch-1")],
    ids=["SIGUSR1 inside epoch 2", "SIGTERM in the last step of epoch 1"],
)
def test_save_on_signal_saves_where_the_step_ends_and_resume_loses_nothing(workspace, baseline, monkeypatch, signum, step, saved):
    """A scheduler's SIGUSR1 (ahead of a time limit) inside an epoch saves that step as a step checkpoint; a SIGTERM in
    an epoch's last step lets the epoch end validate and save it as its epoch instead (a step checkpoint there would
    leave the epoch without its record). Either way the run exits 75, the signal then reaches the handler that was
    there before, and the resumed run ends as the uninterrupted one."""
    received = []
    runs = []

    def prepared(*args, **kwargs):
        run = prepare_run(*args, **kwargs)
        if not run.resume_from:
            run.trainer.add_callback(SignalDuringStep(step, signum))
        runs.append(run)
        return run

    monkeypatch.setattr(run_module, "prepare_run", prepared)
    previous = signal.signal(signum, lambda number, frame: received.append(number))
    name = f"saved_on_{signal.Signals(signum).name}"
    try:
        assert run_training(_config(workspace, name, "training.save_on_signal=true")) == 75
    finally:
        signal.signal(signum, previous)
    assert received == [signum]
    run_dir = workspace / name / "smoke"
    assert runs[0].trainer.state.global_step == step
    assert latest_checkpoint(run_dir) == run_dir / saved
    assert [r["epoch"] for r in read_metrics(run_dir)] == [1]

    assert run_training(_config(workspace, name, "training.save_on_signal=true"), resume=True) == 0
    assert_same_weights(run_dir / "epoch-2", baseline / "epoch-2", tolerance=1e-6)
    assert_same_metrics(run_dir, baseline)
