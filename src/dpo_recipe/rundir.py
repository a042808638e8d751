"""The layout of a run directory, in one place: what training writes and evaluation and reports read back.

    <output_dir>/<run_name>/
      config.yaml            the resolved config (its --set overrides included)
      data_report.json       every row read, dropped or truncated, by reason
      data_indices.json      which source rows went to train / val / test
      metrics.jsonl          one record per line: `epoch` (one per epoch), `step` and `eval` (see RECORD_KINDS)
      epoch-<k>/             a complete checkpoint; the name is only ever given to a finished save
        running_totals.json  the epoch's and the log line's running sums, for resuming inside them
        eval_<data>.json     evaluation of that checkpoint on a dataset
      best -> epoch-<k>      the best epoch by validation, with best.json saying by what (and its weights' step)
      reference/             the starting model, when it was built locally (evaluation's reference)
      run_info.json          each training session's wall time, device and software; how early stopping ended it
      tensorboard/           event files, when logging.report_to has tensorboard

Training, evaluation and reporting all read and write through these names and functions.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from .config import ConfigError, RecipeConfig, load_config

EPOCH_PREFIX = "epoch-"
METRICS_FILE = "metrics.jsonl"
BEST_FILE = "best.json"
BEST_LINK = "best"
RUN_CONFIG_FILE = "config.yaml"
DATA_INDICES_FILE = "data_indices.json"
DATA_REPORT_FILE = "data_report.json"
ADAPTER_CONFIG_FILE = "adapter_config.json"
TEST_DATASET = "test"
RUN_INFO_FILE = "run_info.json"
TENSORBOARD_DIR = "tensorboard"
REFERENCE_DIR = "reference"
TOTALS_FILE = "running_totals.json"
# Files in a checkpoint that only resuming reads; kept in the newest epoch alone. Optimizer state (Adam's two moments)
# is twice the size of the weights; FSDP's model shards repeat model.safetensors.
RESUME_ONLY_PREFIXES = ("optimizer", "scaler", "pytorch_model_fsdp", "running_totals")


def eval_file_name(dataset: str) -> str:
    return f"eval_{dataset}.json"


def reference_dir(run_dir: Path) -> Path:
    """Where a run keeps its locally built starting model, so evaluation uses exactly that reference."""
    return Path(run_dir) / REFERENCE_DIR


def epoch_dirs(run_dir: Path) -> list[Path]:
    """Complete epoch checkpoints, oldest first. Incomplete saves never carry the `epoch-` name."""
    found = []
    for path in Path(run_dir).glob(f"{EPOCH_PREFIX}*"):
        suffix = path.name[len(EPOCH_PREFIX) :]
        if path.is_dir() and suffix.isdigit() and not path.is_symlink():
            found.append((int(suffix), path))
    return [path for _, path in sorted(found)]


# metrics.jsonl holds one record per line: `epoch` (train and val means of a whole epoch, with its checkpoint; one
# per epoch), `step` (the training means of one logging window) and `eval` (a validation pass every
# `training.eval_steps` steps).
RECORD_KINDS = ("epoch", "step", "eval")


def _all_records(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / METRICS_FILE
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def _write_records(run_dir: Path, records: list[dict]) -> None:
    atomic_write(Path(run_dir) / METRICS_FILE, "".join(json.dumps(r) + "\n" for r in records))


def read_metrics(run_dir: Path, kind: str = "epoch") -> list[dict]:
    return [record for record in _all_records(run_dir) if record.get("kind", "epoch") == kind]


def append_record(run_dir: Path, record: dict) -> None:
    with open(Path(run_dir) / METRICS_FILE, "a") as handle:
        handle.write(json.dumps(record) + "\n")


def _is_epoch(record: dict) -> bool:
    return record.get("kind", "epoch") == "epoch"


def keep_last_epoch_records(run_dir: Path) -> None:
    """One `epoch` record per epoch: the last one written, which describes the weights saved last under its name."""
    records = _all_records(run_dir)
    last = {r["epoch"]: i for i, r in enumerate(records) if _is_epoch(r)}
    kept = [r for i, r in enumerate(records) if not _is_epoch(r) or last[r["epoch"]] == i]
    if len(kept) < len(records):
        _write_records(run_dir, kept)


BEST_DIRECTION = {"loss": min, "accuracy": max, "margin": max}


def best_epoch(records: list[dict], metric: str) -> dict | None:
    scored = [r for r in records if r.get("val")]
    if not scored:
        return None
    best = BEST_DIRECTION[metric](scored, key=lambda r: r["val"][metric])
    return {
        "epoch": best["epoch"], "step": best.get("step"), "metric": f"val_{metric}", "value": best["val"][metric],
        "checkpoint": f"{EPOCH_PREFIX}{best['epoch']}",
    }


def atomic_write(path: Path, text: str) -> None:
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(text)
    os.replace(temporary, path)


def write_best(run_dir: Path, metric: str) -> None:
    best = best_epoch(read_metrics(run_dir), metric)
    if best is not None:
        atomic_write(run_dir / BEST_FILE, json.dumps(best, indent=2))
        point_best_link(run_dir, best["checkpoint"])


def point_best_link(run_dir: Path, target: str) -> None:
    link = run_dir / BEST_LINK
    temporary = run_dir / (BEST_LINK + ".tmp")
    if temporary.is_symlink() or temporary.exists():
        temporary.unlink()
    temporary.symlink_to(target, target_is_directory=True)
    os.replace(temporary, link)


def latest_checkpoint(run_dir: Path) -> Path | None:
    complete = epoch_dirs(run_dir)
    return complete[-1] if complete else None


def forget_records_after(run_dir: Path, step: int) -> None:
    """A run resumed from its checkpoint at optimizer step `step` rewrites what came after, so no record of a later
    step may linger: neither one whose save never completed nor one of a run that went on (an epoch record written
    just before its checkpoint's rename is one). Of an epoch saved twice, the record kept is the last one."""
    _write_records(run_dir, [r for r in _all_records(run_dir) if r["step"] <= step])
    keep_last_epoch_records(run_dir)
    for path in Path(run_dir).glob("checkpoint-*"):  # a save that never completed
        shutil.rmtree(path, ignore_errors=True)


def apply_retention(run_dir: Path, newest: Path, keep_epochs: str) -> None:
    """Resume state only in the newest epoch; with `best_and_last`, no other epoch at all."""
    best = (Path(run_dir) / BEST_LINK).resolve()
    for checkpoint in epoch_dirs(run_dir):
        if checkpoint == newest:
            continue
        if keep_epochs == "best_and_last" and checkpoint.resolve() != best:
            shutil.rmtree(checkpoint)
            continue
        for path in checkpoint.iterdir():
            if path.name.startswith(RESUME_ONLY_PREFIXES):
                shutil.rmtree(path) if path.is_dir() else path.unlink()


def is_checkpoint(path: Path) -> bool:
    return (path / "config.json").is_file() or (path / ADAPTER_CONFIG_FILE).is_file()


def is_run_dir(path: Path) -> bool:
    return (path / RUN_CONFIG_FILE).is_file()


def load_run_config(run_dir: Path) -> RecipeConfig:
    """The config the run was trained with (training writes it resolved, so no `base:` chain is needed)."""
    if not is_run_dir(run_dir):
        raise ConfigError(f"{run_dir}: not a run directory (no {RUN_CONFIG_FILE} written by training)")
    return load_config(run_dir / RUN_CONFIG_FILE)


def run_checkpoints(run_dir: Path, all_epochs: bool = False) -> list[Path]:
    """Every epoch, or the best one (the `best` link the trainer keeps; the last epoch if there is none)."""
    epochs = epoch_dirs(run_dir)
    if not epochs:
        raise ConfigError(f"{run_dir}: no complete epoch checkpoint to evaluate")
    if all_epochs:
        return epochs
    best = run_dir / BEST_LINK
    return [best.resolve()] if best.is_dir() else [epochs[-1]]


def find_runs(path: Path) -> list[Path]:
    """A run directory itself, or the runs directly under a directory such as `checkpoints/`."""
    path = Path(path)
    if is_run_dir(path):
        return [path]
    runs = sorted(child for child in path.iterdir() if is_run_dir(child)) if path.is_dir() else []
    if not runs:
        raise ConfigError(f"{path}: neither a run directory (with {RUN_CONFIG_FILE}) nor a directory of runs")
    return runs


def find_checkpoints(path: str | Path, all_epochs: bool = False) -> list[Path]:
    """Checkpoints named by a path: a checkpoint, a run (best or every epoch) or a directory of runs."""
    path = Path(path)
    if is_checkpoint(path):
        return [path.resolve()]  # `run/best` becomes `run/epoch-K`, so results land beside the real checkpoint
    if is_run_dir(path):
        return run_checkpoints(path, all_epochs)
    found = []
    for run in find_runs(path):
        if epoch_dirs(run):
            found.extend(run_checkpoints(run, all_epochs))
        else:
            print(f"skipping {run}: no complete epoch checkpoint", flush=True)
    return found


def checkpoint_epoch(checkpoint: Path) -> int | None:
    suffix = checkpoint.name[len(EPOCH_PREFIX) :]
    return int(suffix) if checkpoint.name.startswith(EPOCH_PREFIX) and suffix.isdigit() else None
