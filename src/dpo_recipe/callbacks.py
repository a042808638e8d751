"""Trainer callbacks that keep the run directory and the console honest: metrics.jsonl records, epoch and step
checkpoints, mid-epoch validation, early stopping by epochs, one readable line per log step, and a clean stop (with a
save, under training.save_on_signal) on SIGINT/SIGTERM/SIGUSR1."""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import signal
import sys
from pathlib import Path

import torch
from transformers import TrainerCallback

from .curves import plot_run
from .rundir import (
    EPOCH_PREFIX,
    append_record,
    apply_retention,
    best_epoch,
    keep_last_epoch_records,
    read_metrics,
    step_checkpoint_name,
    write_best,
)
from .totals import LOGGED_MEANS, RunningTotals


class ShardReport(TrainerCallback):
    """Under FSDP, each rank says how much of the model it holds once training has sharded it."""

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        from torch.distributed.tensor import DTensor

        parameters = list(model.parameters()) if model is not None else []
        if not any(isinstance(p, DTensor) for p in parameters):
            return
        local = sum(p.to_local().numel() if isinstance(p, DTensor) else p.numel() for p in parameters)
        total = sum(p.numel() for p in parameters)
        print(f"rank {args.process_index}: holds {local} of {total} parameter values", flush=True)



# training.best_metric as transformers logs it.
BEST_METRIC_LOGGED = {"loss": "eval_loss", "accuracy": "eval_rewards/accuracies", "margin": "eval_rewards/margins"}


def epoch_number(state) -> int:
    """The epoch a save or an epoch-end validation belongs to; a run cut short by training.max_steps saves its partial
    last epoch under the epoch it was in."""
    return math.ceil(state.epoch - 1e-9)


def inside_an_epoch(state) -> bool:
    """Whether the step just ended leaves work in its epoch and in the run, so that a save now is a step checkpoint;
    otherwise the epoch end that follows validates and saves the epoch."""
    return state.epoch != int(state.epoch) and state.global_step < state.max_steps


class EpochEndFlag(TrainerCallback):
    """Tells an epoch-end validation from those `training.eval_steps` adds within an epoch."""

    at_epoch_end = False

    def on_epoch_begin(self, args, state, control, **kwargs):
        self.at_epoch_end = False

    def on_epoch_end(self, args, state, control, **kwargs):
        self.at_epoch_end = True


class EpochRecorder(EpochEndFlag):
    """Writes metrics.jsonl and the checkpoints.

    At each logging step a `step` record; at each mid-epoch evaluation an `eval` record (naming the step checkpoint
    saved right after it, if one is); at each epoch end the val metrics, then an atomically named checkpoint, its
    `epoch` record (the only one of that epoch), the best checkpoint, checkpoint retention and the plots. A save inside
    an epoch (training.save_steps, or a signal under training.save_on_signal) is committed as `step-<N>`, the same way.
    """

    def __init__(
        self, run_dir: Path, totals: RunningTotals, best_metric: str, keep_epochs: str = "all",
        keep_checkpoints: int | None = None,
    ):  # fmt: skip
        self.run_dir = Path(run_dir)
        self.totals = totals
        self.best_metric = best_metric
        self.keep_epochs = keep_epochs
        self.keep_checkpoints = keep_checkpoints
        self.train_seconds = 0.0
        self.train_means: dict[str, float] = {}
        self.val_means: dict[str, float] = {}

    def on_epoch_end(self, args, state, control, **kwargs):
        super().on_epoch_end(args, state, control, **kwargs)
        self.train_seconds = self.totals.elapsed("train")  # the trainer starts the window with the epoch
        self.train_means = self.totals.means("train")

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs and "loss" in logs and "rewards/accuracies" in logs:
            train = {stat: logs[name] for name, stat in LOGGED_MEANS.items()}
            train.update(loss=logs["loss"], learning_rate=logs.get("learning_rate"), grad_norm=logs.get("grad_norm"))
            append_record(self.run_dir, {"kind": "step", "epoch": state.epoch, "step": state.global_step, "train": train})

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        self.val_means = self.totals.means("eval")
        if not self.at_epoch_end and state.is_world_process_zero:
            record = {"kind": "eval", "epoch": state.epoch, "step": state.global_step, "val": dict(self.val_means)}
            if control.should_save:  # a step checkpoint follows: these are its weights, a candidate for the best
                record["checkpoint"] = step_checkpoint_name(state.global_step)
            append_record(self.run_dir, record)

    def on_save(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        saved = self.run_dir / f"checkpoint-{state.global_step}"
        if not self.at_epoch_end:
            self._commit_step_checkpoint(saved, state)
            return
        epoch = epoch_number(state)
        final = self.run_dir / f"{EPOCH_PREFIX}{epoch}"
        if final.exists():
            shutil.rmtree(final)
        seconds = max(self.train_seconds, 1e-9)
        train = dict(self.train_means)
        train["tokens_per_s"] = train.get("tokens", 0) / seconds
        train["pairs_per_s"] = train.get("pairs", 0) / seconds
        record = {"kind": "epoch", "epoch": epoch, "step": state.global_step, "train": train, "val": dict(self.val_means)}
        # The record goes first, so a committed epoch always has one; a record whose rename never happened is
        # dropped on resume (`forget_records_after`).
        append_record(self.run_dir, record)
        # The rename is the commit point: only a finished save ever carries the `epoch-` name.
        os.replace(saved, final)
        # An epoch saved again (a training.max_steps run resumed inside it) has new weights: only their record stays.
        keep_last_epoch_records(self.run_dir)
        write_best(self.run_dir, self.best_metric)
        apply_retention(self.run_dir, final, self.keep_epochs, self.keep_checkpoints)
        plot_run(self.run_dir)  # a run stopped at any point still has plots of every epoch it finished
        print(_epoch_line(record), flush=True)

    def _commit_step_checkpoint(self, saved: Path, state) -> None:
        """A save inside an epoch: its validation record (if it was validated) is already written, so the rename
        commits it as `on_save` commits an epoch; no `epoch` record, no plots (an epoch end or a stop draws them)."""
        final = self.run_dir / step_checkpoint_name(state.global_step)
        if final.exists():
            shutil.rmtree(final)
        os.replace(saved, final)
        write_best(self.run_dir, self.best_metric)
        apply_retention(self.run_dir, final, self.keep_epochs, self.keep_checkpoints)
        print(f"saved {final.name} (epoch {state.epoch:.2f})", flush=True)


class StepEvaluation(TrainerCallback):
    """Validation every `every` optimizer steps as well as at each epoch end (which evaluates anyway)."""

    def __init__(self, every: int):
        self.every = every

    def on_step_end(self, args, state, control, **kwargs):
        at_epoch_end = state.epoch == int(state.epoch)
        if state.global_step % self.every == 0 and not at_epoch_end:
            control.should_evaluate = True


class StepCheckpoints(TrainerCallback):
    """A `step-<N>` checkpoint every `every` optimizer steps inside an epoch; epoch ends (and a training.max_steps
    end) save their epoch anyway. Committed by `EpochRecorder`; resumed from exactly by HF's Trainer (data skipped,
    RNG restored) with the epoch's data order (`RecipeDPOTrainer._start_epoch_window`)."""

    def __init__(self, every: int):
        self.every = every

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step % self.every == 0 and inside_an_epoch(state):
            control.should_save = True


class EpochEarlyStopping(EpochEndFlag):
    """Stops training once `patience` epochs have passed since the best epoch, by epoch-end validation alone.

    transformers' EarlyStoppingCallback compares with `state.best_metric`, which its Trainer also updates at the
    validations `training.eval_steps` adds within an epoch, so an epoch-end value could lose to a mid-epoch one. Here
    the epoch-end values are compared with each other only, and the best is `best.json`'s (`rundir.best_epoch` over
    the same values). A resumed run reads the epochs before it from metrics.jsonl, so it goes on counting.
    `stopped` says when it ended a run before its last epoch.
    """

    def __init__(self, run_dir: Path, metric: str, patience: int):
        self.run_dir = Path(run_dir)
        self.metric = metric
        self.patience = patience
        self.values: dict[int, float] = {}
        self.stopped: dict | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        self.values = {r["epoch"]: r["val"][self.metric] for r in read_metrics(self.run_dir) if self.metric in r.get("val", {})}

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        if not self.at_epoch_end or not metrics or BEST_METRIC_LOGGED[self.metric] not in metrics:
            return
        epoch = epoch_number(state)
        self.values[epoch] = metrics[BEST_METRIC_LOGGED[self.metric]]
        best = best_epoch([{"epoch": e, "val": {self.metric: v}} for e, v in sorted(self.values.items())], self.metric)
        if epoch - best["epoch"] >= self.patience and state.global_step < state.max_steps:
            control.should_training_stop = True
            self.stopped = {"epoch": epoch, "best_epoch": best["epoch"], "metric": best["metric"], "patience": self.patience,
                            "num_epochs": args.num_train_epochs}  # fmt: skip

    def on_train_end(self, args, state, control, **kwargs):
        if self.stopped and state.is_world_process_zero:  # after the stopped epoch's own line
            print(early_stop_line(self.stopped), flush=True)


def early_stop_line(stopped: dict) -> str:
    epochs = stopped["epoch"] - stopped["best_epoch"]
    return (
        f"early stopping after epoch {stopped['epoch']}: {stopped['metric']} has not improved on epoch "
        f"{stopped['best_epoch']} for {epochs} epoch{'s' if epochs > 1 else ''} (patience {stopped['patience']}); "
        f"best epoch {stopped['best_epoch']}"
    )


class LogLinePrinter(TrainerCallback):
    """One readable line per logging step, instead of transformers' raw dicts of quoted numbers."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs or "rewards/accuracies" not in logs:
            return  # evaluation lines come from the epoch summary; run totals from the final `done` line
        print(
            f"step {state.global_step}/{state.max_steps} (epoch {state.epoch:.2f}): loss {logs['loss']:.4f} "
            f"acc {logs['rewards/accuracies']:.3f} margin {logs['rewards/margins']:.3f} "
            f"lr {logs.get('learning_rate', float('nan')):.2e}",
            flush=True,
        )


def _epoch_line(record: dict) -> str:
    train, val = record["train"], record["val"]
    return (
        f"epoch {record['epoch']}: train loss {train['loss']:.4f} acc {train['accuracy']:.3f} "
        f"({train['tokens_per_s']:.0f} tok/s) | val loss {val.get('loss', float('nan')):.4f} "
        f"margin {val.get('margin', float('nan')):.3f} acc {val.get('accuracy', float('nan')):.3f}"
    )


# What save_on_signal saves on: a scheduler's notice (SIGTERM at cancel or preemption, SIGUSR1 ahead of a time limit).
# Ctrl-C (SIGINT) stops without a save either way.
SAVING_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class InterruptGuard(TrainerCallback):
    """SIGINT/SIGTERM stop training at the next step boundary; a save under way finishes first, none is started.

    With `save_on_signal`, SIGTERM and SIGUSR1 (handled then too) save before stopping (`saved_on_signal`): a step
    checkpoint at the next step's end inside an epoch; at an epoch's end (its last step, or the last of
    training.max_steps) the epoch checkpoint, validated as usual. Under several processes each step and epoch end
    agrees on the stop across them, so every rank stops, and saves, at the same point.

    The signal is deferred, never swallowed: once training has stopped and the handlers are restored, it is raised
    again for whoever handled it before (Python's KeyboardInterrupt, a test runner, the default of ending the
    process), so no caller mistakes a stopped run for a finished one. A caller that reports the stop first
    (`run.run_training`: the resume command) sets `deliver_after_stop` to False and calls `deliver` itself.
    """

    def __init__(self, save_on_signal: bool = False):
        self.save_on_signal = save_on_signal
        self.signal: int | None = None  # the signal this process received
        self.stop_signal: int | None = None  # the one training stopped for (under several processes, any one's)
        self.saved_on_signal = False
        self.deliver_after_stop = True
        self._previous = {}

    @property
    def interrupted(self) -> bool:
        return self.signal is not None or self.stop_signal is not None

    def _saves(self, signum: int | None) -> bool:
        return self.save_on_signal and signum in SAVING_SIGNALS

    def _request_stop(self, signum, frame):
        if self.signal is not None:
            if self._saves(signum):  # a repeated notice (a launcher forwards what the scheduler also sent): saving
                return
            raise KeyboardInterrupt  # a second Ctrl-C means "now"
        self.signal = signum
        then = "saving a checkpoint after this step" if self._saves(signum) else "stopping after this step"
        print(f"\nreceived {signal.Signals(signum).name}: {then}", file=sys.stderr, flush=True)

    def on_train_begin(self, args, state, control, **kwargs):
        handled = (signal.SIGINT, signal.SIGTERM) + ((signal.SIGUSR1,) if self.save_on_signal else ())
        for signum in handled:
            with contextlib.suppress(ValueError):  # not the main thread
                self._previous[signum] = signal.signal(signum, self._request_stop)

    def restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    def deliver(self) -> None:
        """The deferred signal, to the handler restored after training."""
        if self.signal is not None:
            signal.raise_signal(self.signal)

    def on_train_end(self, args, state, control, **kwargs):
        self.restore()
        if self.deliver_after_stop:
            self.deliver()

    def _agreed_signal(self, args) -> int | None:
        """This process's signal; under several processes with save_on_signal, the highest any of them received (a
        saving signal outranks SIGINT), read at every step and epoch end so that all stop at the same one."""
        if args.world_size <= 1 or not self.save_on_signal or not torch.distributed.is_initialized():
            return self.signal
        received = torch.tensor([self.signal or 0], device=args.device)
        torch.distributed.all_reduce(received, op=torch.distributed.ReduceOp.MAX)
        return int(received.item()) or None

    def on_step_end(self, args, state, control, **kwargs):
        if self.stop_signal is not None:
            return
        signum = self._agreed_signal(args)
        if signum is None or (self._saves(signum) and not inside_an_epoch(state)):
            return  # nothing to stop for, or the epoch end that follows stops and saves
        self.stop_signal = signum
        control.should_training_stop = True
        if self._saves(signum):
            self.saved_on_signal = control.should_save = True

    def on_epoch_end(self, args, state, control, **kwargs):
        if self.stop_signal is None:
            self.stop_signal = self._agreed_signal(args)
            if self.stop_signal is None:
                return
            control.should_training_stop = True
            if self._saves(self.stop_signal):  # the epoch is complete (or max_steps ends it): validated and saved
                self.saved_on_signal = True
                return
        # A partial epoch is not checkpointed as an epoch: resume replays it exactly, or goes on from the step
        # checkpoint just saved.
        control.should_save = False
        control.should_evaluate = False
